"""Peers for ``python -m trace_rt.bench``: the engines users would pick instead for the LLM.

``--plugin benchmarks.peers`` registers them all (or name one: ``--plugin
llama.cpp=benchmarks.peers.llamacpp:LlamaCpp``); ask for them in ``--backends``:

| name | engine | precision | model file |
|---|---|---|---|
| ``ort-genai`` | onnxruntime-genai, CPU EP | fp32 | its model builder, ``-p fp32`` |
| ``ort-genai-int4`` | onnxruntime-genai, CPU EP | int4 | its model builder, ``-p int4`` |
| ``llama.cpp`` | llama-cpp-python | fp32 | GGUF F32 (``convert_hf_to_gguf.py``) |
| ``llama.cpp-q8_0`` | llama-cpp-python | int8 | GGUF Q8_0 (``llama_model_quantize``) |
| ``llama.cpp-q4_0`` | llama-cpp-python | int4 | GGUF Q4_0 (``llama_model_quantize``) |

Each takes the TRACE checkpoint (``--model``) and converts its LLM once (``python -m
export hf-llm``, then the engine's own tool), cached per checkpoint (see
:mod:`benchmarks.peers.files`). The engines come with the ``peers`` extra (``setup.sh``
installs it); without them the bench reports each peer as skipped, with the command to
install. How the bench measures a peer: :mod:`trace_rt.bench.peer`.

This module imports no engine: the bench imports it to read :data:`PLUGINS`.
"""

PLUGINS = {
    "ort-genai": "benchmarks.peers.ortgenai:OrtGenai",
    "ort-genai-int4": "benchmarks.peers.ortgenai:OrtGenaiInt4",
    "llama.cpp": "benchmarks.peers.llamacpp:LlamaCpp",
    "llama.cpp-q8_0": "benchmarks.peers.llamacpp:LlamaCppQ8_0",
    "llama.cpp-q4_0": "benchmarks.peers.llamacpp:LlamaCppQ4_0",
}
