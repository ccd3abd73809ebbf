"""``python -m trace_rt.bench --backends ...,triton``: a real tritonserver (the binary bundled
in nvidia-pytriton) serving a `tiny` export, measured side by side with onnxruntime on the
same artifacts; and the clear errors for a missing or unreachable ``--url``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.triton_server import free_ports, running_server
from trace_rt.bench import plugins
from trace_rt.bench import triton as triton_bench
from trace_rt.bench.stats import STAGES

pytest.importorskip("tritonclient.grpc")

STEPS, RUNS, LEVELS = 5, 2, (1, 2)


@pytest.fixture(scope="module")
def artifact(tiny_ckpt, tmp_path_factory) -> Path:
    from export.onnx_export import export_onnx

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("bench-triton") / "art", progress=False)


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    from triton_repo.build import build_repository

    # No room in the video cache: each round's video is decoded and encoded again (the
    # bench sends the same bytes every round; cached, video and vision would read 0).
    repo = build_repository(
        artifact, tmp_path_factory.mktemp("bench-repo") / "r", video_cache_mb=0, progress=False
    )
    with running_server(repo) as s:
        yield s


def _argv(ckpt: Path, art: Path, *extra: str) -> list[str]:
    return [
        *("--model", str(ckpt), "--artifacts", str(art)),
        *("--decode-steps", str(STEPS), "--warmup", "1", "--runs", str(RUNS)),
        *("--peak-gbps", "13", "--peak-tflops", "0.1"),
        *extra,
    ]


def test_concurrency_parsing():
    assert triton_bench.parse_concurrency("1, 2,4,2") == [1, 2, 4]
    for bad in ("", "0", "1,x", "-1"):
        with pytest.raises(ValueError, match="--concurrency"):
            triton_bench.parse_concurrency(bad)


def test_bench_measures_the_server_beside_onnxruntime(
    tiny_ckpt, artifact, server, tmp_path, monkeypatch
):
    from trace_rt.bench.cli import main

    monkeypatch.delenv(plugins.ENV_VAR, raising=False)  # a plugin named triton would win
    out = tmp_path / "out"
    argv = _argv(tiny_ckpt, artifact, "--backends", "onnxruntime,triton")
    argv += ["--url", server.grpc_url, "--concurrency", ",".join(map(str, LEVELS))]
    argv += ["--json", str(out / "b.json"), "--markdown", str(out / "b.md")]
    argv += ["--plot", str(out / "b.png")]
    assert main(argv) == 0

    doc = json.loads((out / "b.json").read_text())
    assert list(doc["backends"]) == ["onnxruntime", "triton"] and not doc["skipped"]
    ort, tri = doc["backends"]["onnxruntime"], doc["backends"]["triton"]
    assert set(tri["stages"]) == set(STAGES)
    st = tri["stages"]
    for stage in ("video", "vision", "prefill", "ttft", "decode_step", "end_to_end"):
        s = st[stage]
        assert len(s["samples_ms"]) == RUNS and s["p50_ms"] > 0, stage  # concurrency 1
        assert s["p50_ms"] == pytest.approx(np.percentile(s["samples_ms"], 50), abs=1e-3)
    assert st["projector"]["samples_ms"] == []  # inside the server's vision
    assert st["ttft"]["p50_ms"] < st["end_to_end"]["p50_ms"]
    assert len(tri["token_ids"]) == STEPS + 1 and tri["decode_tokens_per_s"] > 0
    assert tri["frames"] == ort["frames"]  # tiny's num_frames on both sides
    assert tri["prompt_positions"] == ort["prompt_positions"]  # same prompt and video block
    assert tri["token_ids"] == ort["token_ids"]  # same artifacts, greedy, same length

    section = doc["triton"]
    assert section["url"] == server.grpc_url and section["model"] == "trace_pipeline"
    assert [lv["concurrency"] for lv in section["levels"]] == list(LEVELS)
    for lv in section["levels"]:
        c = lv["concurrency"]
        assert lv["rounds"] == RUNS and lv["requests"] == RUNS * c == len(lv["samples"])
        assert lv["tokens_per_request"] == [STEPS + 1]  # prefill's token + STEPS, EOS ignored
        for r in lv["samples"]:
            server_ms = r["server_ms"]
            assert r["tokens"] == STEPS + 1
            assert r["end_to_end_ms"] >= server_ms["total"] > 0  # the client waits for it all
            assert r["overhead_ms"] == pytest.approx(
                r["end_to_end_ms"] - server_ms["total"], abs=1e-3
            )
            assert 0 < r["first_response_ms"] <= r["end_to_end_ms"]
            parts = server_ms["video"] + server_ms["vision"] + server_ms["prefill"]
            assert parts + server_ms["decode"] <= server_ms["total"] + 1e-3
            assert r["decode_per_token_ms"] == pytest.approx(server_ms["decode"] / STEPS, abs=1e-3)
        assert lv["end_to_end"]["p50_ms"] <= lv["end_to_end"]["p90_ms"]
        # Throughput: requests (tokens) per second of round wall time; a round lasts at
        # least as long as its slowest request.
        walls = lv["round_ms"]["samples_ms"]
        assert lv["requests_per_s"] == pytest.approx(RUNS * c / sum(walls) * 1e3, rel=1e-3)
        assert lv["tokens_per_s"] == pytest.approx(lv["requests_per_s"] * (STEPS + 1), rel=1e-3)
        for i, wall in enumerate(walls):
            e2e = [r["end_to_end_ms"] for r in lv["samples"] if r["round"] == i]
            assert len(e2e) == c and wall >= max(e2e) - 1e-3

    md = (out / "b.md").read_text()
    assert "| triton |" in md and "## Triton server by concurrency" in md
    assert md.count("\n| 1 | 2 | ") == 1 and "\n| 2 | 4 |" in md  # clients | requests
    assert (out / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_triton_without_url_is_a_clear_error(tiny_ckpt, artifact, capsys):
    from trace_rt.bench.cli import main

    argv = _argv(tiny_ckpt, artifact, "--backends", "onnxruntime,triton")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--url HOST:PORT" in err and "trace-rt serve" in err
    assert main([*argv, "--url", "localhost"]) == 2  # no port
    assert "HOST:PORT" in capsys.readouterr().err


def test_unreachable_url_is_a_clear_error(tiny_ckpt, artifact, capsys, tmp_path):
    from trace_rt.bench.cli import main

    url = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    out = tmp_path / "x.json"
    argv = _argv(tiny_ckpt, artifact, "--backends", "triton", "--url", url, "--json", str(out))
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"no Triton server answers at {url}" in err
    assert not out.exists()  # failed before measuring anything
