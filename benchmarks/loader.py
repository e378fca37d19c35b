"""The training input pipeline alone vs the rate at which training consumes images.
``jobs/benchmark.py loader`` prints :func:`benchmark_loader`'s result as one JSON line; the target
is ``loader images/s >= 3 x training images/s``, so the input never holds a step up (also not
when the machine is busier, the model smaller or the images bigger).

Both sides run in one Ray task that reserves one training worker's CPUs
(``student.scaling.cpus_per_worker``), so at a worker's CPU priority, in alternating order (``repeats``):

* loader: the trainer's own code path without the model. ``must_ray.train.collate.read_tables`` (Parquet
  -> Ray Data, conformed to the tasks) -> ``cache_in_object_store`` (as ``train`` does for tables
  that fit) -> ``streaming_split`` (what Ray Train gives each worker) -> ``iter_torch_batches`` with
  ``TrainCollate`` (decode the image and every dense label, random crop + flip of both, targets)
  in Ray Data's prefetch threads. The first ``warmup_batches`` are not timed; epoch boundaries
  after them are (a training run pays them too);
* consumption: the trainer's ``train_step`` on already collated batches (``plain_train`` of the
  ``train`` benchmark with ``precollated=True``) with the trainer's torch threads
  (``student.scaling.cpus_per_worker``): the images per second one worker's step eats.

Also reported: ``collate_images_per_s``, ``TrainCollate`` alone on one thread, in-process (the
per-image decode + augment cost without Ray Data's threads).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

from benchmarks.common import check, median, positive, world_table
from benchmarks.options import Benchmark, at_least, option, workdir_option
from must_ray.config import Config

TARGET_RATIO = 3.0
DEFAULT_ROWS = 1024
DEFAULT_EPOCHS = 2
DEFAULT_WARMUP = 4


def _consume(iterator, collate_args: dict, batch_size: int, epochs: int, warmup_batches: int, prefetch: int,
             shuffle_buffer: int, seed: int) -> dict[str, Any]:
    """Iterate ``epochs`` epochs of a training shard like the worker loop does (a fresh collate
    and iterator per epoch), timing everything after the first ``warmup_batches`` batches."""
    from must_ray.train.collate import TrainCollate

    n = images = 0
    t0: Optional[float] = None
    first_batch_s = None
    t_start = time.perf_counter()
    for epoch in range(epochs):
        collate = TrainCollate(**collate_args, epoch=epoch)
        for batch in iterator.iter_torch_batches(batch_size=batch_size, collate_fn=collate, drop_last=True,
                                                 prefetch_batches=prefetch, local_shuffle_buffer_size=shuffle_buffer or None,
                                                 local_shuffle_seed=seed + epoch, device="cpu"):
            n += 1
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t_start
            if n == warmup_batches:
                t0 = time.perf_counter()
            elif n > warmup_batches:
                images += int(batch["image"].shape[0])
    if t0 is None or not images:
        raise ValueError(f"{n} batches in {epochs} epochs: fewer than the {warmup_batches} warm-up batches + 1")
    seconds = time.perf_counter() - t0
    return {"batches": n - warmup_batches, "images": images, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 2), "first_batch_s": round(first_batch_s, 3),
            "pid": os.getpid(), "niceness": os.nice(0)}


def _worker(iterator, cfg_dict: dict, table: str, collate_args: dict, epochs: int, warmup_batches: int, steps: int,
            repeats: int) -> dict[str, list]:
    """The Ray task: ``repeats`` rounds of (loader epochs, training steps), alternating the order."""
    import torch

    from benchmarks.train import plain_train
    from must_ray.config import config_from_dict

    cfg = config_from_dict(cfg_dict)
    tcfg = cfg.student
    threads = max(1, int(tcfg.scaling.cpus_per_worker))
    before = torch.get_num_threads()
    out: dict[str, list] = {"loader": [], "train_step": []}

    def loader() -> None:
        out["loader"].append(_consume(iterator, collate_args, int(tcfg.global_batch_size), epochs, warmup_batches,
                                      tcfg.input.prefetch_batches, tcfg.input.shuffle_buffer, tcfg.seed))

    def step() -> None:
        out["train_step"].append(plain_train(cfg, table, threads, 3, steps, precollated=True))

    try:
        for r in range(repeats):
            for side in ((loader, step) if r % 2 == 0 else (step, loader)):
                side()
    finally:
        torch.set_num_threads(before)  # a pooled Ray worker: leave it as it was
    return out


def ray_loader(cfg: Config, table: str, epochs: int, warmup_batches: int, steps: int, repeats: int) -> dict[str, list]:
    """The trainer's input path for one worker (batch = the global batch) and the training step's
    consumption, measured in one Ray task (see the module doc)."""
    import ray

    from must_ray.table import table_classes, table_rows, table_tasks
    from must_ray.train.dataset import cache_in_object_store, read_tables
    from must_ray.typed_config import config_to_dict

    tcfg = cfg.student
    names, classes, rows = table_tasks([table]), table_classes([table]), table_rows(table)
    batch = int(tcfg.global_batch_size)
    ds = read_tables([table], names, seed=tcfg.seed, read_cpus=tcfg.input.read_cpus)
    ds = cache_in_object_store(ds, rows, block_rows=max(batch, 32), seed=tcfg.seed)
    split = ds.streaming_split(1, equal=True)[0]
    collate_args = {"tasks": names, "num_classes": len(classes), "task_cfgs": cfg.tasks,
                    "image_size": int(tcfg.input.image_size or cfg.world.image_size), "augment": tcfg.input.augment,
                    "crop_scale_min": tcfg.input.crop_scale_min, "seed": tcfg.seed}
    worker = ray.remote(num_cpus=tcfg.scaling.cpus_per_worker)(_worker)
    return ray.get(worker.remote(split, config_to_dict(cfg), table, collate_args, epochs, warmup_batches, steps, repeats))


def collate_alone(cfg: Config, table: str, batches: int = 4) -> dict[str, Any]:
    """``TrainCollate`` on one thread, in this process, on ``batches`` global batches of ``table``."""
    import pyarrow.parquet as pq

    from must_ray.table import conform, table_classes, table_tasks
    from must_ray.train.collate import TrainCollate

    tcfg = cfg.student
    names, classes = table_tasks([table]), table_classes([table])
    data = conform(pq.read_table(table), names)
    batch = int(tcfg.global_batch_size)
    inp = tcfg.input
    collate = TrainCollate(names, len(classes), cfg.tasks, image_size=int(inp.image_size or cfg.world.image_size),
                           augment=inp.augment, crop_scale_min=inp.crop_scale_min, seed=tcfg.seed)
    collate(data.slice(0, batch))  # warm-up (imports, first allocations)
    n = min(batches, max(1, data.num_rows // batch))
    t0 = time.perf_counter()
    for i in range(n):
        collate(data.slice(i * batch, batch))
    seconds = time.perf_counter() - t0
    return {"images": n * batch, "seconds": round(seconds, 3), "images_per_s": round(n * batch / seconds, 2)}


@dataclass(frozen=True)
class LoaderOptions:
    """``jobs/benchmark.py loader``'s settings."""

    rows: int = option(DEFAULT_ROWS, "--rows", f"rows of the world table (default {DEFAULT_ROWS})", type=at_least(1))
    epochs: int = option(DEFAULT_EPOCHS, "--epochs", f"epochs the loader runs (default {DEFAULT_EPOCHS})",
                         type=at_least(1))
    warmup_batches: int = option(DEFAULT_WARMUP, "--warmup", f"untimed batches at the start (default {DEFAULT_WARMUP})",
                                 type=at_least(1))
    steps: int = option(20, "--steps", "timed training steps of the consumption side (default 20)", type=at_least(1))
    repeats: int = option(2, "--repeats", "rounds, alternating the order; medians (default 2)", type=at_least(1))
    workdir: Optional[str] = workdir_option()


