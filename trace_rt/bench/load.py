"""How busy the machine was while the bench measured: kept with every invocation.

On a shared machine the load explains most of the run-to-run spread, so each invocation
(and each backend inside it) records:

- ``loadavg_before`` / ``loadavg_after``: ``os.getloadavg()`` (1/5/15 min, runnable +
  uninterruptible tasks, this process's threads included);
- ``others_busy_fraction``: from ``/proc/stat``, the share of all CPUs' time that was busy
  (user, nice, system, irq, softirq, steal) but not spent by this process (its CPU time
  from ``os.times``, all threads); 0 = nothing else ran, 1 = every CPU was busy with other
  work the whole window. A child process (a ``trace-rt serve`` started elsewhere) counts as
  "other". ``None`` where ``/proc/stat`` is missing;
- ``others_cores``: the same as a number of CPUs kept busy by others on average;
- ``steal_fraction``: time the hypervisor gave to other guests (a VM's noisy neighbours).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _cpu_jiffies() -> tuple[int, int, int] | None:
    """(total, idle incl. iowait, steal) jiffies over all CPUs from ``/proc/stat``."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    v = [int(x) for x in first[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    v += [0] * (8 - len(v))
    total = sum(v[:8])
    return total, v[3] + v[4], v[7]


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


@dataclass
class LoadWindow:
    """A measuring window: started on construction, closed by :meth:`close`."""

    started_utc: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ"))
    _t0: float = field(default_factory=time.perf_counter)
    _jiffies: tuple[int, int, int] | None = field(default_factory=lambda: _cpu_jiffies())
    _own: float = field(default_factory=lambda: _own_cpu_s())
    _load: list[float] | None = field(default_factory=lambda: _loadavg())

    def close(self) -> dict[str, Any]:
        """The window's load record (see the module docstring)."""
        wall = time.perf_counter() - self._t0
        own = _own_cpu_s() - self._own
        out: dict[str, Any] = {
            "started_utc": self.started_utc,
            "wall_s": round(wall, 3),
            "loadavg_before": self._load,
            "loadavg_after": _loadavg(),
            "own_cpu_s": round(own, 3),
            "others_busy_fraction": None,
            "others_cores": None,
            "steal_fraction": None,
        }
        end = _cpu_jiffies()
        if self._jiffies is None or end is None:
            return out
        total = end[0] - self._jiffies[0]
        if total <= 0:
            return out
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy_s = (total - (end[1] - self._jiffies[1])) / hz
        total_s = total / hz
        others = max(0.0, busy_s - own)
        out["others_busy_fraction"] = round(min(1.0, others / total_s), 3)
        out["others_cores"] = round(others / wall, 2) if wall > 0 else None
        out["steal_fraction"] = round((end[2] - self._jiffies[2]) / total, 3)
        return out


def describe(load: dict[str, Any]) -> str:
    """One line for reports: ``load 1.9→2.4, others 0.45 of the CPUs``."""
    before, after = load.get("loadavg_before"), load.get("loadavg_after")
    text = "load " + (f"{before[0]:.2f}→{after[0]:.2f}" if before and after else "?")
    if load.get("others_busy_fraction") is not None:
        text += f", others busy {load['others_busy_fraction']:.0%} of the CPUs"
    return text
