"""ONNX export and the onnxruntime backend: graph parity (tiny, small), tokens, artifacts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import export_onnx
from trace_rt.backends import onnxruntime_backend as ort_backend
from trace_rt.backends.onnxruntime_backend import OnnxRuntimeBackend
from trace_rt.errors import CheckpointError, InputError
from trace_rt.generate import GenerationConfig
from trace_rt.graphs import (
    DECODER,
    EXTERNAL_DATA_THRESHOLD,
    GRAPH_NAMES,
    KV_CACHE,
    MANIFEST_FILE,
    PROJECTOR,
    VISION_ENCODER,
    kv_names,
    load_manifest,
)
from trace_rt.model import load_model
from trace_rt.pipeline import Pipeline
from trace_rt.tokens import Head

QUERY = "a red circle moves left"
BUDGET = 48
TRT_OPS = Path(__file__).parents[1] / "export" / "trt_ops.txt"
# fp16 graphs vs the fp32 PyTorch stages (onnxruntime CPU runs fp16 kernels or upcasts).
RTOL_FP16 = {VISION_ENCODER: 5e-3, PROJECTOR: 5e-3, DECODER: 2e-2}
# bf16 graphs (run by onnx's reference evaluator: onnxruntime's CPU EP has no bf16
# kernels) vs the fp32 PyTorch stages. Measured on tiny: 8e-3, 1.7e-2, 4e-3.
RTOL_BF16 = {VISION_ENCODER: 3e-2, PROJECTOR: 5e-2, DECODER: 3e-2}
# Decode-step ids for the graph parity checks: time, text, text <sync>, score.
DECODE_IDS = [32005, 1234, 32000, 32020]


@pytest.fixture(scope="module")
def artifacts(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    return {
        dt: export_onnx(tiny_ckpt, root / f"tiny-{dt}", dtype=dt, progress=False)
        for dt in ("fp32", "fp16")
    }


@pytest.fixture(scope="module")
def torch_model(tiny_ckpt):
    return load_model(tiny_ckpt, dtype="fp32")


def _backend(path: Path) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(path, cache_dir=False)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def _graph_outputs(backend: OnnxRuntimeBackend, model, frames: int = 3):
    """Each graph and its PyTorch stage on the same inputs, at sizes unlike the export's."""
    cfg = model.config
    g = torch.Generator().manual_seed(7)
    px = torch.randn(frames, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tid = torch.randint(0, cfg.time_vocab_size, (frames, 6), generator=g)
    pairs = {}
    with torch.no_grad():
        feats = model.encode_frames(px)
        (got,) = backend.sessions[VISION_ENCODER].run(None, {"pixel_values": px.numpy()})
        pairs[VISION_ENCODER] = (got, feats.numpy())
        video = model.project(feats, tid)
        f_in = feats.numpy().astype(backend.dtype)
        (got,) = backend.sessions[PROJECTOR].run(None, {"features": f_in, "time_ids": tid.numpy()})
        pairs[PROJECTOR] = (got, video.numpy())
        # Decoder through the backend's preallocated cache: a 9-position prefill from an
        # empty cache (zero-size past), then single-id steps through all three heads.
        x = torch.randn(1, 9, cfg.hidden_size, generator=g)
        model.setup_caches(32)
        want = [model.all_logits(model.prefill(x))]
        logits = [backend.prefill([-201], x[0].numpy(), Head.TEXT)]
        for step, token in enumerate(DECODE_IDS):
            hidden = model.decode_step(torch.tensor([[token]]), torch.tensor([9 + step]))
            want.append(model.all_logits(hidden))
            logits.append(backend.decode_step(token, Head.TEXT))
        text = cfg.ids.text_vocab + 1
        pairs[DECODER] = (np.stack(logits), torch.cat(want)[:, :text].numpy())
        # The graph's key.{i}/value.{i} outputs, as written into the buffers: the model's
        # cache (post-RoPE K, and V), which is head-major [1, kv, seq, hd].
        n = backend.kv.length
        got_kv, want_kv = [], []
        for i, layer in enumerate(model.model.layers):
            cache = layer.self_attn.kv_cache
            got_kv += backend.kv.numpy(i)
            want_kv += [c[:, :, :n].transpose(1, 2).numpy() for c in (cache.k, cache.v)]
        pairs[f"{DECODER}:kv"] = (np.stack(got_kv), np.stack(want_kv))
    return pairs


def _spec(backend: OnnxRuntimeBackend, pair_name: str):
    return backend.specs[pair_name.partition(":")[0]]


def test_graphs_match_torch_fp32(artifacts, torch_model):
    backend = _backend(artifacts["fp32"])
    for name, (got, want) in _graph_outputs(backend, torch_model).items():
        assert got.shape == want.shape, name
        rtol = _spec(backend, name).rtol_fp32
        assert _rel(got, want) <= rtol, f"{name}: rel. error {_rel(got, want):.2e} > {rtol}"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """A random-weight `small` checkpoint and its fp32 export (about 20 s on 2 cores)."""
    from training.make_checkpoint import make_checkpoint

    root = tmp_path_factory.mktemp("small")
    ckpt = make_checkpoint(root / "ckpt", "small", seed=0, progress=False)
    return ckpt, export_onnx(ckpt, root / "artifact", progress=False)


@pytest.mark.slow
def test_small_graphs_match_torch_fp32(small):
    ckpt, art = small
    backend = _backend(art)
    for name, (got, want) in _graph_outputs(
        backend, load_model(ckpt, dtype="fp32"), frames=2
    ).items():
        assert got.shape == want.shape, name
        rtol = _spec(backend, name).rtol_fp32
        assert _rel(got, want) <= rtol, f"{name}: rel. error {_rel(got, want):.2e} > {rtol}"


@pytest.mark.slow
def test_small_tokens_equal_torch(small, clip_video):
    # All three tasks x two sampling seeds (temperature 1.0, which walks through all three
    # heads; seed 6 constrained too) plus greedy dvc, kept short (2 frames, 10 tokens:
    # ~15 s single-threaded) so `small` stays cheap in CI; the tiny tests run 48 tokens.
    ckpt, art = small
    ort_pipe = Pipeline.from_dir(art, "onnxruntime", cache_dir=False)
    torch_pipe = Pipeline.from_dir(ckpt, "torch")
    runs = [("dvc", GenerationConfig(max_new_tokens=10))]
    for task in ("dvc", "mr", "vhd"):
        runs += [
            (task, GenerationConfig(max_new_tokens=10, temperature=1.0, seed=5)),
            (task, GenerationConfig(max_new_tokens=10, temperature=1.0, seed=6, constrained=True)),
        ]
    ids = torch_pipe.backend.config.ids
    heads = set()
    for task, gen in runs:
        query = None if task == "dvc" else QUERY
        got = ort_pipe.run(clip_video, task, query=query, gen=gen, frames=2)
        want = torch_pipe.run(clip_video, task, query=query, gen=gen, frames=2)
        assert got["token_ids"] == want["token_ids"], (task, gen)
        assert got["events"] == want["events"], (task, gen)
        heads |= {(t >= ids.time_base) + (t >= ids.score_base) for t in got["token_ids"]}
    assert heads == {0, 1, 2}  # text, time and score tokens were all generated


def test_graphs_match_torch_fp16(artifacts, torch_model):
    backend = _backend(artifacts["fp16"])
    assert backend.dtype == np.float16
    for name, (got, want) in _graph_outputs(backend, torch_model).items():
        err = _rel(got, want)
        assert err <= RTOL_FP16[_spec(backend, name).name], f"{name}: fp16 rel. error {err:.2e}"


@pytest.fixture(scope="module")
def seed_artifacts(tiny_ckpts, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("seed-artifacts")
    return {s: export_onnx(tiny_ckpts[s], root / f"a{s}", progress=False) for s in (1, 2)}


@pytest.mark.parametrize("seed", [1, 2])
def test_tokens_equal_torch(tiny_ckpts, seed_artifacts, clip_video, seed):
    ort_pipe = Pipeline.from_dir(seed_artifacts[seed], "onnxruntime", cache_dir=False)
    torch_pipe = Pipeline.from_dir(tiny_ckpts[seed], "torch")
    # Greedy (the paper's decoding) and sampled: random `tiny` weights make greedy loop in
    # the time head, while sampling walks through all three heads and the text vocabulary.
    gens = [
        GenerationConfig(max_new_tokens=BUDGET),
        GenerationConfig(max_new_tokens=BUDGET, temperature=1.0, seed=3),
        GenerationConfig(max_new_tokens=BUDGET, temperature=1.0, seed=4, constrained=True),
    ]
    for task in ("dvc", "mr", "vhd"):
        query = None if task == "dvc" else QUERY
        for gen in gens:
            got = ort_pipe.run(clip_video, task, query=query, gen=gen)
            want = torch_pipe.run(clip_video, task, query=query, gen=gen)
            assert got["token_ids"] == want["token_ids"], (task, gen)
            assert got["events"] == want["events"] and got["prompt_ids"] == want["prompt_ids"]


def test_cli_run_onnxruntime(tiny_ckpts, seed_artifacts, clip_video):
    def run(model: Path, backend: str) -> dict:
        cmd = [sys.executable, "-m", "trace_rt", "run", str(clip_video), "--model", str(model)]
        cmd += ["--task", "mr", "--query", QUERY, "--max-new-tokens", "24", "--backend", backend]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    got, want = run(seed_artifacts[1], "onnxruntime"), run(tiny_ckpts[1], "torch")
    assert got["token_ids"] == want["token_ids"]
    assert set(got) == set(want)


def test_reexport_is_deterministic(tiny_ckpt, artifacts, tmp_path):
    # Through the CLI, to cover `python -m export onnx` too.
    again = tmp_path / "again"
    cmd = [sys.executable, "-m", "export", "onnx", str(tiny_ckpt), str(again), "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True)
    first = artifacts["fp32"]
    assert (again / MANIFEST_FILE).read_bytes() == (first / MANIFEST_FILE).read_bytes()
    manifest = json.loads((first / MANIFEST_FILE).read_text())
    for name in GRAPH_NAMES:
        f = manifest["graphs"][name]["file"]
        assert (again / f).read_bytes() == (first / f).read_bytes(), f


def test_manifest_contents(artifacts, tiny_ckpt):
    m = json.loads((artifacts["fp32"] / MANIFEST_FILE).read_text())
    assert set(m["graphs"]) == set(GRAPH_NAMES)
    assert m["id_space"]["size"] == 32027 and m["export"]["dtype"] == "fp32"
    assert set(m["source"]["files"]) >= {"config.json", "model.safetensors", "tokenizer.model"}
    assert {"decoder.onnx", "embeddings.npy", "config.json", "tokenizer.model"} <= set(m["files"])
    assert m["export"]["kv_cache"] == KV_CACHE
    dec = m["graphs"][DECODER]
    assert [t["name"] for t in dec["inputs"]][:4] == [
        "inputs_embeds", "position_ids", "past_key.0", "past_value.0",
    ]  # fmt: skip
    # Position-major [P, batch, kv, hd]: the pool's buffers' layout.
    assert dec["inputs"][2]["shape"] == ["past", "batch", 2, 16]
    assert dec["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", 32027]}
    # Only the new positions come out, in the buffers' layout.
    key0 = {"name": "key.0", "dtype": "float32", "shape": ["seq", "batch", 2, 16]}
    assert dec["outputs"][1] == key0


def test_kv_cache_grows_and_is_reused(artifacts, torch_model, monkeypatch):
    # Headroom 2: the 5-position prompt gets 7 slots, so decoding 6 ids grows the buffers
    # (keeping the prefix); a second request must then reuse them from an empty cache.
    monkeypatch.setattr(ort_backend, "PREFILL_HEADROOM", 2)
    backend = _backend(artifacts["fp32"])
    cfg = torch_model.config
    x = torch.randn(1, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    ids = [32003, 32001, 32016, 32014, 733, 32000]
    with torch.no_grad():
        torch_model.setup_caches(16)
        want = [torch_model.all_logits(torch_model.prefill(x))]
        for step, token in enumerate(ids):
            pos = torch.tensor([5 + step])
            want.append(
                torch_model.all_logits(torch_model.decode_step(torch.tensor([[token]]), pos))
            )
    got = [backend.prefill([-201], x[0].numpy(), Head.TEXT)]
    assert backend.kv.capacity == 7
    got += [backend.decode_step(token, Head.TEXT) for token in ids]
    assert backend.kv.capacity == 14 and backend.kv.length == 11
    text = cfg.ids.text_vocab + 1
    assert _rel(np.stack(got), torch.cat(want)[:, :text].numpy()) <= 1e-4
    np.testing.assert_array_equal(backend.prefill([-201], x[0].numpy(), Head.TEXT), got[0])
    assert backend.kv.capacity == 14 and backend.kv.length == 5


def test_decoder_reads_past_in_place(artifacts, tmp_path):
    # After onnxruntime's fusions, each past K/V input may only be read by MatMuls whose
    # [P, B, kv, hd] -> [B, kv, ., P] transposes are folded in (FusedMatMul with
    # transBatchB) and by Shape (the past length for the mask): any Transpose, Gather or
    # Concat on it would copy the whole cache every step again.
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(artifacts["fp32"] / "decoder.onnx"), so)
    graph = onnx.load(str(tmp_path / "opt.onnx")).graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    past = [t.name for t in graph.input if t.name.startswith("past_")]
    assert len(past) == 4
    for name in past:
        ops = {n.op_type for n in readers[name]}
        assert ops <= {"FusedMatMul", "Shape"} and "FusedMatMul" in ops, (name, ops)
        for n in readers[name]:
            if n.op_type == "FusedMatMul":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                assert attrs["transBatchB"] == 1, (name, attrs)


def test_masks_are_made_once_not_per_layer(artifacts):
    # The causal and past masks are additive biases built once per step
    # (trace_rt/model/decode.py: decode_setup); a masked fill inside each layer exports
    # as a Where over that layer's whole score matrix, ~8x slower than an Add there.
    graph = onnx.load(str(artifacts["fp32"] / "decoder.onnx"), load_external_data=False).graph
    layers = sum(1 for t in graph.input if t.name.startswith("past_key"))
    wheres = [n for n in graph.node if n.op_type == "Where"]
    assert layers >= 2 and len(wheres) <= 2, [n.name for n in wheres]


def test_old_kv_scheme_is_rejected(artifacts, tmp_path):
    art = _copy(artifacts["fp32"], tmp_path / "old")
    m = json.loads((art / MANIFEST_FILE).read_text())
    m["export"]["kv_cache"] = "concat"
    (art / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"KV-cache scheme 'concat'.*re-export"):
        OnnxRuntimeBackend(art)


def test_external_data(tiny_ckpt, torch_model, tmp_path):
    # Force the >2 GB path on a small model: weights go to <graph>.onnx.data.
    assert EXTERNAL_DATA_THRESHOLD < 2**31
    out = export_onnx(tiny_ckpt, tmp_path / "ext", progress=False, external_data_threshold=0)
    assert (out / "decoder.onnx.data").is_file()
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert "decoder.onnx.data" in m["files"]
    backend = _backend(out)
    for name, (got, want) in _graph_outputs(backend, torch_model).items():
        assert _rel(got, want) <= 1e-4, name


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*")))


def test_missing_or_mismatched_file(artifacts, tmp_path):
    art = _copy(artifacts["fp32"], tmp_path / "a")
    (art / "projector.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"projector\.onnx is missing"):
        OnnxRuntimeBackend(art)
    # A TensorRT deployment (engines instead of graphs) checks everything but the graphs.
    assert load_manifest(art, graphs=False)["graphs"]
    (art / "embeddings.npy").unlink()
    with pytest.raises(CheckpointError, match=r"embeddings\.npy is missing"):
        load_manifest(art, graphs=False)

    art = _copy(artifacts["fp32"], tmp_path / "b")
    data = bytearray((art / "decoder.onnx").read_bytes())
    data[-100] ^= 0xFF  # same size, different content
    (art / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"decoder\.onnx does not match its sha256"):
        OnnxRuntimeBackend(art)

    art = _copy(artifacts["fp32"], tmp_path / "c")
    with open(art / "embeddings.npy", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match=r"embeddings\.npy has \d+ bytes"):
        OnnxRuntimeBackend(art, verify="size")

    art = _copy(artifacts["fp32"], tmp_path / "d")
    (art / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        OnnxRuntimeBackend(art)


def test_optimised_graph_cache(artifacts, tmp_path):
    cache = tmp_path / "cache"
    first = OnnxRuntimeBackend(artifacts["fp32"], cache_dir=cache)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and all(f.endswith(".onnx") for f in files)
    second = OnnxRuntimeBackend(artifacts["fp32"], cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == files
    video = np.zeros((1, 8 * 14, first.config.hidden_size), np.float32)[0]
    a = first.prefill([1, -201, 2], video, Head.TIME)
    b = second.prefill([1, -201, 2], video, Head.TIME)
    np.testing.assert_array_equal(a, b)


def test_only_the_decoder_spins(artifacts):
    """The vision and projector sessions run once per request and must not leave spinning
    workers behind for the prefill that follows; the decoder (small ops) keeps spinning."""
    b = OnnxRuntimeBackend(artifacts["fp32"], cache_dir=False)
    key = "session.intra_op.allow_spinning"
    spins = {
        g: s.get_session_options().get_session_config_entry(key) if g != DECODER else None
        for g, s in b.sessions.items()
    }
    assert set(spins) == {*GRAPH_NAMES}
    assert all(v == "0" for g, v in spins.items() if g != DECODER)
    with pytest.raises(RuntimeError):  # never set: onnxruntime's default (spinning on)
        b.sessions[DECODER].get_session_options().get_session_config_entry(key)


def test_graph_cache_write_failure(artifacts, tmp_path, monkeypatch):
    """A cache that cannot be written: an error when the directory was named, else one
    warning naming the reason, and the graphs optimised in memory."""
    import trace_rt.backends.ort_session as ors

    monkeypatch.setattr(ors, "WARNED", set())
    cache = tmp_path / "cache"
    OnnxRuntimeBackend(artifacts["fp32"], cache_dir=cache)
    names = sorted(p.name for p in cache.iterdir())
    blocked = tmp_path / "blocked"
    for n in names:  # a directory where each cached graph would go: the write fails
        (blocked / n).mkdir(parents=True)
    with pytest.raises(InputError, match=r"cache_dir .*blocked: cannot write the optimised"):
        OnnxRuntimeBackend(artifacts["fp32"], cache_dir=blocked)
    art = _copy(artifacts["fp32"], tmp_path / "a")
    shutil.copytree(blocked, art / ".ort_cache")  # the default cache directory
    with pytest.warns(RuntimeWarning, match=r"cannot write the optimised .* at every load"):
        b = OnnxRuntimeBackend(art)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        OnnxRuntimeBackend(art)
    video = np.zeros((8 * 14, b.config.hidden_size), np.float32)
    plain = OnnxRuntimeBackend(artifacts["fp32"], cache_dir=False)
    want = plain.prefill([1, -201, 2], video, Head.TIME)
    np.testing.assert_array_equal(b.prefill([1, -201, 2], video, Head.TIME), want)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match=r"cache_dir .*: cannot create it"):
        OnnxRuntimeBackend(artifacts["fp32"], cache_dir=tmp_path / "file" / "sub")


def test_onnxruntime_backend_runs_without_torch(artifacts):
    # The serving image has no torch: block it and run every stage.
    code = f"""
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
import numpy as np
from trace_rt.backends import load_backend
from trace_rt.tokens import Head
b = load_backend("onnxruntime", {str(artifacts["fp32"])!r}, cache_dir=False)
c = b.config
px = np.zeros((2, 3, c.vision.image_size, c.vision.image_size), np.float32)
video = b.encode_video(px, np.full((2, 6), 2, np.int64))
logits = b.prefill([1, 733, -201, 28705], video, Head.TIME)
logits = b.decode_step(32001, Head.SCORE)
print(video.shape, logits.shape)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(28,", "64)", "(13,)"]


@pytest.fixture(scope="module")
def bf16_artifact(tiny_ckpt, tmp_path_factory) -> Path:
    # Through the CLI, to cover `python -m export onnx --dtype bf16`.
    out = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    cmd = [sys.executable, "-m", "export", "onnx", str(tiny_ckpt), str(out), "--no-progress"]
    subprocess.run([*cmd, "--dtype", "bf16"], check=True, capture_output=True)
    return out


def test_bf16_export(bf16_artifact, tiny_ckpt):
    art = bf16_artifact
    m = json.loads((art / MANIFEST_FILE).read_text())
    assert m["export"]["dtype"] == "bf16" and m["config"]["torch_dtype"] == "bfloat16"
    assert m["embeddings"] == {
        "file": "embeddings.npy", "dtype": "bfloat16", "storage": "uint16",
        "shape": [32027, 64],
    }  # fmt: skip
    elem = {"bfloat16": onnx.TensorProto.BFLOAT16, "float32": onnx.TensorProto.FLOAT}
    elem["int64"] = onnx.TensorProto.INT64
    for name in GRAPH_NAMES:
        spec = m["graphs"][name]
        model = onnx.load(str(art / spec["file"]))
        onnx.checker.check_model(model, full_check=True)
        g = model.graph
        # I/O as the spec says: bf16 throughout, f32 pixels in and logits out.
        io = [*spec["inputs"], *spec["outputs"]]
        for got, want in zip([*g.input, *g.output], io, strict=True):
            assert got.name == want["name"]
            assert got.type.tensor_type.elem_type == elem[want["dtype"]], got.name
        kinds = {t.data_type for t in g.initializer if t.data_type != onnx.TensorProto.INT64}
        # The patch-embedding Conv stays f32 (ONNX Conv takes bf16 from opset 22 only).
        want = {onnx.TensorProto.BFLOAT16}
        if name == VISION_ENCODER:
            want.add(onnx.TensorProto.FLOAT)
        assert kinds == want, name
    vision = onnx.load(str(art / "vision_encoder.onnx")).graph
    f32 = [t for t in vision.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert len(f32) == 1 and len(f32[0].dims) == 4  # the conv weight only
    # embeddings.npy: the bf16 table's bit patterns.
    model = load_model(tiny_ckpt, dtype="bf16")
    from export.onnx_export import unified_embeddings

    bits = unified_embeddings(model).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(np.load(art / "embeddings.npy"), bits)


def test_bf16_graphs_match_torch(bf16_artifact, torch_model):
    # onnx's reference evaluator computes bf16 ops (ml_dtypes); this checks the graphs'
    # numbers, not TensorRT's kernels (which have not run here).
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    def run(name: str, feeds: dict) -> list[np.ndarray]:
        ev = ReferenceEvaluator(str(bf16_artifact / f"{name}.onnx"))
        return [np.asarray(o).astype(np.float32) for o in ev.run(None, feeds)]

    bf16 = ml_dtypes.bfloat16
    cfg = torch_model.config
    g = torch.Generator().manual_seed(7)
    px = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tid = torch.randint(0, cfg.time_vocab_size, (3, 6), generator=g)
    x = torch.randn(1, 9, cfg.hidden_size, generator=g)
    with torch.no_grad():
        feats = torch_model.encode_frames(px)
        video = torch_model.project(feats, tid)
        torch_model.setup_caches(32)
        want_dec = [torch_model.all_logits(torch_model.prefill(x))]
        hidden = torch_model.decode_step(torch.tensor([[32005]]), torch.tensor([9]))
        want_dec.append(torch_model.all_logits(hidden))
    pairs = {
        VISION_ENCODER: (run(VISION_ENCODER, {"pixel_values": px.numpy()})[0], feats),
        PROJECTOR: (
            run(PROJECTOR, {"features": feats.numpy().astype(bf16), "time_ids": tid.numpy()})[0],
            video,
        ),
    }
    kv = (0, 1, cfg.num_key_value_heads, cfg.attn_head_dim)  # [P, batch, kv, hd]
    past = {n: np.zeros(kv, bf16) for i in range(cfg.num_hidden_layers) for n in kv_names(i)[:2]}
    embeds = x.numpy().astype(bf16)
    logits, *new = run(
        DECODER, {"inputs_embeds": embeds, "position_ids": np.arange(9)[None]} | past
    )
    # One decode step on the prefill's K/V (the time id 32005's embedding row).
    emb = np.load(bf16_artifact / "embeddings.npy")[32005].view(bf16)[None, None]
    past = {n: new[j].astype(bf16) for j, n in enumerate(past)}
    step, *_ = run(DECODER, {"inputs_embeds": emb, "position_ids": np.array([[9]])} | past)
    pairs[DECODER] = (np.concatenate([logits, step]), torch.cat(want_dec))
    for name, (got, want) in pairs.items():
        assert got.shape == tuple(want.shape), name
        err = _rel(got, want.numpy())
        assert err <= RTOL_BF16[name], f"{name}: bf16 rel. error {err:.2e}"


def test_bf16_refused_by_onnxruntime(bf16_artifact, clip_video):
    with pytest.raises(CheckpointError, match=r"bf16 artifacts are for TensorRT/CUDA"):
        OnnxRuntimeBackend(bf16_artifact, cache_dir=False)
    cmd = [sys.executable, "-m", "trace_rt", "run", str(clip_video), "--model"]
    cmd += [str(bf16_artifact), "--backend", "onnxruntime", "--max-new-tokens", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and "bf16 artifacts are for TensorRT/CUDA" in out.stderr


def test_ops_supported_by_tensorrt(artifacts, bf16_artifact):
    allowed = {
        line.strip()
        for line in TRT_OPS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for dt, art in {**artifacts, "bf16": bf16_artifact}.items():
        for name in GRAPH_NAMES:
            graph = onnx.load(str(art / f"{name}.onnx"), load_external_data=False).graph
            ops = {(n.domain or "ai.onnx", n.op_type) for n in graph.node}
            bad = sorted(f"{d}::{op}" for d, op in ops if d != "ai.onnx" or op not in allowed)
            assert not bad, f"{name} ({dt}) uses ops TensorRT 10 lacks: {bad}"


def test_decoder_ab_times_both_exports(artifacts, capsys):
    from benchmarks.decoder_ab import main as ab_main

    art = artifacts["fp32"]
    ab_main([str(art), str(art), "decoder.onnx", "--positions", "8", "--steps", "2",
             "--rounds", "3", "--threads", "1"])  # fmt: skip
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| `decoder.onnx`")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[2]) > 0 and float(cells[4]) > 0  # the new/old ratios
    with pytest.raises(SystemExit):
        ab_main([str(art), str(art), "decoder.onnx", "--rounds", "2"])
    with pytest.raises(SystemExit):
        ab_main([str(art), str(art), "no-such-graph.onnx"])
