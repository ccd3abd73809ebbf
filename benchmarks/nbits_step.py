"""A decode step's quantised matmuls alone: what onnxruntime's MatMulNBits kernel gives on
this machine at a preset's shapes, to set beside the whole step the bench measures.

    python -m benchmarks.nbits_step [--preset trace-7b] [--bits 4] [--block 32]
        [--lm-head none,fp32,int8,int4] [--threads N] [--runs 15] [--json FILE]
        [--error [--form qdq]]

For each ``--lm-head`` choice one graph: every layer's q, k, v, o, gate, up and down
projections as ``com.microsoft::MatMulNBits`` at ``--bits`` (random weights in the
export's layout: blocks of ``--block`` along K, accuracy level 4, fp32 scales), chained
as a step chains them (k and v are outputs, o reads q's output, down the product of gate
and up), one row (M = 1), then ``lm_head`` as the choice says (``none``: left out;
``fp32``: a MatMul; ``int8``/``int4``: one more MatMulNBits). Nothing else of the
decoder: no norms, rotary, attention or KV cache. Each choice runs in its own process
(this VM settles each process in one of two speeds, export/decode_timing.py); reported:
p50 and min of ``--runs`` steps after 3 warm-ups, and the weight bytes over the p50.

If the whole step (``python -m trace_rt.bench`` / ``benchmarks.trace7b``) is about this
figure, the rest of the graph costs little and the kernel sets the pace.

``--error`` measures what the speed costs instead: one ``gate`` projection of the preset
(hidden x intermediate, Gaussian weights), quantised by the export's own path
(``export.quantize``: symmetric RTN at ``--bits`` and ``--block``, accuracy level 4; with
``--form qdq`` the TensorRT form, DequantizeLinear with export/rtn.py's scales), run
on 64 Gaussian rows; reported: the output's relative RMS and max error against fp32.
Gaussian weights have no outlier channels, so real weights lose more at large blocks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trace_rt.variants import BLOCK_SIZES, DEFAULT_BLOCK_SIZE

HEADS = ("none", "fp32", "int8", "int4")
WARMUP = 3


def _graph(cfg, bits: int, block: int, head: str, rng: np.random.Generator):
    """The chained projections of every layer, then lm_head per *head* (module doc)."""
    from onnx import TensorProto, helper, numpy_helper

    h, inter = cfg.hidden_size, cfg.intermediate_size
    q_out = cfg.num_attention_heads * cfg.attn_head_dim
    kv_out = cfg.num_key_value_heads * cfg.attn_head_dim
    nodes, inits, outputs = [], [], []
    nbytes = 0

    def nbits(name: str, k: int, n: int, x: str, b: int) -> str:
        nonlocal nbytes
        blocks = -(-k // block)
        w = rng.integers(0, 256, (n, blocks, block * b // 8), dtype=np.uint8)
        s = rng.random(n * blocks, dtype=np.float32) * np.float32(2e-3)
        inits.extend(
            [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(s, f"{name}.s")]
        )
        nbytes += w.nbytes + s.nbytes
        nodes.append(
            helper.make_node(
                "MatMulNBits", [x, f"{name}.w", f"{name}.s"], [name], domain="com.microsoft",
                K=k, N=n, bits=b, block_size=block, accuracy_level=4,
            )
        )  # fmt: skip
        return name

    x = "x"
    for i in range(cfg.num_hidden_layers):
        q = nbits(f"l{i}.q", h, q_out, x, bits)
        outputs += [nbits(f"l{i}.k", h, kv_out, x, bits), nbits(f"l{i}.v", h, kv_out, x, bits)]
        o = nbits(f"l{i}.o", q_out, h, q, bits)
        gate, up = nbits(f"l{i}.gate", h, inter, o, bits), nbits(f"l{i}.up", h, inter, o, bits)
        nodes.append(helper.make_node("Mul", [gate, up], [f"l{i}.act"]))
        x = nbits(f"l{i}.down", inter, h, f"l{i}.act", bits)
    if head == "fp32":
        w = rng.standard_normal((h, cfg.vocab_size), dtype=np.float32) * np.float32(0.01)
        inits.append(numpy_helper.from_array(w, "lm_head.w"))
        nbytes += w.nbytes
        nodes.append(helper.make_node("MatMul", [x, "lm_head.w"], ["logits"]))
        x = "logits"
    elif head != "none":
        x = nbits("logits", h, cfg.vocab_size, x, int(head[3:]))
    graph = helper.make_graph(
        nodes,
        "nbits_step",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, h])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in [x, *outputs]],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets), nbytes


def time_one(preset: str, bits: int, block: int, head: str, threads: int, runs: int) -> dict:
    """Build, load and time one graph in this process."""
    import onnx
    import onnxruntime as ort

    from trace_rt.presets import load_preset

    cfg = load_preset(preset)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="nbits_step-") as tmp:
        path = Path(tmp) / "step.onnx"
        model, nbytes = _graph(cfg, bits, block, head, rng)
        onnx.save(model, str(path), save_as_external_data=True, location="step.onnx.data")
        del model
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        t0 = time.perf_counter()
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        load_s = time.perf_counter() - t0
    x = rng.standard_normal((1, cfg.hidden_size), dtype=np.float32)
    for _ in range(WARMUP):
        sess.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    p50 = float(np.median(times))
    return {
        "lm_head": head,
        "p50_ms": round(p50 * 1e3, 3),
        "min_ms": round(min(times) * 1e3, 3),
        "weight_bytes": nbytes,
        "gb_per_s_at_p50": round(nbytes / p50 / 1e9, 2),
        "load_s": round(load_s, 2),
    }


def layer_error(preset: str, bits: int, block: int, form: str = "nbits") -> dict:
    """Relative output error of one quantised ``gate`` projection (module docstring).

    *form*: ``nbits`` (MatMulNBits, onnxruntime's quantiser) or ``qdq`` (DequantizeLinear,
    the export's own searched scales: int4 blocked as *block*, int8 per column).
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import _to_matmulnbits, _to_qdq
    from trace_rt.presets import load_preset

    cfg = load_preset(preset)
    k, n = cfg.hidden_size, cfg.intermediate_size
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n), dtype=np.float32) * np.float32(0.02)
    x = rng.standard_normal((64, k), dtype=np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="gate")
    graph = helper.make_graph(
        [node],
        "gate",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if form == "nbits":
        quantised = _to_matmulnbits(model, ["gate"], bits, block, 4)
    else:
        quantised = _to_qdq(model, ["gate"], bits, block)[0]
    sess = ort.InferenceSession(quantised.SerializeToString(), providers=["CPUExecutionProvider"])
    got, want = sess.run(None, {"x": x})[0], x @ w
    return {
        "block": block,
        "form": form,
        "rel_rms_error": round(float(np.sqrt(((got - want) ** 2).mean() / (want**2).mean())), 5),
        "rel_max_error": round(float(np.abs(got - want).max() / np.abs(want).max()), 5),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nbits_step", description=__doc__)
    p.add_argument("--preset", default="trace-7b", help="shapes of this preset (trace-7b)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="layer weights (4)")
    p.add_argument(
        "--block",
        type=int,
        choices=BLOCK_SIZES,
        default=DEFAULT_BLOCK_SIZE,
        help="block size along K (the export's default, 32)",
    )
    p.add_argument("--lm-head", default=",".join(HEADS), help=f"choices, of {HEADS}")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    p.add_argument("--runs", type=int, default=15, help="timed steps per choice (15)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument(
        "--error", action="store_true", help="one layer's quantisation error instead of speed"
    )
    p.add_argument(
        "--form",
        choices=("nbits", "qdq"),
        default="nbits",
        help="with --error: MatMulNBits (nbits) or the TensorRT QDQ form (qdq)",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # a worker: time this choice, print JSON
    a = p.parse_args(argv)
    if a.error:
        r = layer_error(a.preset, a.bits, a.block, a.form)
        print(
            f"{a.preset} gate {a.form} int{a.bits} b{a.block}: "
            f"relative RMS error {r['rel_rms_error']}, max {r['rel_max_error']}"
        )
        if a.json:
            a.json.write_text(json.dumps({"preset": a.preset, "bits": a.bits, **r}) + "\n")
        return 0
    if a.one:
        print(json.dumps(time_one(a.preset, a.bits, a.block, a.one, a.threads, a.runs)))
        return 0
    heads = [h.strip() for h in a.lm_head.split(",") if h.strip()]
    if bad := [h for h in heads if h not in HEADS]:
        p.error(f"--lm-head: unknown {bad}; choose from {HEADS}")
    rows = []
    for head in heads:
        cmd = [sys.executable, "-m", "benchmarks.nbits_step", "--one", head, "--preset", a.preset]
        cmd += ["--bits", str(a.bits), "--block", str(a.block), "--threads", str(a.threads)]
        proc = subprocess.run([*cmd, "--runs", str(a.runs)], capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{a.preset} int{a.bits} b{a.block} lm_head {head:5s}: p50 {r['p50_ms']:8.2f} ms "
            f"(min {r['min_ms']:.2f}), {r['weight_bytes'] / 1e9:.3f} GB, "
            f"{r['gb_per_s_at_p50']} GB/s",
            flush=True,
        )
    if a.json:
        settings = {"preset": a.preset, "bits": a.bits, "block": a.block, "threads": a.threads}
        a.json.write_text(json.dumps({**settings, "runs": a.runs, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
