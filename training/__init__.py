"""Training-side tools for TRACE checkpoints (``python -m training --help``)."""
