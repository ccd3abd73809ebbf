"""``python -m trace_rt.bench``: per-stage latency of every backend, with the physical floor.

Modules: :mod:`.cli` (arguments, orchestration, console), :mod:`.runner` (all stage
timing), :mod:`.stats` (percentiles), :mod:`.floor` (roofline floor and peak measurement),
:mod:`.machine` (machine info, peak memory), :mod:`.plugins` (backend names and
out-of-tree backends such as the ``reference`` oracle), :mod:`.report` (JSON contract,
table, markdown), :mod:`.plot` (PNG; matplotlib imported lazily), :mod:`.video` (the
default synthetic input), :mod:`.batching` / :mod:`.batching_report` (``--concurrency`` and
``--queries-per-video`` through the engine, in-process). Nothing here imports torch: the
torch and reference backends do, when they are benchmarked.
"""
