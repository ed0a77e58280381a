"""Benchmarks of the training step, the input pipeline, the sweep machinery and channel pruning:
run each from the repository root as ``python -m benchmarks.<name>`` (see README.md here)."""
