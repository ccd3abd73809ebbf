"""benchmarks/routing_cache.py: the replicas' cache counters read back, hash vs round-robin.

A small run of the real thing (two ``tiny`` replicas behind nginx, one client, so that
nginx's round-robin alternates strictly): with hash routing a video's questions all land on
one replica, so exactly its first question misses; with round-robin each video reaches both
replicas and misses once on each. The replicas' own counters must say so.
"""

from __future__ import annotations

import pytest

from benchmarks.routing_cache import find_nginx, measure, metric_total, percentile, prepare


def test_metric_total_sums_label_sets_and_skips_look_alikes():
    text = "\n".join(
        [
            "# HELP trace_video_cache_hits_total requests whose video was cached",
            'trace_video_cache_hits_total{model="trace_pipeline",version="1"} 3',
            'trace_video_cache_hits_total{model="other"} 2',
            "trace_video_cache_hits_total_extra 100",
            "trace_video_cache_misses_total 7",
        ]
    )
    assert metric_total(text, "trace_video_cache_hits_total") == 5
    assert metric_total(text, "trace_video_cache_misses_total") == 7
    assert metric_total(text, "trace_video_cache_evictions_total") == 0


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)


@pytest.mark.slow
@pytest.mark.skipif(find_nginx() is None, reason="nginx not installed (apt-get nginx-light)")
def test_hash_routing_misses_once_per_video_round_robin_once_per_replica(tmp_path):
    videos, questions = 3, 4
    repo, data = prepare(tmp_path, "tiny", None, videos)
    kw = {"replicas": 2, "questions": questions, "clients": 1, "max_new_tokens": 2}
    hashed = measure(repo, tmp_path / "hash", "hash", data, **kw)
    spread = measure(repo, tmp_path / "rr", "round-robin", data, **kw)
    for r in (hashed, spread):
        assert (r["requests"], r["ok"], r["failed"], r["retries"]) == (12, 12, [], 0), r
        assert r["cache_evictions"] == 0
        assert r["cache_hits"] + r["cache_misses"] == 12
        # The servers' counters agree with where nginx sent each request.
        assert r["cache_misses"] == r["misses_from_placement"], r
        assert sum(p["requests"] for p in r["per_replica"]) == 12
        assert r["req_per_s"] > 0 and 0 < r["latency_p50_s"] <= r["latency_p90_s"]
    assert hashed["replicas_per_video"] == {"0": 1, "1": 1, "2": 1}
    assert (hashed["cache_misses"], hashed["hit_rate"]) == (videos, 0.75)
    assert spread["replicas_per_video"] == {"0": 2, "1": 2, "2": 2}
    assert (spread["cache_misses"], spread["hit_rate"]) == (2 * videos, 0.5)
    assert [p["requests"] for p in spread["per_replica"]] == [6, 6]
