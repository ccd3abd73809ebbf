"""Triton Inference Server model repositories for TRACE (``python -m triton_repo build``)."""
