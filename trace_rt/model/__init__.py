"""The PyTorch TRACE model (needs torch; never imported by ``import trace_rt``).

Shared by the torch backend, ``export`` and ``training``.
"""

from trace_rt.model.checkpoint import load_model, save_model
from trace_rt.model.trace import TraceModel

__all__ = ["TraceModel", "load_model", "save_model"]
