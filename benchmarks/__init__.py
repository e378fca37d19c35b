"""Benchmarks behind ``jobs/benchmark.py`` (docs/benchmarks.md): one module per benchmark, each
exposing one function that returns a JSON-ready dict with both figures, the ratio and a ``checks``
list (figure, target, met): ``label.benchmark_label``, ``train.benchmark_train``,
``loader.benchmark_loader``, ``flops.benchmark_flops``, ``memory.benchmark_memory``,
``scaling.benchmark_scaling``. ``common`` holds what they share, ``doc`` renders the docs page."""
