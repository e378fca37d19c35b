"""Benchmarks behind ``jobs/benchmark.py``: each module exposes one function that returns a
JSON-ready dict (``label``: :func:`must_ray.benchmarks.label.benchmark_label`)."""
