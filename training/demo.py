"""``python -m training demo``: the whole product on an embedded default, in seconds.

Makes a ``tiny`` checkpoint (the real Mistral tokenizer, **random weights**) and a short
generated clip (a red circle that appears, moves left and vanishes), then answers all
three tasks through the runtime's pipeline (the same code as ``trace-rt run``), prints
the events and writes each answer's HTML timeline (``dvc.html``, ``mr.html``,
``vhd.html``). With random weights the events are noise: the demo shows that everything
runs, not what a trained model finds. ``setup.sh`` runs it last.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from training.synth import ShapeTrack, SynthConfig, write_synth_video

CLIP_SECONDS = 4.0
TRACK = ShapeTrack("red", "circle", "left", start=1.0, end=3.0, radius=9)
QUERY = TRACK.caption  # "a red circle moves left"


def make_demo_inputs(out: Path) -> tuple[Path, Path]:
    """(checkpoint, clip) under *out*; an existing checkpoint there is reused."""
    from training.make_checkpoint import make_checkpoint

    ckpt, clip = out / "tiny", out / "clip.mp4"
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt, "tiny", seed=0, progress=False, force=True)
    cfg = SynthConfig(fps=8, size=64)
    write_synth_video(clip, [TRACK], round(CLIP_SECONDS * cfg.fps), cfg, bg=(30, 40, 50))
    return ckpt, clip


def run_demo(out: str | Path = "demo", *, max_new_tokens: int = 40) -> list[dict[str, Any]]:
    """Answer dvc, mr and vhd on the demo clip; prints a report, returns the results."""
    from trace_rt.generate import GenerationConfig
    from trace_rt.pipeline import Pipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt, clip = make_demo_inputs(out)
    pipe = Pipeline.from_dir(ckpt, "torch")
    # Constrained: random weights still write well-formed timestamps inside the clip.
    gen = GenerationConfig(max_new_tokens=max_new_tokens, constrained=True)
    from trace_rt.timeline import write_report

    results = []
    for task in ("dvc", "mr", "vhd"):
        query = QUERY if task != "dvc" else None
        results.append(pipe.run(clip, task, query=query, gen=gen))
        request = {"task": task, "query": query, "model": str(ckpt), "backend": "torch"}
        write_report(out / f"{task}.html", results[-1], video=clip, request=request)
    _report(ckpt, clip, results, time.perf_counter() - t0)
    return results


def _report(ckpt: Path, clip: Path, results: list[dict[str, Any]], seconds: float) -> None:
    print(f"trace-rt demo: checkpoint {ckpt} (preset tiny), clip {clip} ({CLIP_SECONDS:.0f} s,"
          f" '{QUERY}' from {TRACK.start:.1f} s to {TRACK.end:.1f} s)")  # fmt: skip
    for res in results:
        query = f" (query: '{QUERY}')" if res["task"] != "dvc" else ""
        print(f"\n{res['task']}{query}: {len(res['events'])} event(s), "
              f"{len(res['token_ids'])} tokens, {res['timing_ms']['total']:.0f} ms")  # fmt: skip
        for ev in res["events"]:
            times = ", ".join(f"{t:.1f}" for t in ev["timestamps"]) or "-"
            scores = ", ".join(f"{s:.1f}" for s in ev["scores"]) or "-"
            print(f"  time [{times}]  score [{scores}]  caption {ev['caption']!r}")
    print(
        f"\nDone in {seconds:.1f} s. THE WEIGHTS ARE RANDOM: these events are noise. The demo "
        "shows the pipeline running end to end (decode, vision, projector, interleaved "
        "time/score/text decoding); train a checkpoint (README, Training) or load a real "
        "TRACE checkpoint for meaningful answers.\n"
        f"Timelines to look at: {clip.parent}/dvc.html, mr.html, vhd.html (open in a browser).\n"
        f"Try it yourself: .venv/bin/trace-rt run {clip} --model {ckpt} --task mr "
        f"--query '{QUERY}' --report mr.html"
    )