def benchmark_loader(cfg: Config, options: LoaderOptions = LoaderOptions()) -> dict[str, Any]:
    """The loader's images/s (Ray Data path, ``epochs`` epochs of a ``rows``-row world table) vs
    the training step's consumption (``steps`` timed steps on collated batches, after 3 warm-up
    steps), ``repeats`` rounds alternating the order, medians. Needs a connected Ray."""
    rows, epochs, warmup_batches = options.rows, options.epochs, options.warmup_batches
    steps, repeats = options.steps, options.repeats
    for name, v in (("--rows", rows), ("--epochs", epochs), ("--warmup", warmup_batches), ("--steps", steps),
                    ("--repeats", repeats)):
        positive(name, v)
    batch = int(cfg.student.global_batch_size)
    if (rows // batch) * epochs <= warmup_batches:
        raise ValueError(f"--rows {rows} x --epochs {epochs} give {(rows // batch) * epochs} batches of {batch}: "
                         f"no more than the {warmup_batches} warm-up batches")
    threads = max(1, int(cfg.student.scaling.cpus_per_worker))
    load_before = os.getloadavg()[0]
    own = options.workdir is None
    workdir = options.workdir or tempfile.mkdtemp(prefix="must-ray-bench-loader-")
    try:
        table = world_table(cfg, os.path.join(workdir, "table"), rows)
        runs = ray_loader(cfg, table, epochs, warmup_batches, steps, repeats)
        loader_runs, step_runs = runs["loader"], runs["train_step"]
        collate = collate_alone(cfg, table)
        loader = median(x["images_per_s"] for x in loader_runs)
        consume = median(x["images_per_s"] for x in step_runs)
        ratio = round(loader / consume, 3)
        return {
            "benchmark": "loader", "rows": rows, "epochs": epochs, "warmup_batches": warmup_batches, "batch": batch,
            "image_size": int(cfg.student.input.image_size or cfg.world.image_size), "repeats": repeats,
            "loader_images_per_s": loader, "train_images_per_s": consume, "ratio": ratio, "target_ratio": TARGET_RATIO,
            "train_threads": threads, "collate_images_per_s": collate["images_per_s"],
            "checks": [check("input pipeline / training consumption, images/s", ratio, ">=", TARGET_RATIO)],
            "niceness": loader_runs[0]["niceness"], "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "runs": {"loader": loader_runs, "train_step": step_runs, "collate_alone": collate},
        }
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark("loader", "training input pipeline alone vs training consumption, images/s", benchmark_loader,
                      LoaderOptions, smoke=("--rows", "64", "--epochs", "1", "--warmup", "1", "--steps", "2",
                                            "--repeats", "1"),
                      description="The trainer's input path (read_tables -> cache -> streaming_split -> "
                                  "iter_torch_batches with TrainCollate) consumed without a model, vs the images/s "
                                  "of the trainer's step on already collated batches.")

__all__ = ["BENCHMARK", "LoaderOptions", "benchmark_loader", "ray_loader", "collate_alone"]
