"""``trace-rt plan``: arithmetic checked by hand, the device table, suggestions, and the
planned peak RSS against a measured one on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from trace_rt.devices import (
    DEVICES,
    JETSON_OS_RESERVED_GB,
    Device,
    get_device,
    runtime_baseline_bytes,
)
from trace_rt.edge_cli import render_plan as render
from trace_rt.errors import InputError
from trace_rt.plan import (
    MARGIN,
    Settings,
    floors,
    linear_params,
    memory,
    plan,
    suggest,
    weights,
)
from trace_rt.presets import load_preset

H100 = DEVICES["h100-80gb"]


def test_trace7b_arithmetic_by_hand():
    cfg = load_preset("trace-7b")
    # One Mistral-7B layer: q 4096x4096, k and v 4096x1024, o 4096x4096, MLP 3x4096x14336,
    # two RMSNorms of 4096 = 218,112,000 weights; 32 layers = 6,979,584,000.
    layer = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    assert layer == 218_112_000
    heads = 4096 * (32000 + 1 + 13 + 13)  # lm_head + sync + time + score
    fp16 = weights(cfg, H100, Settings(precision="fp16"))
    assert fp16["decoder"] == 2 * (32 * layer + 4096 + heads) == 14_221_541_376
    # int4: linear weights at 0.5 B + an fp16 scale per 32 (0.5625 B); norms, heads fp16.
    int4 = weights(cfg, H100, Settings(precision="int4"))
    linear = 32 * (layer - 2 * 4096)
    assert int4["decoder"] == linear * 0.5625 + 2 * (32 * 2 * 4096 + 4096 + heads)
    assert round(int4["decoder"] / 1e9, 3) == 4.189
    assert int4["embeddings (host)"] == 32027 * 4096 * 2  # unified ids x hidden, fp16
    # CPU: MatMulNBits keeps a scale per 32 weights in the graph's fp32 (int4 0.625 B, int8
    # 1.125 B per weight), norms and heads fp32: the trace-7b export wrote 4,892,094,466
    # bytes of int4 decoder and 8,381,755,518 of int8 (benchmarks/results/trace7b-*.md).
    cpu = Device("cpu", 24, 20, True, 10, 0.1, False, "test", 75e6)
    floats = 4 * (32 * 2 * 4096 + 4096 + heads)
    for precision, per, written in (("int4", 0.625, 4_892_094_466), ("int8", 1.125, 8_381_755_518)):
        w = weights(cfg, cpu, Settings(precision=precision))["decoder"]
        assert w == linear * per + floats
        assert abs(w / written - 1) < 0.001  # the files add names and external-data padding
        # Loaded, MatMulNBits also holds a block sum and a copy of the scale per block (fp32
        # each; the file's scales stay mapped): trace-7b's int4 session measured RssAnon
        # 5,549 MiB = packed data + 2 x 832 MiB + lm_head 500 MiB (+ 49 baseline).
        items = memory(cfg, cpu, Settings(precision=precision, frames=16))["items"]
        assert items["weights: decoder, prepacked blocks"] == linear / 32 * 8
    fp32 = memory(cfg, cpu, Settings(precision="fp32", frames=16))["items"]
    assert "weights: decoder, prepacked blocks" not in fp32
    gpu = memory(cfg, H100, Settings(precision="int4", frames=16))["items"]
    assert "weights: decoder, prepacked blocks" not in gpu
    m = memory(cfg, H100, Settings(precision="int4", frames=128, max_new_tokens=512))
    # 128 frames x (8 slots + 6 time tokens) + 161 text (the dvc prompt) = 1953; + 512 new
    # = 2465 positions, each 2 (K, V) x 32 layers x 8 KV heads x 128 x 2 B = 128 KiB.
    assert m["positions"] == {"prompt": 1953, "context": 2465}
    assert m["items"]["kv cache"] == 2465 * 131072
    # Discrete GPU: device memory counts; the host side is reported, not counted.
    assert m["counted_bytes"] == m["device_bytes"] and not H100.unified
    # Decode floor: int4 weights + the KV of the whole prompt, read once per token.
    fl = floors(cfg, H100, Settings(precision="int4", frames=128, max_new_tokens=1))
    step_bytes = int4["decoder"] + (1953 + 1) * 131072
    assert fl["decode_step"] == pytest.approx(1e3 * step_bytes / 3350e9, rel=1e-3)


def test_unified_memory_counts_host_and_device():
    cfg = load_preset("trace-7b")
    s = Settings(precision="int4", frames=32, max_new_tokens=256)
    nano = memory(cfg, DEVICES["orin-nano-8gb"], s)
    assert nano["counted_bytes"] == nano["device_bytes"] + nano["host_bytes"]
    assert nano["usable_bytes"] == pytest.approx((8 - JETSON_OS_RESERVED_GB) * 1e9)
    assert nano["fits"] == (nano["counted_bytes"] <= nano["usable_bytes"] * (1 - MARGIN))
    two = memory(cfg, DEVICES["agx-orin-64gb"], replace(s, concurrency=2))
    one = memory(cfg, DEVICES["agx-orin-64gb"], s)
    # Everything but the process runtime is per instance.
    runtime = one["items"]["runtime: device"] + one["items"]["runtime: host"]
    assert two["counted_bytes"] - runtime == pytest.approx(2 * (one["counted_bytes"] - runtime))


def test_device_table():
    assert set(DEVICES) == {
        "orin-nano-8gb", "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb",
        "l4", "a10g", "l40s", "a100-80gb", "h100-80gb",
    }  # fmt: skip
    for d in DEVICES.values():
        assert d.source and 0 < d.usable_gb < d.memory_gb and d.gbps > 0 and d.tflops > 0
        assert d.gpu and d.unified == d.name.startswith(("orin", "agx"))
    assert DEVICES["orin-nano-8gb"].gbps == 68 and DEVICES["agx-orin-64gb"].gbps == 204.8
    assert DEVICES["orin-nano-8gb"].usable_gb == pytest.approx(5.2)
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        get_device("tpu")
    cpu = get_device("cpu", gbps=20.0, tflops=0.5)
    assert not cpu.gpu and cpu.unified and cpu.gbps == 20.0 and 0 < cpu.usable_gb <= cpu.memory_gb
    with pytest.raises(InputError, match="fp32"):
        memory(load_preset("tiny"), H100, Settings(precision="fp32"))
    with pytest.raises(InputError, match="not fp16"):
        memory(load_preset("tiny"), cpu, Settings(precision="fp16"))


def test_suggestions():
    cfg = load_preset("trace-7b")
    s = Settings(precision="fp16", frames=128, max_new_tokens=512)
    # 7B + CLIP-L at int4 is ~4.8 GB of weights alone: nothing fits 5.2 GB with the runtime.
    nano = plan(cfg, DEVICES["orin-nano-8gb"], s)
    assert not nano["memory"]["fits"] and nano["suggestions"] == []
    assert "DOES NOT FIT" in render(nano) and "none: this model" in render(nano)
    # Orin NX 16 GB: fp16 (14 GB of decoder) never fits; int4 keeps 96 frames, int8 48
    # (the video stage holds sampled frames at model size, not the source's).
    nx = DEVICES["orin-nx-16gb"]
    got = suggest(cfg, nx, s)
    assert [(g["precision"], g["frames"], g["max_new_tokens"]) for g in got] == [
        ("int4", 96, 256), ("int8", 48, 128),
    ]  # fmt: skip
    nxt = {48: 64, 96: 128}
    for g in got:  # each fits, and is the most frames that fit its precision
        cand = replace(
            s, precision=g["precision"], frames=g["frames"], max_new_tokens=g["max_new_tokens"]
        )
        assert memory(cfg, nx, cand)["fits"]
        more = replace(cand, frames=nxt[g["frames"]], max_new_tokens=128)
        assert not memory(cfg, nx, more)["fits"]
        assert g["decode_tokens_per_s_floor"] > 0
    assert not memory(cfg, nx, replace(s, frames=8, max_new_tokens=128))["fits"]  # fp16
    # AGX Orin 32 GB takes all three at 128 frames, best (highest) precision first.
    agx = suggest(cfg, DEVICES["agx-orin-32gb"], s)
    assert [(g["precision"], g["frames"]) for g in agx] == [
        ("fp16", 128), ("int8", 128), ("int4", 128),
    ]  # fmt: skip


def test_cli_plan():
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trace_rt", "plan", *args],
                              capture_output=True, text=True)  # fmt: skip

    out = cli("--preset", "trace-7b", "--device", "orin-nano-8gb")
    assert out.returncode == 1 and "DOES NOT FIT" in out.stdout and "int4, 128 frames" in out.stdout
    out = cli("--preset", "trace-7b", "--device", "agx-orin-64gb", "--frames", "64", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["memory"]["fits"] and result["memory"]["settings"]["frames"] == 64
    assert result["floor_ms"]["decode_step"] > 0
    out = cli("--preset", "nope", "--device", "l4")
    assert out.returncode == 2 and "unknown preset 'nope'" in out.stderr


def test_decode_step_engine_is_a_second_copy_of_the_decoder(tiny_art, tmp_path):
    """The TensorRT decode step (one CUDA graph per step) is an engine of its own: the plan
    counts its weights again; on an Orin NX it turns trace-7b int4 at 64 frames from
    fitting into not fitting."""
    cfg = load_preset("trace-7b")
    nx = DEVICES["orin-nx-16gb"]
    s = Settings(precision="int4", frames=64, max_new_tokens=512)
    plain, step = memory(cfg, nx, s), memory(cfg, nx, replace(s, decode_step=True))
    w = weights(cfg, nx, s)["decoder"]
    assert step["items"]["weights: decoder step"] == w
    # One query over the whole context: heads x positions fp32 scores, one row of
    # activations, the logits.
    act = step["items"]["activations: decoder step"]
    row = (4 * 4096 + 2 * 1024 + 3 * 14336) * 2
    assert act == row + 32 * 1569 * 8 + 32027 * 4  # 64 x 14 + 161 + 512 positions
    assert step["counted_bytes"] == pytest.approx(plain["counted_bytes"] + w + act)
    assert plain["fits"] and not step["fits"]
    result = plan(cfg, nx, replace(s, decode_step=True))
    assert result["without_decode_step"]["fits"] is True
    assert result["without_decode_step"]["margin_gb"] == 3.11
    assert "without the decode step engine (export trt --no-step): fits" in render(result)
    assert "without_decode_step" not in plan(cfg, nx, s)
    # The fixed-past decoder (export trt --fixed-past): one decoder engine that is its own
    # step; its prefill scores 1569 queries against 1568 masked + 1569 new keys and writes
    # its new rows to a buffer of the cache's size first.
    assert result["without_decode_step"]["fixed_past"] == {"fits": True, "margin_gb": 2.27}
    fixed = memory(cfg, nx, replace(s, fixed_past=True))
    assert "weights: decoder step" not in fixed["items"]
    n, kv_pos = 1569, 2 * 32 * 8 * 128 * 2
    extra = 32 * n * (n - 1) * 8  # the masked keys' scores and softmax, fp32
    assert fixed["items"]["activations: decoder"] == plain["items"]["activations: decoder"] + extra
    assert fixed["items"]["activations: decoder prefill rows"] == n * kv_pos
    # Floors: a fixed-past step scores and reads the whole cache (1569 positions) at every
    # step; the fixed-past prefill also scores the 1568 masked slots.
    for cand in (replace(s, decode_step=True), replace(s, fixed_past=True)):
        fl = floors(cfg, nx, cand)
        assert fl["decode_step"] == pytest.approx(1e3 * (w + n * kv_pos) / 102.4e9, rel=1e-3)
    base = floors(cfg, nx, s)["inputs"]["prefill_gflop"]
    more = floors(cfg, nx, replace(s, fixed_past=True))["inputs"]["prefill_gflop"]
    q = 32 * 128
    assert more - base == pytest.approx(32 * 2 * 2 * q * 1057 * 1568 / 1e9)  # prompt x masked
    with pytest.raises(InputError, match="fixed-past decoder is its own decode step"):
        memory(cfg, nx, replace(s, fixed_past=True, decode_step=True))
    assert all(x["frames"] < 64 for x in suggest(cfg, nx, replace(s, decode_step=True)))
    with pytest.raises(InputError, match="decode step engine is TensorRT's"):
        memory(cfg, get_device("cpu"), Settings(precision="fp32", decode_step=True))
    # The CLI counts it when the artifact has one (`export step`), or when asked.
    import shutil

    art = shutil.copytree(tiny_art, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["decode_step"] = {"max_seq": 384}  # what `python -m export step` records
    (art / "manifest.json").write_text(json.dumps(manifest))
    for model, args, want in [
        (tiny_art, (), False),
        (art, (), True),
        (art, ("--no-decode-step",), False),
        (tiny_art, ("--decode-step",), True),
    ]:
        out = subprocess.run(
            [sys.executable, "-m", "trace_rt", "plan", "--model", str(model), "--device",
             "orin-nx-16gb", "--json", *args],
            capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        items = json.loads(out.stdout)["memory"]["items"]
        assert ("weights: decoder step" in items) is want, (model, args)


def test_built_engines_plan_what_the_backend_allocates(tiny_art, tmp_path):
    """With engines built, the plan counts what the TensorRT backend allocates at load: the
    engine files, a KV pool and activations for the build's limits, not the request's."""
    import shutil

    from tests.fake_tensorrt import fake_engines
    from trace_rt.bench.floor import kv_bytes_per_position
    from trace_rt.config import TraceConfig
    from trace_rt.plan import activations, built_engines

    art = shutil.copytree(tiny_art, tmp_path / "art")
    assert built_engines(art) is None
    fake_engines(art, max_frames=8, max_seq=512)
    built = built_engines(art)
    section = json.loads((art / "manifest.json").read_text())["tensorrt"]
    assert (built.max_frames, built.max_seq, built.precision, built.itemsize) == (8, 512, "fp32", 4)
    cfg, agx = TraceConfig.from_dir(art), DEVICES["agx-orin-32gb"]
    s = Settings(precision="fp32", frames=4, max_new_tokens=16, built=built)
    m = memory(cfg, agx, s)
    assert m["items"]["weights: decoder"] == section["engines"]["decoder"]["bytes"]
    assert m["items"]["kv cache"] == 512 * kv_bytes_per_position(cfg, 4)  # not the context
    assert m["positions"]["context"] < 512
    assert m["items"]["activations: decoder"] == activations(cfg, agx, 8, 512, 4)["decoder"]
    assert m["fits"] and m["exceeds_engines"] == []
    # A request the engines cannot take does not fit, whatever the memory.
    big = memory(cfg, agx, replace(s, frames=16, max_new_tokens=600))
    assert not big["fits"] and len(big["exceeds_engines"]) == 2
    text = render(plan(cfg, agx, replace(s, frames=16)))
    assert "16 frames > the engines' --max-frames 8" in text

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trace_rt", "plan", "--model", str(art),
                               "--device", "agx-orin-32gb", *args],
                              capture_output=True, text=True)  # fmt: skip

    out = cli("--frames", "4", "--json")  # 512 new tokens: past the engines' context
    assert out.returncode == 1 and "729 positions > the engines' --max-seq 512" in out.stdout
    out = cli("--frames", "4", "--max-new-tokens", "16", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["memory"]
    assert got["weights_from"] == "engine files" and got["settings"]["precision"] == "fp32"
    assert got["items"]["kv cache"] == m["items"]["kv cache"]
    out = cli("--precision", "int4")
    assert out.returncode == 2 and "the engines are fp32, without the decode step" in out.stderr
    # A fixed-past build is planned as one: its decoder record says so.
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["tensorrt"]["engines"]["decoder"]["fixed"] = {"past": 511}
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert built_engines(art).fixed_past
    out = cli("--frames", "4", "--max-new-tokens", "16", "--json")
    assert json.loads(out.stdout)["memory"]["settings"]["fixed_past"] is True
    assert "activations: decoder prefill rows" in json.loads(out.stdout)["memory"]["items"]


def _measured_peak_rss(model: str, video: str, frames: int, tokens: int) -> float:
    """Peak RSS (bytes) of a fresh process serving one request with onnxruntime on CPU."""
    code = (
        "import sys\n"
        "from trace_rt.generate import GenerationConfig\n"
        "from trace_rt.pipeline import Pipeline\n"
        f"p = Pipeline.from_dir({model!r}, 'onnxruntime')\n"
        f"gen = GenerationConfig(max_new_tokens={tokens}, ignore_eos=True)\n"
        f"p.run({video!r}, 'dvc', frames={frames}, gen=gen)\n"
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
    )
    # The first load of an artifact writes onnxruntime's optimised-graph cache (a one-off
    # transient); the plan is for a serving process, so measure the second.
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    return int(out.stdout.strip()) * 1024


def _check_planned_vs_measured(art, video, frames: int, tokens: int) -> None:
    import av

    from trace_rt.config import TraceConfig

    cfg = TraceConfig.from_dir(art)
    with av.open(str(video)) as c:
        size = (c.streams.video[0].height, c.streams.video[0].width)
    # This machine's runtime baseline is measured (it moves with the install), the rest is
    # the planner's arithmetic.
    cpu = Device("cpu", 24, 20, True, 10, 0.1, False, "test", runtime_baseline_bytes())
    s = Settings(precision="fp32", frames=frames, max_new_tokens=tokens, source_size=size)
    planned = memory(cfg, cpu, s)["counted_bytes"]
    measured = _measured_peak_rss(str(art), str(video), frames, tokens)
    assert abs(planned - measured) <= 0.15 * measured, (planned / 1e6, measured / 1e6)


@pytest.fixture(scope="module")
def tiny_art(tiny_ckpt, tmp_path_factory):
    from export import export_onnx

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("plan") / "tiny", progress=False)


def test_planned_vs_measured_rss_tiny(tiny_art, clip_video):
    _check_planned_vs_measured(tiny_art, clip_video, frames=8, tokens=32)


@pytest.mark.slow
def test_planned_vs_measured_rss_small(tmp_path, clip_video):
    # small has ~500x tiny's weights: this checks the sums, not the measured baselines.
    from export import export_onnx
    from training.make_checkpoint import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "small", "small", seed=0, progress=False)
    art = export_onnx(ckpt, tmp_path / "art", progress=False)
    _check_planned_vs_measured(art, clip_video, frames=16, tokens=32)


def _cpu_plan_memory(model: Path, *args: str) -> dict:
    """`trace-rt plan --model MODEL --device cpu --json ARGS` (fixed peaks): its memory part;
    fits or not (exit 0 or 1), never an error."""
    out = subprocess.run([sys.executable, "-m", "trace_rt", "plan", "--model", str(model),
                          "--device", "cpu", "--peak-gbps", "10", "--peak-tflops", "0.1",
                          "--json", *args], capture_output=True, text=True)  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)["memory"]


def test_quantised_lm_head_by_hand():
    # trace-7b int4 on the CPU with lm_head in int8 (`export optimize`'s default): the head's
    # 4096 x 32000 weights at MatMulNBits' 1.125 B instead of fp32's 4 B, and prepacked too.
    cfg = load_preset("trace-7b")
    cpu = Device("cpu", 24, 20, True, 10, 0.1, False, "test", 75e6)
    lm = 4096 * 32000
    plain = Settings(precision="int4", frames=16)
    head8 = replace(plain, lm_head="int8")
    w, w8 = weights(cfg, cpu, plain)["decoder"], weights(cfg, cpu, head8)["decoder"]
    assert w - w8 == lm * (4 - 1.125)
    packed = memory(cfg, cpu, head8)["items"]["weights: decoder, prepacked blocks"]
    assert packed - memory(cfg, cpu, plain)["items"]["weights: decoder, prepacked blocks"] == (
        lm / 32 * 8
    )
    assert floors(cfg, cpu, head8)["decode_step"] < floors(cfg, cpu, plain)["decode_step"]
    # A float decoder has no quantised head; suggestions keep it for int8/int4 only.
    with pytest.raises(InputError, match="belongs to an int8 or int4 decoder"):
        memory(cfg, cpu, replace(head8, precision="fp32"))
    with pytest.raises(InputError, match="unknown lm_head precision"):
        memory(cfg, cpu, replace(head8, lm_head="fp8"))
    assert suggest(cfg, cpu, replace(head8, frames=128))


def test_plan_reads_the_artifacts_lm_head(tiny_art, tmp_path):
    """An artifact's int4 decoder made with an int8 lm_head is planned with it, and its
    planned bytes are the variant file's."""
    import shutil

    from export.quantize import quantize_artifact

    art = shutil.copytree(tiny_art, tmp_path / "art")
    quantize_artifact(art, 4, forms=("nbits",), lm_head=8)

    def cli(*args: str) -> dict:
        return _cpu_plan_memory(art, *args)

    got = cli("--precision", "int4")
    assert got["settings"]["lm_head"] == "int8"
    planned = got["items"]["weights: decoder"]
    written = (art / "decoder.int4.onnx").stat().st_size
    assert abs(planned / written - 1) < 0.05, (planned, written)  # names and graph overhead
    assert cli("--precision", "int4", "--lm-head", "float")["settings"]["lm_head"] is None
    assert cli("--precision", "fp32")["settings"]["lm_head"] is None
    out = subprocess.run([sys.executable, "-m", "trace_rt", "plan", "--model", str(art), "--device",
                          "cpu", "--peak-gbps", "10", "--peak-tflops", "0.1", "--lm-head", "int8"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "belongs to an int8 or int4 decoder, not fp32" in out.stderr


def test_block_size_by_hand():
    # trace-7b int4 on the CPU at blocks of 128 instead of 32: a quarter of the fp32 scales
    # in the file (4 B per block) and of the prepacked extras (8 B per block).
    cfg = load_preset("trace-7b")
    cpu = Device("cpu", 24, 20, True, 10, 0.1, False, "test", 75e6)
    b32 = Settings(precision="int4", frames=16, lm_head="int8")
    b128 = replace(b32, block_size=128)
    linear = linear_params(cfg) + 4096 * 32000  # the layers' and the int8 lm_head's
    w32, w128 = weights(cfg, cpu, b32)["decoder"], weights(cfg, cpu, b128)["decoder"]
    assert w32 - w128 == pytest.approx(linear * (4 / 32 - 4 / 128))
    item = "weights: decoder, prepacked blocks"
    assert memory(cfg, cpu, b128)["items"][item] == pytest.approx(linear / 128 * 8)
    assert floors(cfg, cpu, b128)["decode_step"] < floors(cfg, cpu, b32)["decode_step"]
    with pytest.raises(InputError, match="block size must be one of"):
        memory(cfg, cpu, replace(b32, block_size=48))


def test_plan_reads_the_artifacts_block_size(tiny_art, tmp_path):
    """An artifact quantised at blocks of 128 is planned at 128 (its file's bytes) unless
    --block-size says otherwise."""
    import shutil

    from export.quantize import quantize_artifact

    art = shutil.copytree(tiny_art, tmp_path / "art")
    quantize_artifact(art, 4, forms=("nbits",), block_size=128)

    def cli(*args: str) -> dict:
        return _cpu_plan_memory(art, "--precision", "int4", *args)

    got = cli()
    assert got["settings"]["block_size"] == 128
    planned = got["items"]["weights: decoder"]
    written = (art / "decoder.int4.onnx").stat().st_size
    assert abs(planned / written - 1) < 0.05, (planned, written)
    forced = cli("--block-size", "32")
    assert forced["settings"]["block_size"] == 32
    assert forced["items"]["weights: decoder"] > planned


@pytest.mark.parametrize("content", [b"\xff\xfe not json", b"[1, 2]", b"null"])
def test_unreadable_manifest_is_planned_as_a_checkpoint(tiny_ckpt, tmp_path, content):
    """A --model directory whose manifest.json is garbage plans from its config alone."""
    import shutil

    from trace_rt.plan import built_engines, manifest_records

    model = shutil.copytree(tiny_ckpt, tmp_path / "m")
    (model / "manifest.json").write_bytes(content)
    assert manifest_records(model) == {} and built_engines(model) is None
    assert _cpu_plan_memory(model, "--precision", "int4")["settings"]["lm_head"] is None
