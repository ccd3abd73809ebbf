"""One GPU check in one run: engines for `small` and `trace-7b`, parity, timings, a report.

``benchmarks/gpu/check.sh`` sets up the environment and calls ``check.py run``; each step
then runs as its own subprocess (``check.py step NAME``) under a timeout, so a crash or an
out-of-memory in one step costs that step only, and writes ``<work>/steps/NAME.json``.

Order (most valuable first, within a fixed budget): the 7B checkpoint and its ONNX export
are CPU work, so they start in the background at once; meanwhile the GPU checks `small`
end to end (engines, parity with PyTorch, tokens, timings) and runs the GPU tests; then
the 7B vision+projector engines are built and timed (128 frames), then the 7B decoder
engine and the decode step against the HBM floor, and 7B graph parity last. A step that
would not fit the remaining budget is skipped and recorded as such.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
# HBM bandwidth (bytes/s) by product name, for the decode floor: every token reads all
# decoder weights once. Substrings, most specific first.
HBM = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM (HBM3)
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
]
# fp16 engines vs PyTorch: same bounds as the fp16 ONNX graphs in tests/test_export.py.
RTOL_FP16 = {"vision_encoder": 5e-3, "projector": 5e-3, "decoder": 2e-2}
MODELS = {
    "small": {"ckpt_dtype": "fp32", "frames": 16, "max_seq": 2048, "torch_dtype": "fp32"},
    "trace-7b": {"ckpt_dtype": "bf16", "frames": 128, "max_seq": 4096, "torch_dtype": "fp16"},
}


# ---- orchestrator ------------------------------------------------------------------------
def plan(skip_7b: bool) -> list[dict[str, Any]]:
    """(name, timeout s, needs) in run order; 7b.prepare runs in the background."""
    steps = [
        {"name": "env", "timeout": 120, "needs": []},
        {"name": "small.prepare", "timeout": 420, "needs": []},
        {"name": "small.engines", "timeout": 600, "needs": ["small.prepare"]},
        {"name": "small.parity", "timeout": 420, "needs": ["small.engines"]},
        {"name": "small.timing", "timeout": 240, "needs": ["small.engines"]},
        {"name": "gpu-tests", "timeout": 420, "needs": []},
    ]
    if not skip_7b:
        steps += [
            {"name": "trace-7b.engines.video", "timeout": 600, "needs": ["trace-7b.prepare"]},
            {"name": "trace-7b.timing.video", "timeout": 240, "needs": ["trace-7b.engines.video"]},
            {"name": "trace-7b.engines.decoder", "timeout": 1500, "needs": ["trace-7b.prepare"]},
            {
                "name": "trace-7b.timing.decode",
                "timeout": 420,
                "needs": ["trace-7b.engines.decoder"],
            },
            {"name": "trace-7b.parity", "timeout": 600, "needs": ["trace-7b.engines.decoder"]},
        ]
    return steps


def run_all(work: Path, results: Path, budget_s: float, skip_7b: bool) -> Path:
    t0 = time.monotonic()
    deadline = t0 + budget_s - 60  # keep a minute for the report
    (work / "steps").mkdir(parents=True, exist_ok=True)
    # Resumable: steps already "ok" in <work>/steps are kept, so a host that limits one
    # command's run time can call this again with the same --work and go on.
    status = {p.stem: json.loads(p.read_text())["status"] for p in (work / "steps").glob("*.json")}
    status = {k: v for k, v in status.items() if v == "ok"}
    background = None
    if not skip_7b and status.get("trace-7b.prepare") != "ok":
        # CPU-bound: overlaps the GPU work on `small`.
        background = _spawn(work, "trace-7b.prepare", deadline - time.monotonic())
    for step in plan(skip_7b):
        if status.get(step["name"]) == "ok":
            continue
        for need in step["needs"]:
            if need == "trace-7b.prepare" and need not in status and background is not None:
                left = max(1.0, deadline - time.monotonic())
                status[need] = _join(background, work, need, left)
        missing = [n for n in step["needs"] if status.get(n) != "ok"]
        left = deadline - time.monotonic()
        if missing:
            status[step["name"]] = _skip(work, step["name"], f"needs {missing}")
        elif left < 30:
            status[step["name"]] = _skip(work, step["name"], "out of budget")
        else:
            proc = _spawn(work, step["name"], min(step["timeout"], left))
            status[step["name"]] = _join(proc, work, step["name"], min(step["timeout"], left))
        print(
            f"[{time.monotonic() - t0:6.0f} s] {step['name']}: {status[step['name']]}", flush=True
        )
    if background is not None and "trace-7b.prepare" not in status:
        _kill(background[0])
        status["trace-7b.prepare"] = _skip(work, "trace-7b.prepare", "not needed in time")
    return write_report(work, results, time.monotonic() - t0, budget_s)


def _spawn(work: Path, name: str, timeout: float) -> tuple[subprocess.Popen, float]:
    (work / "steps" / f"{name}.json").unlink(missing_ok=True)  # a retry starts clean
    log = open(work / "steps" / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    cmd = [PY, __file__, "step", name, "--work", str(work)]
    # Own session: a timeout kills the step *and* what it started (make-checkpoint, ...).
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
    )
    return proc, time.monotonic() + timeout


def _join(handle: tuple[subprocess.Popen, float], work: Path, name: str, _: float) -> str:
    proc, until = handle
    try:
        proc.wait(timeout=max(1.0, until - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill(proc)
        return _record(work, name, "timeout", {})
    out = work / "steps" / f"{name}.json"
    if proc.returncode == 0 and out.is_file():
        return json.loads(out.read_text())["status"]
    tail = (work / "steps" / f"{name}.log").read_text()[-2000:]
    return _record(work, name, "failed", {"returncode": proc.returncode, "log_tail": tail})


def _kill(proc: subprocess.Popen) -> None:
    """The step's whole process group (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _skip(work: Path, name: str, why: str) -> str:
    return _record(work, name, "skipped", {"reason": why})


