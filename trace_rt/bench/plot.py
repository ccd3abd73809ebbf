"""``--plot FILE.png``: stage breakdown per backend and per-token latency over the sequence.

matplotlib is imported here only, with the Agg backend (no display, no GUI toolkit), so the
bench runs without it unless a plot is asked for (``pip install 'trace-rt[bench]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Stages that add up to end to end (ttft and end_to_end themselves are sums).
PARTS = ("video", "vision", "projector", "prefill")
COLORS = {
    "video": "#8c8c8c",
    "vision": "#4c72b0",
    "projector": "#64b5cd",
    "prefill": "#dd8452",
    "decode": "#55a868",
    "other": "#c44e52",
}


def plot(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # file output only; never try to open a window
    import matplotlib.pyplot as plt

    entries = report["backends"]
    names = list(entries)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(3.5, 1.0 + 0.6 * len(names))))

    # Left: p50 of each stage stacked; decode = sum of the per-position medians.
    for row, name in enumerate(names):
        st = entries[name]["stages"]
        left = 0.0
        parts = {p: st[p]["p50_ms"] or 0.0 for p in PARTS}
        by_pos = entries[name]["decode_step_by_position_ms"]
        # A server backend (triton) reports no per-position steps: p50 step x its steps.
        steps = max(0, len(entries[name].get("token_ids", [])) - 1)
        parts["decode"] = sum(by_pos) if by_pos else (st["decode_step"]["p50_ms"] or 0) * steps
        parts["other"] = max(0.0, (st["end_to_end"]["p50_ms"] or 0.0) - sum(parts.values()))
        for part, ms in parts.items():
            ax1.barh(row, ms, left=left, color=COLORS[part], label=part if row == 0 else None)
            left += ms
    ax1.set_yticks(range(len(names)), names)
    ax1.invert_yaxis()
    ax1.set_xlabel("ms (p50 per stage)")
    ax1.set_title("Where one request's time goes")
    ax1.legend(loc="lower right", fontsize=8)

    # Right: median latency of decode step i over the measured runs, with its floor.
    for name in names:
        ys = entries[name]["decode_step_by_position_ms"]
        (line,) = ax2.plot(range(1, len(ys) + 1), ys, label=name, linewidth=1.2)
        floor = entries[name]["stages"]["decode_step"]["floor_ms"]
        if floor:
            ax2.axhline(floor, color=line.get_color(), linestyle=":", linewidth=0.9)
    ax2.set_xlabel("decode step")
    ax2.set_ylabel("ms (median over runs)")
    ax2.set_title("Per-token latency (dotted: bandwidth floor)")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)

    c = report["config"]
    fig.suptitle(
        f"trace-rt bench: {c['model_name']}, {c['frames']} frames, {c['decode_steps']} steps, "
        f"{c['device']} ({report['machine']['cpu_model']})",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
