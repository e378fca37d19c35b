"""The labelling driver at internet scale. ``jobs/benchmark.py scale`` prints
:func:`benchmark_scale`'s result as one JSON line. Two parts:

* **plan + describe + verify** of N synthetic ids (default 1M, 4M, 16M): the world's unlabeled
  split as an index range (nothing rendered). Each size runs in a fresh driver process (its peak
  RSS is that size's alone), connected to the benchmark's Ray: ``LabelRun.open`` (the plan, written
  in pieces by Ray tasks), ``LabelRun.pending`` (the shard descriptors), then every shard
  committed as a part file holding its ids (Ray tasks, not timed: the stand-in for labelling), then
  ``label.verify`` (the exactly-once check). Reported: seconds of each phase and the driver's peak
  RSS (``getrusage`` high-water mark) after each. Targets: peak RSS grows < 200 MiB from the
  smallest to the largest size; planning the largest takes < 2 minutes.
* **labelling seconds per image** for 2k, 8k, 32k rendered images (``world:unlabeled`` rendered
  in the decode tasks, the configured teachers, random-init where no checkpoint exists): the
  steady rate of the job's summary. Target: the largest within 10 % of the smallest.
"""
from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

from benchmarks.common import check, module_main, run_module, with_overrides
from benchmarks.options import Benchmark, at_least, option, workdir_option
from must_ray.config import Config, config_from_dict
from must_ray.typed_config import config_to_dict

DEFAULT_IDS = (1_000_000, 4_000_000, 16_000_000)
DEFAULT_IMAGES = (2048, 8192, 32768)
TARGET_RSS_GROWTH_MB = 200
TARGET_PLAN_S = 120
TARGET_PER_IMAGE_GROWTH = 0.10


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def commit_ids(store, piece: str, shards: list[tuple[int, int]]) -> int:
    """Commit ``shards`` of plan piece ``piece`` as part files holding only their ids (a Ray task)."""
    import pyarrow as pa

    from must_ray.label.inputs import read_plan_batch
    from must_ray.label.store import QUARANTINE_SCHEMA

    for shard, batch in shards:
        ids = read_plan_batch(piece, batch).column("image_id")
        store.commit_shard(shard, pa.table({"image_id": ids}), QUARANTINE_SCHEMA.empty_table())
    return len(shards)