def _record(work: Path, name: str, status: str, data: dict[str, Any]) -> str:
    path = work / "steps" / f"{name}.json"
    prev = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(prev | data | {"status": status}, indent=2))
    return status


def write_report(work: Path, results: Path, wall_s: float, budget_s: float) -> Path:
    steps = {p.stem: json.loads(p.read_text()) for p in sorted((work / "steps").glob("*.json"))}
    env = steps.get("env", {})
    gpu = _slug(env.get("gpu", {}).get("name", "unknown-gpu"))
    date = dt.date.today().isoformat()
    results.mkdir(parents=True, exist_ok=True)
    base = results / f"gpu-{gpu}-{date}"
    report = {"date": date, "wall_s": round(wall_s), "budget_s": budget_s, "steps": steps}
    base.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    base.with_suffix(".md").write_text(_markdown(report))
    print(f"wrote {base}.json and {base}.md")
    return base


def _markdown(report: dict[str, Any]) -> str:
    s = report["steps"]
    env = s.get("env", {})
    lines = [
        f"# GPU check, {report['date']}",
        "",
        f"GPU: {env.get('gpu', {}).get('name', '?')} (compute capability "
        f"{env.get('gpu', {}).get('compute_capability', '?')}); TensorRT "
        f"{env.get('versions', {}).get('tensorrt', '?')}; torch "
        f"{env.get('versions', {}).get('torch', '?')}. Wall time {report['wall_s']} s of a "
        f"{report['budget_s']:.0f} s budget. Written by `benchmarks/gpu/check.sh`; random "
        "weights (no released checkpoint), fp16 engines.",
        "",
        "| step | status | result |",
        "|---|---|---|",
    ]
    order = ["trace-7b.prepare", *(st["name"] for st in plan(False))]
    for name in sorted(s, key=lambda n: order.index(n) if n in order else len(order)):
        rec = s[name]
        summary = rec.get("summary") or rec.get("reason") or ""
        if not summary and rec.get("log_tail"):  # a failure: its last line says why
            summary = rec["log_tail"].strip().splitlines()[-1][:300]
        lines.append(f"| {name} | {rec.get('status')} | {summary.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# ---- steps (each in its own process) -----------------------------------------------------
def step(name: str, work: Path) -> None:
    t0 = time.perf_counter()
    model, _, what = name.partition(".")
    if name == "env":
        data = step_env()
    elif name == "gpu-tests":
        data = step_pytest()
    elif what == "prepare":
        data = step_prepare(model, work)
    elif what.startswith("engines"):
        graphs = {
            "engines": None,  # all three
            "engines.video": ["vision_encoder", "projector"],
            "engines.decoder": ["decoder"],
        }[what]
        data = step_engines(model, work, graphs)
    elif what == "parity":
        data = step_parity(model, work)
    elif what.startswith("timing"):
        data = step_timing(model, work, what.partition(".")[2] or "all")
    else:
        raise SystemExit(f"unknown step {name}")
    data["seconds"] = round(time.perf_counter() - t0, 1)
    _record(work, name, data.pop("status", "ok"), data)


def step_env() -> dict[str, Any]:
    from trace_rt.backends.cuda_rt import device_info

    versions = {"python": platform.python_version()}
    for mod in ("torch", "tensorrt", "onnxruntime", "onnx", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # record, don't fail: later steps say what they need
            versions[mod] = f"missing ({e})"
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    gpu = device_info(0)
    return {"gpu": gpu, "versions": versions, "nvidia_smi": smi[-3000:], "summary": gpu["name"]}


def step_pytest() -> dict[str, Any]:
    cmd = [PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_tensorrt.py"]
    cmd += [str(p) for p in (ROOT / "tests").glob("test_torch_cuda.py")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    # All skipped (no GPU or no tensorrt) is not a pass.
    status = "failed" if out.returncode else ("ok" if "passed" in last else "skipped")
    return {"status": status, "summary": last, "output_tail": out.stdout[-4000:]}


def step_prepare(model: str, work: Path) -> dict[str, Any]:
    """Random-weight checkpoint, then its fp16 ONNX export (CPU only); each part resumable."""
    ckpt, art = work / model / "ckpt", work / model / "artifact"
    times = {}
    for what, cmd in (
        ("checkpoint", ["-m", "training", "make-checkpoint", str(ckpt), "--preset", model,
                        "--dtype", MODELS[model]["ckpt_dtype"]]),
        ("export", ["-m", "export", "onnx", str(ckpt), str(art), "--dtype", "fp16",
                    "--no-progress"]),
    ):  # fmt: skip
        done = work / model / f"{what}.done"
        if done.is_file():  # finished by an earlier (time-limited) call
            times[f"{what}_s"] = float(done.read_text())
            continue
        t = time.perf_counter()
        subprocess.run([PY, *cmd], check=True, cwd=ROOT)
        times[f"{what}_s"] = round(time.perf_counter() - t, 1)
        done.write_text(str(times[f"{what}_s"]))
    onnx_gb = sum(f.stat().st_size for f in art.glob("decoder.onnx*")) / 1e9
    return times | {"decoder_onnx_gb": round(onnx_gb, 2), "summary": f"{times}"}


def step_engines(model: str, work: Path, graphs: list[str] | None) -> dict[str, Any]:
    from export.trt import GRAPH_NAMES, build_engines

    m = MODELS[model]
    section = build_engines(
        work / model / "artifact",
        precision="fp16",
        max_frames=m["frames"],
        max_seq=m["max_seq"],
        graphs=graphs or GRAPH_NAMES,
        progress=False,
    )
    built = {g: section["engines"][g]["build_s"] for g in (graphs or GRAPH_NAMES)}
    gb = {g: round(section["engines"][g]["bytes"] / 1e9, 2) for g in built}
    return {"build_s": built, "engine_gb": gb, "summary": f"build s {built}"}


def step_parity(model: str, work: Path) -> dict[str, Any]:
    """Each engine vs its PyTorch stage (GPU, same inputs); tokens too on `small`."""
    import torch

    from trace_rt.backends.tensorrt_backend import TensorRTBackend
    from trace_rt.model import load_model
    from trace_rt.tokens import Head

    m = MODELS[model]
    art = work / model / "artifact"
    backend = TensorRTBackend(art, verify="size", cuda_graphs=0)
    tm = load_model(work / model / "ckpt", dtype=m["torch_dtype"], device="cuda")
    cfg = tm.config
    g = torch.Generator().manual_seed(7)
    px = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tid = torch.randint(0, cfg.time_vocab_size, (3, 6), generator=g)
    x = torch.randn(1, 9, cfg.hidden_size, generator=g) * 0.02
    err = {}
    with torch.no_grad():
        dtype = next(tm.parameters()).dtype
        want = tm.project(tm.encode_frames(px.cuda().to(dtype)), tid.cuda()).float().cpu()
        got = backend.video_to_host(backend.encode_video(px.numpy(), tid.numpy()))
        err["vision_encoder+projector"] = _rel(got, want.numpy())
        tm.setup_caches(64)
        want_l = [tm.all_logits(tm.prefill(x.cuda().to(dtype)))]
        got_l = [backend.prefill([-201], x[0].numpy(), Head.TEXT)]
        for i, token in enumerate([32005, 1234, 32020]):
            pos = torch.tensor([9 + i], device="cuda")
            want_l.append(
                tm.all_logits(tm.decode_step(torch.tensor([[token]], device="cuda"), pos))
            )
            got_l.append(backend.decode_step(token, Head.TEXT))
    text = cfg.ids.text_vocab + 1
    want_np = torch.cat(want_l)[:, :text].float().cpu().numpy()
    err["decoder"] = _rel(np.stack(got_l), want_np)
    bounds = {"vision_encoder+projector": RTOL_FP16["projector"], "decoder": RTOL_FP16["decoder"]}
    ok = all(err[k] <= bounds[k] for k in err)
    data: dict[str, Any] = {"rel_error": err, "bounds": bounds, "torch_dtype": m["torch_dtype"]}
    del tm, backend
    torch.cuda.empty_cache()
    if model == "small":
        data["tokens"] = _tokens(work, art)
        ok = ok and data["tokens"]["tensorrt_vs_onnxruntime_equal"]
    summary = ", ".join(f"{k} {v:.1e} (<= {bounds[k]})" for k, v in err.items())
    if "tokens" in data:
        summary += f"; tokens {data['tokens']['summary']}"
    return data | {"status": "ok" if ok else "failed", "summary": summary}


def _tokens(work: Path, art: Path) -> dict[str, Any]:
    """Greedy tokens for the three tasks: TensorRT vs onnxruntime (fp16 graphs) vs torch."""
    from tests.media import write_video
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    video = work / "clip.mp4"
    write_video(video, width=320, height=240, fps=10, n_frames=80)
    import onnxruntime as ort

    ort_dev = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    pipes = {
        "tensorrt": Pipeline.from_dir(art, "tensorrt", device="cuda", verify="size"),
        "onnxruntime": Pipeline.from_dir(art, "onnxruntime", device=ort_dev, verify="size"),
        "torch_fp32": Pipeline.from_dir(work / "small" / "ckpt", "torch", device="cuda"),
    }
    gen = GenerationConfig(max_new_tokens=64)
    out: dict[str, Any] = {"onnxruntime_device": ort_dev, "tasks": {}}
    for task in ("dvc", "mr", "vhd"):
        query = None if task == "dvc" else "a red circle moves left"
        ids = {k: p.run(video, task, query=query, gen=gen)["token_ids"] for k, p in pipes.items()}
        out["tasks"][task] = {
            "trt_vs_ort_first_diff": _first_diff(ids["tensorrt"], ids["onnxruntime"]),
            "trt_vs_torch_fp32_first_diff": _first_diff(ids["tensorrt"], ids["torch_fp32"]),
            "n": len(ids["tensorrt"]),
        }
    out["tensorrt_vs_onnxruntime_equal"] = all(
        t["trt_vs_ort_first_diff"] is None for t in out["tasks"].values()
    )
    out["summary"] = "; ".join(
        f"{k}: ort {v['trt_vs_ort_first_diff'] or '='}, torch-fp32 "
        f"{v['trt_vs_torch_fp32_first_diff'] or '='}"
        for k, v in out["tasks"].items()
    )
    return out


def step_timing(model: str, work: Path, which: str) -> dict[str, Any]:
    """Vision+projector at max frames; prefill; decode step with/without CUDA graphs."""
    from trace_rt.backends.tensorrt_backend import TensorRTBackend
    from trace_rt.tokens import Head

    m = MODELS[model]
    art = work / model / "artifact"
    data: dict[str, Any] = {}
    if which == "video":  # only the video engines exist yet: time them directly
        data["video_ms"] = _time_video_engines(art, m["frames"])
        return data | {"summary": f"vision+projector {m['frames']} frames: {data['video_ms']}"}
    b = TensorRTBackend(art, verify="size", cuda_graphs=0)
    c = b.config
    rng = np.random.default_rng(0)
    px = rng.standard_normal((m["frames"], 3, c.vision.image_size, c.vision.image_size), np.float32)
    tid = np.full((m["frames"], 6), 3, np.int64)
    if which == "all":
        data["video_ms"] = _stats([_timed(lambda: b.encode_video(px, tid), b) for _ in range(8)])
    video = b.encode_video(px, tid)
    prompt = [1, 733, 16289, 28793, *([28705] * 40), -201, 13, *([1014] * 20)]
    data["prefill_positions"] = len(prompt) - 1 + video.rows
    data["prefill_ms"] = _stats(
        [_timed(lambda: b.prefill(prompt, video, Head.TEXT), b) for _ in range(5)]
    )
    steps = 64
    for label, capacity in (("decode_ms", 0), ("decode_cuda_graph_ms", 256)):
        b.past_graphs.capacity = capacity  # same engines, with and without decode-step graphs
        for _ in range(3):  # request 1 sees each length, 2 captures, 3 replays
            b.prefill(prompt, video, Head.TEXT)
            times = [_timed(lambda: b.decode_step(32001, Head.TIME), b) for _ in range(steps)]
        data[label] = _stats(times)
    weights = sum(f.stat().st_size for f in art.glob("decoder.onnx*"))
    kv_per_pos = 2 * c.num_hidden_layers * c.num_key_value_heads * c.attn_head_dim * 2
    bw = next((v for k, v in HBM if k in b.gpu["name"]), None)
    read = weights + kv_per_pos * (data["prefill_positions"] + steps // 2)
    data["decode_floor"] = {
        "bytes_per_step": read,
        "hbm_bytes_per_s": bw,
        "floor_ms": round(read / bw * 1e3, 3) if bw else None,
        "note": "decoder weights + KV cache read once per step at HBM bandwidth",
    }
    med = data["decode_ms"]["median"]
    floor = data["decode_floor"]["floor_ms"]
    summary = f"decode {med:.2f} ms/token (graphs {data['decode_cuda_graph_ms']['median']:.2f})"
    if floor:
        summary += f", floor {floor:.2f} ms ({floor / med:.0%} of peak)"
    if "video_ms" in data:
        summary = f"vision+projector {data['video_ms']['median']:.1f} ms; " + summary
    return data | {"summary": summary}


def _time_video_engines(art: Path, frames: int) -> dict[str, float]:
    """vision encoder + projector at *frames* frames, run directly on their engines.

    Used before the decoder engine exists (a backend needs all three); the input buffers
    hold whatever cudaMalloc returned, which does not change the kernels' run time.
    """
    import tensorrt as trt

    from trace_rt.backends import cuda_rt

    manifest = json.loads((art / "manifest.json").read_text())
    engines = manifest["tensorrt"]["engines"]
    stream = cuda_rt.Stream()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    bufs: dict[str, cuda_rt.DeviceBuffer] = {}
    keep, ctxs = [], []
    for graph in ("vision_encoder", "projector"):
        engine = runtime.deserialize_cuda_engine((art / engines[graph]["file"]).read_bytes())
        ctx = engine.create_execution_context()
        for spec in manifest["graphs"][graph]["inputs"]:
            ctx.set_input_shape(
                spec["name"], [frames if isinstance(d, str) else d for d in spec["shape"]]
            )
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if name not in bufs:  # shared by name: features flow from one engine to the next
                elems = int(np.prod(tuple(ctx.get_tensor_shape(name))))
                bufs[name] = cuda_rt.DeviceBuffer(elems * 8)  # 8 bytes: any element type
            ctx.set_tensor_address(name, bufs[name].ptr)
        keep.append(engine)
        ctxs.append(ctx)

    def run() -> None:
        for ctx in ctxs:
            if not ctx.execute_async_v3(stream.handle):
                raise RuntimeError("enqueue failed")
        stream.synchronize()

    run()  # warm-up
    times = []
    for _ in range(8):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return _stats(times)


def _timed(fn: Any, backend: Any) -> float:
    t = time.perf_counter()
    fn()
    backend.synchronize()
    return (time.perf_counter() - t) * 1e3


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"median": round(float(np.median(a)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "min": round(float(a.min()), 3), "n": len(ms)}  # fmt: skip


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="every step, within a budget, then the report")
    r.add_argument("--work", type=Path, required=True, help="scratch dir (~50 GB for 7B)")
    r.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    r.add_argument("--budget-min", type=float, default=28.0)
    r.add_argument("--skip-7b", action="store_true")
    s = sub.add_parser("step", help="one step (run by `run` in a subprocess)")
    s.add_argument("name")
    s.add_argument("--work", type=Path, required=True)
    args = p.parse_args(argv)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    if args.command == "run":
        run_all(args.work, args.results, args.budget_min * 60, args.skip_7b)
    else:
        step(args.name, args.work)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
