"""Model presets: ``tiny`` (tests), ``small`` (CPU benchmarks), ``trace-7b`` (the release).

The JSON files and the loader live in :mod:`trace_rt.presets` (the runtime's memory planner
reads them too); this module keeps training's import path.
"""

from trace_rt.presets import PRESET_DIR, load_preset, preset_names

__all__ = ["PRESET_DIR", "load_preset", "preset_names"]
