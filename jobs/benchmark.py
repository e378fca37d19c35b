"""Benchmarks against plain PyTorch and the design's targets: ``python jobs/benchmark.py --help``
(the sub-commands and their flags live in ``benchmarks/cli.py``; figures in docs/benchmarks.md)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is deliberately not installed

from benchmarks.cli import main  # noqa: E402
from must_ray.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(main)
