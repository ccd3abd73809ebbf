"""The real size end to end on one CPU machine: checkpoint -> layer-streamed export (int4 +
int8 decoders) -> session loading -> ``dvc`` requests -> llama.cpp peers -> a dated report.

    python -m benchmarks.trace7b [--preset trace-7b] [--work DIR] [--frames 16,32]
        [--decode-steps 64] [--stages checkpoint,export,load,run,peers,report] [--keep]
        [--lm-head float|int8|int4] [--block-size 32]

Every stage runs as its own process (its peak RSS is that process's, from ``wait4``), and
its figures are saved to ``WORK/figures.json`` as soon as it ends, so a run stopped halfway
keeps what it measured; a stage whose outputs exist is not redone. Before each stage a
preflight compares what it needs (disk for its files, memory for its largest process)
with what is free and stops with both numbers when short. Multi-GB intermediates are
deleted as soon as nothing later needs them (the artifact after ``run``, the checkpoint's
shards and the HF/bf16-GGUF copies during ``peers``, the Q4_0/Q8_0 GGUFs once benched)
unless ``--keep``.

Stages:

- ``checkpoint``: ``python -m training make-checkpoint --preset P`` (random weights).
- ``export``: ``python -m export onnx --stream --decoders int4,int8`` (export/stream.py):
  time and peak RSS per step come from the manifest.
- ``load``: an onnxruntime session of each quantised decoder, default options vs
  ``session.disable_prepacking``: load time, peak and settled RSS vs the weights' bytes,
  one decode step.
- ``run``: ``python -m trace_rt.bench`` (the same Pipeline as ``trace-rt run``: PyAV
  decoding, the real tokenizer and prompts, task ``dvc``) with ``onnxruntime-int4`` and
  ``-int8`` at each frame count: per-stage times, decode steps p50/p90, peak RSS, and the
  floors from this machine's measured bandwidth.
- ``reference``: the same requests through the torch model (``trace_rt/model``, held to HF
  transformers by the parity tests) in bf16 on the checkpoint: the greedy tokens the int4
  and int8 decoders are compared with. bf16 because it is the release's dtype and the only
  whole-model reference that fits: fp32 weights (30 GB) exceed this machine's memory.
- ``peers``: the checkpoint's LLM as an HF directory (``python -m export hf-llm``, bf16),
  a bf16 GGUF from llama.cpp's own converter, Q4_0 and Q8_0 from it with
  ``llama_model_quantize``; then the bench's llama.cpp peers on the same prompt lengths.
- ``report``: ``benchmarks/results/trace7b-<preset>-cpu-<date>.{json,md}``
  (benchmarks/trace7b_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trace_rt.plan import LM_HEAD_PRECISIONS, linear_bytes_per_weight
from trace_rt.variants import BLOCK_SIZES, DEFAULT_BLOCK_SIZE

STAGES = ("checkpoint", "export", "load", "run", "reference", "plan", "peers", "report")
GiB = 2**30
DECODERS = ("int4", "int8")
REF_FILES = ("config.json", "tokenizer.model", "clip_vision")  # what the peers' bench reads


class Short(RuntimeError):
    """Not enough memory or disk for a stage (the message says how much)."""


# ---- what each stage needs ---------------------------------------------------------------
def params(cfg) -> dict[str, int]:
    from trace_rt.bench.floor import decoder_layer_params, vision_params

    layers = decoder_layer_params(cfg) * cfg.num_hidden_layers
    emb = cfg.vocab_size * cfg.hidden_size
    return {"layers": layers, "vision": vision_params(cfg), "emb": emb}


def needs(stage: str, cfg, work: Path, keep: bool = False) -> dict[str, float]:
    """Bytes of disk and memory *stage* needs (beyond what already lies in *work*)."""
    from export.stream import artifact_bytes

    p = params(cfg)
    total = sum(p.values()) + p["emb"]  # + lm_head
    llm_bf16 = 2 * (p["layers"] + 2 * p["emb"])
    art = artifact_bytes(cfg, DECODERS)
    layer_fp32 = 4 * p["layers"] / cfg.num_hidden_layers
    shell_fp32 = 4 * (p["vision"] + 2 * p["emb"])
    have_ckpt = (work / "ckpt" / "config.json").is_file()
    q = {d: linear_bytes_per_weight(d) for d in DECODERS}  # MatMulNBits, fp32 block scales
    dec = {d: q[d] * p["layers"] + 4 * p["emb"] for d in DECODERS}  # + fp32 heads
    return {
        "checkpoint": {"disk": 0 if have_ckpt else 2 * total, "memory": 4.5 * GiB},
        "export": {
            "disk": 0 if (work / "art" / "manifest.json").is_file() else art,
            "memory": shell_fp32 + 5 * layer_fp32 + 1 * GiB,
        },
        # a session peaks at ~1.85x its decoder's bytes while MatMulNBits prepacks (small)
        "load": {"disk": 0, "memory": LOAD_FACTOR * dec["int8"] + GiB},
        "run": {"disk": 0, "memory": run_memory(cfg, "int4")},
        # the HF copy while the checkpoint is there; then (its shards deleted) the bf16
        # GGUF, then (the HF copy deleted) Q4_0 + Q8_0; with --keep all of them at once
        "peers": {
            "disk": llm_bf16 * (2.9 if keep else 1.0),
            "memory": (q["int8"] * p["layers"] + 2 * p["emb"]) * 1.1 + 2 * GiB,
        },
        # bf16 weights held once (loaded straight in their dtype), activations, runtime
        "reference": {"disk": 0, "memory": 2 * total + 2 * GiB},
        "plan": {"disk": 0, "memory": 0.5 * GiB},
        "report": {"disk": 0, "memory": 0},
    }[stage]


LOAD_FACTOR = 1.9


def run_memory(cfg, decoder: str, measured_mb: float | None = None) -> float:
    """A bench process: the decoder session at its load peak (*measured_mb* by the load
    stage, else estimated), the vision tower and projector (fp32, prepacked: ~2x), the
    embeddings, the KV cache, the runtime."""
    p = params(cfg)
    q = linear_bytes_per_weight(decoder)
    session = measured_mb * 2**20 if measured_mb else LOAD_FACTOR * (q * p["layers"] + 4 * p["emb"])
    return session + 2 * 4 * p["vision"] + 4 * p["emb"] + 1.5 * GiB


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def preflight(stage: str, cfg, work: Path, keep: bool = False) -> dict[str, float]:
    need = needs(stage, cfg, work, keep)
    free_disk = shutil.disk_usage(work).free
    free_mem = available_memory()
    if need["disk"] > free_disk:
        raise Short(
            f"stage {stage}: needs {need['disk'] / GiB:.1f} GiB of disk in {work}, "
            f"{free_disk / GiB:.1f} GiB free; free space (or run with fewer --stages)"
        )
    if need["memory"] > free_mem:
        raise Short(
            f"stage {stage}: needs about {need['memory'] / GiB:.1f} GiB of memory, "
            f"{free_mem / GiB:.1f} GiB available; stop other work or use a smaller --preset"
        )
    return {"disk_gib": round(need["disk"] / GiB, 2), "memory_gib": round(need["memory"] / GiB, 2)}


# ---- running things --------------------------------------------------------------------
def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run *cmd* (output to *log*); returns wall seconds and the process tree's peak RSS."""
    t = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-8:]
        raise RuntimeError(f"{cmd[2] if len(cmd) > 2 else cmd[0]} failed: " + " | ".join(tail))
    return {"seconds": round(time.perf_counter() - t, 1), "peak_rss_mb": usage.ru_maxrss // 1024}


def py(*args: str) -> list[str]:
    return [sys.executable, *args]


def env_with_repo() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return os.environ | {"PYTHONPATH": root + (os.pathsep + path if path else "")}


def free_gib(path: Path) -> float:
    return round(shutil.disk_usage(path).free / GiB, 1)


def uptime() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def remove(path: Path, keep: bool, figures: dict[str, Any]) -> None:
    if keep or not path.exists():
        return
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    figures.setdefault("removed", []).append(str(path))


# ---- stages ----------------------------------------------------------------------------
def stage_checkpoint(a, work: Path, log: Path) -> dict[str, Any]:
    ckpt = work / "ckpt"
    if (ckpt / "config.json").is_file():
        return {"skipped": "exists"}
    cmd = py("-m", "training", "make-checkpoint", str(ckpt), "--preset", a.preset)
    out = run(cmd, log, env_with_repo())
    out["bytes"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    return out


def stage_export(a, work: Path, log: Path) -> dict[str, Any]:
    art = work / "art"
    if not (art / "manifest.json").is_file():
        cmd = py("-m", "export", "onnx", str(work / "ckpt"), str(art), "--stream")
        cmd += ["--decoders", ",".join(DECODERS), "--no-progress"]
        if a.lm_head != "float":
            cmd += ["--lm-head", a.lm_head]
        cmd += ["--block-size", str(a.block_size)]
        out = run(cmd, log, env_with_repo())
    else:
        out = {"skipped": "exists"}
    m = json.loads((art / "manifest.json").read_text())
    out["stream"] = m["export"]["stream"]
    out["files"] = {
        name: sum(f["bytes"] for f in rec["files"].values())
        for name, rec in m["variants"]["decoder"].items()
    }
    out["files"] |= {f: r["bytes"] for f, r in m["files"].items()}
    return out


def stage_load(a, work: Path, log: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # int8 without prepacking is left out: it runs ~5-10x slower per step (measured on
    # small) and its load is the int4 one's story again
    for variant, mode in (("int4", "default"), ("int4", "no-prepack"), ("int8", "default")):
        cmd = py("-m", "benchmarks.trace7b_load", str(work / "art"), variant, mode)
        proc = run(cmd, log, env_with_repo())
        line = log.read_text().strip().splitlines()[-1]
        out[f"{variant}/{mode}"] = json.loads(line) | {"process": proc}
    return out


def bench(
    model: Path, backends: str, frames: int, a, js: Path, log: Path, env=None, extra=()
) -> dict:
    """One ``python -m trace_rt.bench`` invocation (one request, no warm-up) into *js*; the
    machine's peaks are measured by the first invocation and reused by the later ones."""
    cmd = py("-m", "trace_rt.bench", "--model", str(model), "--backends", backends, *extra)
    cmd += ["--frames", str(frames), "--decode-steps", str(a.decode_steps)]
    cmd += ["--warmup", "0", "--runs", "1", "--json", str(js)]
    if a.peaks:
        cmd += ["--peak-gbps", str(a.peaks["gbps"]), "--peak-tflops", str(a.peaks["tflops"])]
    out = run(cmd, log, env or env_with_repo())
    if not a.peaks:
        a.peaks = json.loads(js.read_text())["config"]["peaks"]
    return out


def pairs(a, kinds: tuple[str, str]) -> list[tuple[str, int]]:
    """(backend, frames) to run: the 4-bit one at every frame count, the 8-bit one at
    ``--int8-frames``."""
    return [(kinds[0], f) for f in a.frames] + [(kinds[1], f) for f in a.int8_frames]


def stage_run(a, work: Path, log: Path, figures: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for backend, frames in pairs(a, tuple(f"onnxruntime-{d}" for d in DECODERS)):
        js = work / f"bench-{backend}-{frames}.json"
        dec = backend.rsplit("-", 1)[1]
        loaded = figures.get("load", {}).get(f"{dec}/default", {}).get("peak_rss_load_mb")
        need, have = run_memory(a.cfg, dec, loaded), available_memory()
        if not js.is_file() and need > have:  # the int8 one at 7B, on a busy machine
            out[f"{backend}/{frames}"] = {
                "skipped": f"needs about {need / GiB:.1f} GiB, {have / GiB:.1f} GiB available"
            }
            continue
        if not js.is_file():
            # The streamed decoders compute lm_head at every step, so their decode_step is
            # already the text-head step: the bench's extra text-step prefill (~20 s at 7B)
            # would measure it again.
            out[f"{backend}/{frames}"] = bench(
                work / "art", backend, frames, a, js, log, extra=("--no-text-steps",)
            )
        out.setdefault("bench", []).append(str(js))
    return out


def stage_reference(a, work: Path, log: Path) -> dict[str, Any]:
    """The torch model in bf16 on the checkpoint, the same ``dvc`` request at each frame
    count the quantised decoders ran: its tokens are the agreement reference."""
    out: dict[str, Any] = {}
    for frames in sorted(set(a.frames) | set(a.int8_frames)):
        js = work / f"bench-torch-bf16-{frames}.json"
        if not js.is_file():
            extra = ("--device", "cpu", "--dtype", "bf16")
            ckpt = work / "ckpt"
            out[f"torch-bf16/{frames}"] = bench(ckpt, "torch", frames, a, js, log, extra=extra)
        out.setdefault("bench", []).append(str(js))
    return out


def stage_plan(a, work: Path, log: Path) -> dict[str, Any]:
    """``trace-rt plan`` for each measured (decoder, frames), with this machine's measured
    peaks and the bench's request (its video size, its token budget): what it predicts."""
    out: dict[str, Any] = {}
    for backend, frames in pairs(a, tuple(f"onnxruntime-{d}" for d in DECODERS)):
        cmd = py("-m", "trace_rt", "plan", "--preset", a.preset, "--device", "cpu")
        cmd += ["--frames", str(frames), "--precision", backend.rsplit("-", 1)[1]]
        cmd += ["--max-new-tokens", str(a.decode_steps + 1), "--source-size", "240x320"]
        cmd += ["--lm-head", a.lm_head, "--block-size", str(a.block_size)]
        if a.peaks:
            cmd += ["--peak-gbps", str(a.peaks["gbps"]), "--peak-tflops", str(a.peaks["tflops"])]
        proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env_with_repo())
        if proc.returncode not in (0, 1):  # 1: does not fit (still a prediction)
            raise RuntimeError(f"trace-rt plan failed: {proc.stderr.strip()[-300:]}")
        plan = json.loads(proc.stdout)
        out[f"{backend}/{frames}"] = {
            "host_bytes": plan["memory"]["host_bytes"],
            "items": plan["memory"]["items"],
            "floor_ms": {k: v for k, v in plan["floor_ms"].items() if k != "inputs"},
            "decoder_weight_bytes": plan["floor_ms"]["inputs"]["decoder_weight_bytes"],
            "command": " ".join(cmd[1:]),
        }
    return out


def stage_peers(a, work: Path, log: Path, figures: dict[str, Any]) -> dict[str, Any]:
    """GGUF files made the way llama.cpp users make them, disk-lean, then the bench."""
    from benchmarks.peers.llamacpp import _llama_cpp, converter

    lc = _llama_cpp()
    ref, ckpt, hf = work / "peer-ref", work / "ckpt", work / "hf-llm"
    out: dict[str, Any] = {}
    ref.mkdir(exist_ok=True)
    for name in REF_FILES:  # the bench's prompt building reads these (no weights)
        src, dst = ckpt / name, ref / name
        if src.exists() and not dst.exists():
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    ggufs = {t: ref / f"model-{t}.gguf" for t in ("Q4_0", "Q8_0")}
    benches = {(b, f): work / f"bench-{b}-{f}.json" for b, f in pairs(a, ("q4", "q8"))}
    if all(js.is_file() for js in benches.values()):  # benched, GGUFs gone: nothing to redo
        return {"skipped": "benched", "bench": [str(js) for js in benches.values()]}
    if not all(g.is_file() for g in ggufs.values()):
        remove(work / "art", a.keep, figures)  # the bench of ours is done by now
        bf16 = work / "model-BF16.gguf"
        if not bf16.is_file():
            if not (hf / "config.json").is_file():
                cmd = py("-m", "export", "hf-llm", str(ckpt), str(hf), "--dtype", "bf16")
                out["hf_llm"] = run(cmd, log, env_with_repo())
            for shard in ckpt.glob("model*.safetensors*"):
                remove(shard, a.keep, figures)
            cmd = py(str(converter(lc.__version__)), str(hf), "--outfile", str(bf16))
            env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
            out["convert_bf16"] = run([*cmd, "--outtype", "bf16"], log, env)
            remove(hf, a.keep, figures)
        for t, g in ggufs.items():
            if not g.is_file():
                cmd = py("-m", "benchmarks.trace7b_load", "quantize", str(bf16), str(g), t)
                out[f"quantize_{t}"] = run(cmd, log, env_with_repo())
        remove(bf16, a.keep, figures)
    out["bytes"] = {t: g.stat().st_size for t, g in ggufs.items()}
    plugins = "q4=benchmarks.trace7b_load:GgufQ4_0,q8=benchmarks.trace7b_load:GgufQ8_0"
    env = env_with_repo() | {"TRACE_RT_BENCH_PLUGINS": plugins}
    for (backend, frames), js in benches.items():
        if not js.is_file():
            out[f"{backend}/{frames}"] = bench(ref, backend, frames, a, js, log, env)
        out.setdefault("bench", []).append(str(js))
    for g in ggufs.values():  # 11 GB at 7B; the bench JSONs are what later stages read
        remove(g, a.keep, figures)
    return out


def figures_peaks(work: Path) -> dict[str, Any] | None:
    """The peaks an earlier invocation measured (its first bench JSON), to reuse."""
    for js in sorted(work.glob("bench-*.json")):
        return json.loads(js.read_text())["config"]["peaks"]
    return None


# ---- driver ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trace7b", description=__doc__)
    p.add_argument("--preset", default="trace-7b", help="model preset (CI: small)")
    p.add_argument("--work", type=Path, default=Path("/work/t7b"), help="working directory")
    p.add_argument("--frames", default="16,32", help="frame counts of the dvc requests")
    p.add_argument(
        "--int8-frames", default=None, help="frame counts for int8 and Q8_0 (default: --frames)"
    )
    p.add_argument("--decode-steps", type=int, default=64, help="decode steps per request")
    p.add_argument("--stages", default=",".join(STAGES), help="which stages, in order")
    p.add_argument("--keep", action="store_true", help="keep the multi-GB intermediates")
    p.add_argument(
        "--lm-head",
        choices=("float", *LM_HEAD_PRECISIONS),
        default="float",
        help="lm_head of the int4/int8 decoders (export onnx --stream --lm-head; float: fp32, "
        "the streamed export's default). llama.cpp's Q4_0/Q8_0 hold theirs in Q6_K/Q8_0",
    )
    p.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        default=DEFAULT_BLOCK_SIZE,
        help="weights per quantisation block of the int4/int8 decoders (export onnx --stream "
        "--block-size; 32, llama.cpp Q4_0's and Q8_0's)",
    )
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    a = p.parse_args(argv)
    a.frames = [int(f) for f in a.frames.split(",")]
    int8 = a.frames if a.int8_frames is None else a.int8_frames.split(",")
    a.int8_frames = [int(f) for f in int8 if str(f).strip()]
    a.peaks = figures_peaks(a.work)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    if unknown := set(stages) - set(STAGES):
        p.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    from training.presets import load_preset

    cfg = a.cfg = load_preset(a.preset)
    a.work.mkdir(parents=True, exist_ok=True)
    fig_path, log = a.work / "figures.json", a.work / "chain.log"
    figures = json.loads(fig_path.read_text()) if fig_path.is_file() else {}
    figures |= {"preset": a.preset, "frames": a.frames, "decode_steps": a.decode_steps}
    figures["lm_head"] = a.lm_head
    figures["block_size"] = a.block_size
    try:
        for stage in stages:
            need = preflight(stage, cfg, a.work, a.keep)
            print(f"[{time.strftime('%H:%M:%S')}] {stage} (needs {need}) ...", flush=True)
            before = {"load": uptime(), "free_disk_gib": free_gib(a.work)}
            if stage in ("peers", "run"):
                result = globals()[f"stage_{stage}"](a, a.work, log, figures)
            elif stage == "report":
                from benchmarks.trace7b_report import write_report

                result = {"files": [str(f) for f in write_report(figures, a.work, a.results)]}
            else:
                result = globals()[f"stage_{stage}"](a, a.work, log)
            if result.get("skipped"):  # done by an earlier invocation: keep its figures
                result = {
                    k: v for k, v in figures.get(stage, {}).items() if k != "skipped"
                } | result
            if stage == "run":
                remove(a.work / "art", a.keep, figures)  # nothing later reads it
            figures[stage] = result | {
                "preflight": need,
                "before": before,
                "after": {"load": uptime(), "free_disk_gib": free_gib(a.work)},
            }
            fig_path.write_text(json.dumps(figures, indent=2))
            print(f"[{time.strftime('%H:%M:%S')}] {stage} done", flush=True)
    except Short as e:
        print(f"trace7b: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
