"""Which backends the bench can run, and which model directory each one takes.

Built-in names come from :data:`trace_rt.backends.BACKENDS`. Everything else is a *plugin*:
``NAME=module:Class``, given with ``--plugin`` (repeatable) or in the environment variable
``TRACE_RT_BENCH_PLUGINS`` (comma-separated). The class is imported only when NAME is
benchmarked and is built like a built-in one: ``Class(model_dir, device=..., **options)``.
A plugin given as a bare module name (``--plugin benchmarks.peers``) registers every entry
of that module's ``PLUGINS`` dict ({NAME: "module:Class"}); the module is imported to read
it, so it should import nothing heavy. Peers (other engines running the LLM alone, see
:mod:`trace_rt.bench.peer`) come this way: :data:`PEERS_SPEC`.

Why an explicit spec rather than a built-in ``reference`` entry: ``trace_rt`` is the
library and ``benchmarks/`` builds on it. The HF-transformers oracle needs transformers and
lives in ``benchmarks/reference/``; if the library named it, even as a lazily imported
string, the installed package would advertise a backend it does not ship, and a deployment
image without ``benchmarks/`` would fail on it. A command-line/env spec keeps the
dependency pointing one way and lets any out-of-tree backend be compared the same way.
(Python entry points were the other candidate; they need the plugin to be an installed
distribution, which ``benchmarks/`` is not.) The documented spec for the oracle is
:data:`REFERENCE_SPEC`; unknown ``reference`` errors name it.

Model directories: a backend runs either a checkpoint (``torch``, the oracle) or an
artifact directory from ``python -m export onnx`` (``onnxruntime*``, ``tensorrt``). A
plugin class says which with ``model_format = "checkpoint" | "artifact"`` (default:
checkpoint). ``triton`` takes neither: it is a running server (``--url``), measured by
:mod:`trace_rt.bench.triton`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_rt.backends import BACKEND_OPTIONS, BACKENDS

ENV_VAR = "TRACE_RT_BENCH_PLUGINS"
REFERENCE_SPEC = "reference=benchmarks.reference.backend:ReferenceBackend"
PEERS_SPEC = "benchmarks.peers"
# The peers PEERS_SPEC registers: named here only to say how to get them when asked for.
PEER_NAMES = frozenset(
    {"ort-genai", "ort-genai-int4", "llama.cpp", "llama.cpp-q8_0", "llama.cpp-q4_0"}
)
CHECKPOINT_BACKENDS = frozenset({"torch"})
# Names the bench knows of but cannot run yet (reported as skipped, with why).
NOT_AVAILABLE: dict[str, str] = {}
# Backends measured through a server rather than loaded in-process (trace_rt.bench.triton):
# resolve() leaves them to the CLI, which needs --url for them.
SERVER_BACKENDS = frozenset({"triton"})


@dataclass
class BackendSpec:
    """A backend the bench was asked for, resolved to an importable class."""

    name: str
    target: str  # "module:Class"
    options: dict[str, Any] = field(default_factory=dict)
    plugin: bool = False

    def load_class(self) -> type:
        module, _, cls = self.target.partition(":")
        if not cls:
            raise ValueError(f"backend {self.name!r}: {self.target!r} is not 'module:Class'")
        return getattr(importlib.import_module(module), cls)

    def model_format(self, cls: type | None = None) -> str:
        if self.plugin:
            return getattr(cls, "model_format", "checkpoint") if cls else "checkpoint"
        return "checkpoint" if self.name in CHECKPOINT_BACKENDS else "artifact"


def parse_plugins(specs: list[str], env: str | None = None) -> dict[str, str]:
    """``NAME=module:Class`` strings or plugin modules (env first, command line wins) ->
    {NAME: target}."""
    items = [s for s in (env or "").split(",") if s.strip()] + list(specs)
    out: dict[str, str] = {}
    for item in items:
        name, sep, target = item.strip().partition("=")
        if not sep and ":" not in item:
            out.update(_module_plugins(item.strip()))
            continue
        if not sep or not name or ":" not in target:
            raise ValueError(f"plugin {item!r}: expected NAME=module:Class, e.g. {REFERENCE_SPEC}")
        out[name.strip()] = target.strip()
    return out


def _module_plugins(module: str) -> dict[str, str]:
    """The ``PLUGINS`` dict of a plugin module."""
    try:
        found = getattr(importlib.import_module(module), "PLUGINS", None)
    except ImportError as e:
        raise ValueError(
            f"plugin {module!r}: expected NAME=module:Class (e.g. {REFERENCE_SPEC}) or a "
            f"module with a PLUGINS dict (e.g. {PEERS_SPEC}); cannot import it: {e}"
        ) from None
    if not isinstance(found, dict) or not all(":" in str(t) for t in found.values()):
        raise ValueError(f"plugin module {module!r} has no PLUGINS dict of NAME: 'module:Class'")
    return {str(k): str(v) for k, v in found.items()}


def resolve(names: list[str], plugin_specs: list[str]) -> tuple[list[BackendSpec], dict[str, str]]:
    """Names -> specs to run, and {name: reason} for names that cannot run here."""
    plugins = parse_plugins(plugin_specs, os.environ.get(ENV_VAR))
    specs: list[BackendSpec] = []
    skipped: dict[str, str] = {}
    for name in names:
        base, at, variant = name.partition("@")
        if name in plugins:  # a plugin may also replace a built-in name
            specs.append(BackendSpec(name, plugins[name], plugin=True))
        elif at and base in BACKENDS and base.startswith("onnxruntime"):
            if not variant:
                raise ValueError(f"backend {name!r}: name a decoder variant after '@'")
            exact = {"decoder_variant": variant, "exact_variant": True}  # the variant's own name
            options = BACKEND_OPTIONS.get(base, {}) | exact
            specs.append(BackendSpec(name, BACKENDS[base], options))
        elif name in BACKENDS:
            specs.append(BackendSpec(name, BACKENDS[name], dict(BACKEND_OPTIONS.get(name, {}))))
        elif name in SERVER_BACKENDS:
            continue  # measured by the CLI against --url, not loaded here
        elif name in NOT_AVAILABLE:
            skipped[name] = NOT_AVAILABLE[name]
        elif name in PEER_NAMES:
            skipped[name] = (
                f"a peer engine: pass --plugin {PEERS_SPEC} (engines: the peers extra, "
                "pip install -e '.[peers]')"
            )
        elif name == "reference":
            skipped[name] = (
                "the HF-transformers oracle lives outside the library: pass "
                f"--plugin {REFERENCE_SPEC} (or set {ENV_VAR})"
            )
        else:
            known = sorted({*BACKENDS, *plugins, *NOT_AVAILABLE, *SERVER_BACKENDS})
            raise ValueError(f"unknown backend {name!r}; known: {', '.join(known)}")
    return specs, skipped


def model_kind(path: Path) -> str:
    """``artifact`` (has manifest.json), ``checkpoint`` (has config.json) or ``missing``."""
    if (path / "manifest.json").is_file():
        return "artifact"
    if (path / "config.json").is_file():
        return "checkpoint"
    return "missing"


def model_dir_for(fmt: str, model: Path, artifacts: Path | None) -> tuple[Path | None, str | None]:
    """(directory to load, None) or (None, why not) for a backend taking *fmt*."""
    kind = model_kind(model)
    if fmt == "checkpoint":
        if kind == "checkpoint":
            return model, None
        return None, (
            f"needs a checkpoint; {model} is {'an artifact' if kind == 'artifact' else 'neither'}"
            " (pass the checkpoint as --model and the artifact directory as --artifacts)"
        )
    if kind == "artifact":
        return model, None
    if artifacts is not None and model_kind(artifacts) == "artifact":
        return artifacts, None
    return None, (
        "needs an artifact directory: make one with `python -m export onnx CKPT ART` "
        "and pass --artifacts ART"
    )
