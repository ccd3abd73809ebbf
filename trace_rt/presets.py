"""Model presets: ``tiny`` (tests), ``small`` (CPU benchmarks), ``trace-7b`` (the release).

A preset is the content of a checkpoint's ``config.json`` plus its CLIP tower's
``config.json`` and ``preprocessor_config.json``; presets differ from the release only
there. The JSON files live in ``trace_rt/data/presets`` so that the runtime (``trace-rt
plan --preset``) and ``training`` (``make-checkpoint --preset``) read the same ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from trace_rt.config import TraceConfig

PRESET_DIR = Path(__file__).parent / "data" / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> TraceConfig:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    raw = json.loads(path.read_text())
    return TraceConfig.from_parts(raw["config"], raw["vision"], raw["preprocess"])
