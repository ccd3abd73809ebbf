"""``trace-rt eval``: TRACE's benchmarks with the original's files, rules and metrics.

Modules: :mod:`~trace_rt.evaluation.annotations` (readers for the official annotation
files), :mod:`~trace_rt.evaluation.videos` (finding videos by id, safely),
:mod:`~trace_rt.evaluation.reformat` (generated ids -> predictions, the original's
``reformat_*.py`` rules and the lenient variant), :mod:`~trace_rt.evaluation.metrics`
(moment retrieval, highlights), :mod:`~trace_rt.evaluation.dense` and
:mod:`~trace_rt.evaluation.captions` (dense captioning: P/R/F1, CIDEr-D, METEOR,
SODA_c), :mod:`~trace_rt.evaluation.scoring` (prediction files -> metrics),
:mod:`~trace_rt.evaluation.runner` (resumable runs) and
:mod:`~trace_rt.evaluation.report`. Nothing here imports torch.
"""
