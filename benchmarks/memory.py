"""Peak memory of a labelling actor for N and 4N images. ``jobs/benchmark.py memory`` prints
:func:`benchmark_memory`'s result as one JSON line; the target is growth < 10 %: shards stream
through the actor (decode tasks -> actor -> committed part file) and nothing accumulates per image.

Each run is the real labelling job (``must_ray.label.run.run_labeling``) on world images written as
PNG files, with the configured teachers (random-init where no checkpoint exists), into a fresh
output. Every teacher actor reports its own peak RSS (``getrusage`` high-water mark, read once
per committed shard: one syscall, no sampling thread, nothing added to the work) and the run's
profile (``benchmarks.label_profile``) carries the largest as ``actor_peak_rss_mb``. The N-image run goes first, so an actor
process that Ray reused for the 4N run could only hide a decrease, never growth.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from benchmarks.common import check, positive
from benchmarks.options import Benchmark, at_least, option, workdir_option
from must_ray.config import Config

TARGET_GROWTH = 0.10
DEFAULT_NUM = 512


def labeling_run(cfg: Config, image_dir: str, out_dir: str) -> dict[str, Any]:
    """One labelling run into a fresh ``out_dir``; the summary fields the memory and scaling
    benchmarks read (the job's summary and its profile, :mod:`benchmarks.label_profile`)."""
    from benchmarks.label_profile import profiled_labeling
    from must_ray.label.store import OutputStore  # imports torch and ray

    OutputStore(out_dir).clear()  # the table, its quarantine and its manifest: a fresh run
    s = profiled_labeling(cfg, image_dir, out_dir)
    keys = ("inputs", "rows", "quarantined", "shards", "actors_used", "end_to_end_images_per_s", "steady_images_per_s",
            "pipeline_s", "actor_start_s", "actor_peak_rss_mb", "actor_cpu_s", "stage_s", "shards_decoded_in_actor",
            "pool_images_per_s", "actor_ready_spread_s")
    return {k: s[k] for k in keys}


@dataclass(frozen=True)
class MemoryOptions:
    """``jobs/benchmark.py memory``'s settings."""

    num: int = option(DEFAULT_NUM, "--num", f"N (default {DEFAULT_NUM})", type=at_least(1))
    workdir: Optional[str] = workdir_option()


def benchmark_memory(cfg: Config, options: MemoryOptions = MemoryOptions()) -> dict[str, Any]:
    """Label ``num`` then ``4 * num`` images (the first ``num`` are the same files) and compare the
    teacher actors' peak RSS. Needs a connected Ray."""
    from benchmarks.label import usable_teachers, write_benchmark_images

    num = options.num
    positive("--num", num)
    cfg, kinds = usable_teachers(cfg)
    own = options.workdir is None
    workdir = options.workdir or tempfile.mkdtemp(prefix="must-ray-bench-memory-")
    try:
        big = os.path.join(workdir, "images_4n")
        small = os.path.join(workdir, "images_n")
        files = write_benchmark_images(cfg, big, 4 * num)
        os.makedirs(small, exist_ok=True)
        for path in files[:num]:
            os.link(path, os.path.join(small, os.path.basename(path)))
        run_n = labeling_run(cfg, small, os.path.join(workdir, "labels_n"))
        run_4n = labeling_run(cfg, big, os.path.join(workdir, "labels_4n"))
        rss_n, rss_4n = run_n["actor_peak_rss_mb"], run_4n["actor_peak_rss_mb"]
        growth = round(rss_4n / rss_n - 1.0, 4)
        return {
            "benchmark": "memory", "images_n": num, "images_4n": 4 * num, "teachers": kinds,
            "shard_size": cfg.label.shard_size, "batch_size": cfg.label.batch_size,
            "image_size": cfg.label.image_size or cfg.world.image_size,
            "rss_n_mb": rss_n, "rss_4n_mb": rss_4n, "growth": growth, "target_growth": TARGET_GROWTH,
            "checks": [check(f"teacher actor peak RSS growth, {num} -> {4 * num} images", growth, "<", TARGET_GROWTH)],
            "runs": {"n": run_n, "4n": run_4n},
        }
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark("memory", "teacher actor peak RSS for N and 4N images", benchmark_memory, MemoryOptions,
                      smoke=("--num", "8"),
                      description="Labels N then 4N images with the real labelling job; each teacher actor reports "
                                  "its peak RSS (getrusage high-water mark) with every shard.")

__all__ = ["BENCHMARK", "MemoryOptions", "benchmark_memory", "labeling_run"]
