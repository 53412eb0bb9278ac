"""Benchmarks of the lego kernels, bricks, training step and samplers against DiT (pytest-benchmark suites).

Run everything and write the report with ``python -m benchmarks.report`` (see benchmarks/README.md).
"""
