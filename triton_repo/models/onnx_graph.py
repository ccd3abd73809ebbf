"""Triton Python model serving one exported graph with onnxruntime (CPU repositories).

Copied by ``python -m triton_repo build`` to ``<repo>/vision_encoder/1/model.py`` and
``<repo>/projector/1/model.py``, next to the graph file (its export name) and
``graph.json`` (its I/O spec from the artifact manifest). The tensor names are the
graph's own, so a GPU repository serves the same names from a ``tensorrt_plan`` engine.

With ``max_batch_size`` > 0 (the vision encoder), Triton's dynamic batcher hands
``execute`` several requests at once: their frames are concatenated along the batch axis
and run as one batch, then split back per request.
"""

from __future__ import annotations

import json
import os
import site
import sys
import traceback
from pathlib import Path
from typing import Any


def _add_site_dirs() -> None:
    # See trace_pipeline's model.py: the bundled stub ignores PYTHONPATH.
    for d in os.environ.get("TRACE_RT_SITE_DIRS", "").split(os.pathsep):
        if d and d not in sys.path:
            site.addsitedir(d)


_add_site_dirs()

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from trace_rt.graphs import GraphSpec  # noqa: E402
from trace_rt.serving.protocol import threads_per_instance  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        self.spec = GraphSpec.from_dict(json.loads((version_dir / "graph.json").read_text()))
        self.batched = int(config.get("max_batch_size", 0)) > 0
        threads = int(config.get("parameters", {}).get("threads", {}).get("string_value", 0))
        threads = threads or threads_per_instance(config) or 0
        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(version_dir / self.spec.file), opts, providers=["CPUExecutionProvider"]
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            names = self.spec.input_names
            feeds = [
                {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in names}
                for r in requests
            ]
            if self.batched and len(requests) > 1:
                sizes = [len(next(iter(f.values()))) for f in feeds]
                batch = {n: np.concatenate([f[n] for f in feeds]) for n in names}
                outs = self.session.run(self.spec.output_names, batch)
                cuts = np.cumsum(sizes)[:-1]
                split = [np.split(o, cuts) for o in outs]  # per output: per request
                per_request = [list(p) for p in zip(*split, strict=True)]
            else:
                per_request = [self.session.run(self.spec.output_names, f) for f in feeds]
        except Exception as e:  # answer every request of the batch, keep serving
            pb_utils.Logger.log_error(f"{self.spec.name}: {traceback.format_exc()}")
            error = pb_utils.TritonError(f"{self.spec.name}: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(n, np.ascontiguousarray(v))
                    for n, v in zip(self.spec.output_names, outs, strict=True)
                ]
            )
            for outs in per_request
        ]
