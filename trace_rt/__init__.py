"""trace-rt: the deployment runtime for TRACE, a video LLM for temporal grounding.

``import trace_rt`` is light: no torch, no transformers. The PyTorch model lives in
:mod:`trace_rt.model` and is imported only by the torch backend, export and training.
"""

__version__ = "0.1.0"
