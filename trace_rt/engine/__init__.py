"""Many sequences on one backend: continuous batching and a video/prefix cache.

- :mod:`trace_rt.engine.sequence`: one request's decoding state (heads, grammar, sampler,
  budget, stop), the interleaved time/score/text rules written once.
- :mod:`trace_rt.engine.scheduler`: the :class:`Engine` that admits sequences into KV
  slots between steps, decodes them in one batch and retires the finished.
- :mod:`trace_rt.engine.cache`: the :class:`VideoCache` of encoded videos and their
  prompt-prefix K/V, keyed by a content hash (the ``video_id`` a server returns).
"""

from trace_rt.engine.cache import VideoCache, content_hash, model_fingerprint, video_key
from trace_rt.engine.scheduler import Engine, EngineStats
from trace_rt.engine.sequence import GenerationConfig, Sampler, Sequence, Status

__all__ = [
    "Engine",
    "EngineStats",
    "GenerationConfig",
    "Sampler",
    "Sequence",
    "Status",
    "VideoCache",
    "content_hash",
    "model_fingerprint",
    "video_key",
]