def plan_describe_verify(spec: dict[str, Any]) -> dict[str, Any]:
    """One size in this (fresh) process: plan, describe, commit ids, verify; seconds and peak RSS."""
    import ray
    import ray.cloudpickle

    from must_ray.label.plan import run_tasks
    from must_ray.label.run import LabelRun
    from must_ray.label.verify import verify_output

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address=spec["ray_address"], log_to_driver=False)
    cfg = config_from_dict(spec["cfg"])
    out: dict[str, Any] = {"ids": spec["ids"], "rss_start_mb": _rss_mb()}
    t0 = time.perf_counter()
    run = LabelRun(cfg, "world:unlabeled", spec["output"])
    plan = run.open()
    out.update(plan_s=round(time.perf_counter() - t0, 2), rss_plan_mb=_rss_mb(), shards=plan.num_shards,
               pieces=len(plan.pieces), files_per_dir=run.store.files_per_dir)
    t0 = time.perf_counter()
    pending = run.pending(plan)
    out.update(describe_s=round(time.perf_counter() - t0, 2), rss_describe_mb=_rss_mb(),
               descriptors=len(pending.descriptors))
    t0 = time.perf_counter()
    run_tasks([(commit_ids, (run.store, plan.piece_uri(k), shards)) for k, shards in plan.by_piece()], True,
              tag="commit")
    out["commit_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    counts = verify_output(run.store, plan)
    out.update(verify_s=round(time.perf_counter() - t0, 2), rss_peak_mb=_rss_mb(), rows=counts["rows"],
               verify_tasks=counts["exactly_once"]["tasks"])
    return out


@dataclass(frozen=True)
class ScaleOptions:
    """``jobs/benchmark.py scale``'s settings."""

    ids: Optional[list[int]] = option(None, "--ids", "synthetic ids to plan, describe and verify (repeatable; "
                                      f"default {', '.join(map(str, DEFAULT_IDS))})", type=at_least(1), repeat=True)
    images: Optional[list[int]] = option(None, "--images", "rendered images to label (repeatable; default "
                                         f"{', '.join(map(str, DEFAULT_IMAGES))}; 0 = skip)", type=at_least(0),
                                         repeat=True)
    shard_size: int = option(1024, "--shard-size", "inputs per shard for the plan part (default 1024)",
                             type=at_least(1))
    plot: Optional[str] = option(None, "--plot", "write a log-log plot of driver peak RSS and seconds vs ids (PNG)")
    workdir: Optional[str] = workdir_option()


def plot_scale(series: dict[str, list[dict[str, Any]]], path: str) -> None:
    """Log-log plot of the plan part: driver peak RSS and plan / describe / verify seconds against
    the number of ids, one line per series (e.g. before and after a change)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
    for name, plans in series.items():
        ids = [p["ids"] for p in plans]
        ax_rss.plot(ids, [p["rss_peak_mb"] for p in plans], "o-", label=name)
        for phase, style in (("plan_s", "o-"), ("describe_s", "s--"), ("verify_s", "^:")):
            ax_s.plot(ids, [max(p[phase], 0.01) for p in plans], style, label=f"{name}: {phase[:-2]}")
    for ax, ylabel in ((ax_rss, "driver peak RSS (MiB)"), (ax_s, "seconds")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("input ids")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("labelling driver: plan + describe + verify (world index range, no rendering)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label_per_image(cfg: Config, num: int, out: str) -> dict[str, Any]:
    from must_ray.label.run import run_labeling
    from must_ray.label.store import OutputStore

    OutputStore(out).clear()
    split = dict(config_to_dict(cfg)["world"]["splits"]["unlabeled"], num=num)
    s = run_labeling(with_overrides(cfg, world={"splits": {"unlabeled": split}}), "world:unlabeled", out,
                     log_every_s=30.0)
    OutputStore(out).clear()
    rate = s["images_per_s"]
    return {"images": num, "rows": s["rows"], "steady_images_per_s": rate,
            "s_per_image": round(1.0 / rate, 5) if rate else None, "startup_s": s["startup_s"],
            "pipeline_s": s["pipeline_s"], "shards": s["shards"]}


def benchmark_scale(cfg: Config, options: ScaleOptions = ScaleOptions()) -> dict[str, Any]:
    """Both parts of the module docstring. Needs a connected Ray."""
    import ray

    from benchmarks.label import usable_teachers

    ids = list(options.ids or DEFAULT_IDS)
    images = [n for n in (options.images or DEFAULT_IMAGES) if n > 0]
    own = options.workdir is None
    workdir = options.workdir or tempfile.mkdtemp(prefix="must-ray-bench-scale-")
    cfg, kinds = usable_teachers(cfg)
    try:
        plans = []
        for n in ids:
            out = os.path.join(workdir, f"plan_{n}")
            split = dict(config_to_dict(cfg)["world"]["splits"]["unlabeled"], num=n)
            sized = with_overrides(cfg, world={"splits": {"unlabeled": split}},
                                   label={"shard_size": options.shard_size, "overwrite": True})
            spec = {"ids": n, "output": out, "cfg": config_to_dict(sized),
                    "ray_address": ray.get_runtime_context().gcs_address}
            plans.append(run_module("benchmarks.scale", spec, threads=1))
            for d in (out, out + "_quarantine", out + "_manifest"):
                shutil.rmtree(d, ignore_errors=True)
        labels = [_label_per_image(cfg, n, os.path.join(workdir, f"labels_{n}")) for n in images]
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    growth = round(plans[-1]["rss_peak_mb"] - plans[0]["rss_peak_mb"], 1)
    checks = [check(f"driver peak RSS growth, {ids[0]} -> {ids[-1]} ids (MiB)", growth, "<", TARGET_RSS_GROWTH_MB),
              check(f"planning {ids[-1]} ids (s)", plans[-1]["plan_s"], "<", TARGET_PLAN_S)]
    per_image_growth = None
    if len(labels) >= 2 and labels[0]["s_per_image"] and labels[-1]["s_per_image"]:
        per_image_growth = round(labels[-1]["s_per_image"] / labels[0]["s_per_image"] - 1.0, 4)
        checks.append(check(f"labelling s/image, {images[0]} -> {images[-1]} images (growth)", per_image_growth,
                            "<", TARGET_PER_IMAGE_GROWTH))
    if options.plot:
        plot_scale({"this run": plans}, options.plot)
    return {"benchmark": "scale", "teachers": kinds, "shard_size": options.shard_size, "plans": plans,
            "labelling": labels, "rss_growth_mb": growth, "per_image_growth": per_image_growth,
            "loadavg_1m": round(os.getloadavg()[0], 2), "checks": checks}


BENCHMARK = Benchmark("scale", "driver memory and seconds to plan/describe/verify 1M-16M ids; s/image at 2k-32k",
                      benchmark_scale, ScaleOptions, smoke=("--ids", "2000", "--ids", "4000", "--images", "16"),
                      description="Plans, describes and verifies N synthetic ids (world index range, no rendering) "
                                  "in a fresh driver per size, reporting its peak RSS and seconds; then labels 2k, "
                                  "8k and 32k rendered images and reports the steady seconds per image.")

__all__ = ["BENCHMARK", "ScaleOptions", "benchmark_scale", "plan_describe_verify", "commit_ids", "plot_scale"]

if __name__ == "__main__":
    module_main(plan_describe_verify)
