"""Training step throughput: the Ray Train student (``must_ray.train.driver.train``) vs a plain PyTorch
loop on the same Parquet table, the same model and the same step. ``jobs/benchmark.py train``
prints :func:`benchmark_train`'s result as one JSON line; the target is ``ray / plain >= 0.95`` for
every Ray configuration (default: 1 worker holding every core, and one worker per core).

Both sides train ``MultiTaskModel`` on every task of a world table (ground truth of all five
tasks: a pseudo-label table's schema) with the trainer's own pieces: ``build_module``,
``build_optimizer`` and ``train_step`` of ``must_ray.train.step`` / ``must_ray.train.optim``, and ``TrainCollate`` (decode,
random crop + flip of image and labels) for the input. The plain loop holds the table in memory,
collates each batch inline (a map-style dataset with ``DataLoader(num_workers=0)``) and runs the
step, in a Ray task only so that it gets the Ray workers' CPU priority and no process start. The Ray side is the real
job: Ray Data (table cached in the object store), ``iter_torch_batches`` with the collate in
prefetch threads, DDP/gloo with several workers, reports every ``warmup_steps`` steps.

Steady state on both sides: the first ``warmup_steps`` steps are not timed. The plain loop times
its remaining ``steps``; the Ray side takes the rank-0 report timestamps in ``metrics.jsonl``
(report at step ``warmup_steps`` to the final report), so Ray Train's start-up (controller,
worker processes, imports) is excluded and the per-report overhead is included. (The job's own
``summary.json`` ``images_per_s`` is the mean over all report windows, the first one included,
which holds model warm-up and input-pipeline fill: it is reported too, as ``trainer_images_per_s``.)
The table has one more global batch of rows than the run takes steps, so no epoch boundary falls
in the run on either side.

The plain loop runs with 1 torch thread and with one per core; the faster is the baseline of every
Ray configuration (``ratio``, the target); ``ratio_same_threads`` compares with the plain loop
that has the worker's torch threads (Ray's own overhead, like for like). Ray Train's start-up
makes its runs the expensive ones, so every Ray round is bracketed by plain runs (plain, Ray,
plain, Ray, plain ... for ``repeats`` Ray rounds): load that drifts during the benchmark biases
neither side; each side reports its median.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

from benchmarks.common import check, median, positive, ray_cpus, ray_worker_niceness, with_overrides, world_table
from benchmarks.options import Benchmark, at_least, checked_by, option, positive_float, workdir_option
from must_ray.config import Config, config_from_dict
from must_ray.typed_config import ConfigError, config_to_dict

TARGET_RATIO = 0.95
DEFAULT_WARMUP = 8
DEFAULT_STEPS = 24
DEFAULT_PLAIN_MAX_S = 20.0


def parse_ray_config(text: str) -> tuple[int, float]:
    """``"WORKERSxCPUS"`` (e.g. ``2x1``, ``1x2``, ``2x0.8``) -> ``(workers, cpus_per_worker)``."""
    try:
        w, c = text.lower().split("x")
        workers, cpus = int(w), float(c)
    except ValueError:
        raise ConfigError(f"Ray configuration must be WORKERSxCPUS (e.g. 2x1), got {text!r}") from None
    if workers < 1 or cpus <= 0:
        raise ConfigError(f"Ray configuration {text!r}: workers >= 1 and CPUs per worker > 0 required")
    return workers, cpus


def config_name(workers: int, cpus: float) -> str:
    """``(2, 1.0)`` -> ``"2x1"``."""
    return f"{workers}x{cpus:g}"


# ----------------------------------------------------------------------------- the plain loop


def plain_train(cfg: Config, table: str, threads: int, warmup_steps: int, steps: int,
                precollated: bool = False, max_seconds: Optional[float] = None) -> dict[str, Any]:
    """The baseline: one process, no Ray. Reads the table into memory, then per step takes the next
    ``student.global_batch_size`` rows of a seeded permutation, collates them with the trainer's
    ``TrainCollate`` and runs the trainer's ``train_step``. ``precollated``: collate a few batches
    once and cycle them (the step alone: the rate at which training *consumes* images).
    ``max_seconds`` caps the timed phase (and the warm-up at a third of it) for configurations
    that crawl on a busy machine; the rate is over the steps done (``steps`` in the result)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from must_ray.models.precision import autocast, resolve_precision
    from must_ray.table import conform, table_classes, table_tasks
    from must_ray.train.collate import TrainCollate, split_batch
    from must_ray.train.optim import build_ema, build_optimizer
    from must_ray.train.step import build_module, train_step

    torch.set_num_threads(threads)
    tcfg = cfg.student
    names, classes = table_tasks([table]), table_classes([table])
    image_size = int(tcfg.input.image_size or cfg.world.image_size)
    batch_size = int(tcfg.global_batch_size)
    total = warmup_steps + steps
    torch.manual_seed(tcfg.seed)
    tasks, module = build_module(cfg, tcfg, names, len(classes))
    if tcfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(module, tcfg, total)
    ema = build_ema(module.model, tcfg.ema_decay)
    data = conform(pq.read_table(table), names)
    collate = TrainCollate(names, len(classes), cfg.tasks, image_size=image_size, augment=tcfg.input.augment,
                           crop_scale_min=tcfg.input.crop_scale_min, seed=tcfg.seed, epoch=0)
    order = np.random.default_rng(tcfg.seed).permutation(data.num_rows)
    if data.num_rows < batch_size * (1 if precollated else total):
        raise ValueError(f"table {table} has {data.num_rows} rows, fewer than the run needs")
    cached = min(4, data.num_rows // batch_size) if precollated else 0
    cache = [collate(data.take(order[i * batch_size:(i + 1) * batch_size])) for i in range(cached)]
    precision = resolve_precision(tcfg.precision, "cpu")
    forward_precision = (lambda: autocast(precision, "cpu")) if precision != "fp32" else None
    module.train()
    cap = float("inf") if max_seconds is None else float(max_seconds)
    collate_s, timed, warm = 0.0, 0, warmup_steps
    t_begin = time.perf_counter()
    t_start: Optional[float] = None
    for i in range(total):
        now = time.perf_counter()
        if t_start is None and (i >= warmup_steps or (i >= 1 and now - t_begin > cap / 3)):
            t_start, collate_s, warm = now, 0.0, i
        if t_start is not None and (timed >= steps or (timed >= 1 and now - t_start > cap)):
            break
        t0 = time.perf_counter()
        batch = cache[i % len(cache)] if precollated else collate(data.take(order[i * batch_size:(i + 1) * batch_size]))
        collate_s += time.perf_counter() - t0
        images, targets = split_batch(batch)
        present = {t: bool(targets[t]["mask"].any()) for t in names}
        train_step(module, module, tasks, images, targets, present, optimizer, scheduler,
                   grad_clip=tcfg.optimizer.grad_clip, ema=ema, step=i, channels_last=tcfg.channels_last,
                   autocast=forward_precision)
        if t_start is not None:
            timed += 1
    seconds = time.perf_counter() - t_start
    return {"threads": threads, "warmup_steps": warm, "steps": timed, "global_batch": batch_size,
            "precollated": precollated, "capped": timed < steps or warm < warmup_steps, "seconds": round(seconds, 3),
            "steps_per_s": round(timed / seconds, 3), "images_per_s": round(timed * batch_size / seconds, 2),
            "collate_s": round(collate_s, 3)}


def _plain_task(cfg_dict: dict, table: str, threads: int, warmup_steps: int, steps: int,
                max_seconds: Optional[float]) -> dict[str, Any]:
    import torch

    before = torch.get_num_threads()
    try:
        result = plain_train(config_from_dict(cfg_dict), table, threads, warmup_steps, steps, max_seconds=max_seconds)
    finally:
        torch.set_num_threads(before)  # a pooled Ray worker: leave it as it was
    return {**result, "niceness": os.nice(0)}


def run_plain(cfg: Config, table: str, threads: int, warmup_steps: int, steps: int,
              max_seconds: Optional[float] = None) -> dict[str, Any]:
    """:func:`plain_train` in a Ray task that reserves ``threads`` CPUs. The loop itself is plain
    PyTorch (no Ray Data, no Ray Train); the task only gives it a process with the Ray side's CPU
    priority (Ray starts workers at nice 15) without a process start per run."""
    import ray

    task = ray.remote(num_cpus=threads)(_plain_task)
    return ray.get(task.remote(config_to_dict(cfg), table, threads, warmup_steps, steps, max_seconds))


# ----------------------------------------------------------------------------- the Ray Train side


def steady_rate(history: list[dict], warmup_steps: int) -> dict[str, Any]:
    """Steady-state throughput from a run's ``metrics.jsonl`` rows: steps and images between the
    first report at or after ``warmup_steps`` and the last report, over the time between them."""
    start = next((m for m in history if m["step"] >= warmup_steps), None)
    end = history[-1] if history else None
    if start is None or end is None or end["step"] <= start["step"]:
        raise RuntimeError(f"no reports after the {warmup_steps} warm-up steps to time (history: {len(history)} rows)")
    steps = end["step"] - start["step"]
    seconds = end["time"] - start["time"]
    window = [m for m in history if start["step"] < m["step"] <= end["step"]]
    return {"steps": steps, "seconds": round(seconds, 3), "steps_per_s": round(steps / seconds, 3),
            "images_per_s": round(steps * end["global_batch"] / seconds, 2),
            "data_wait_frac": round(sum(m["data_wait_frac"] for m in window) / len(window), 4)}


def ray_train(cfg: Config, table: str, workers: int, cpus: float, warmup_steps: int, steps: int,
              workdir: str) -> dict[str, Any]:
    """The production path: ``must_ray.train.driver.train`` (student, every task of ``table``) with
    ``workers`` x ``cpus`` CPUs, ``warmup_steps + steps`` steps, a report every ``warmup_steps``
    steps and one checkpoint at the end. Needs a connected Ray."""
    from must_ray.io import HISTORY_FILE
    from must_ray.train.driver import train

    total = warmup_steps + steps
    name = f"bench-train-{config_name(workers, cpus)}-{int(time.time() * 1000)}"
    run_cfg = with_overrides(cfg, student={
        "schedule": {"max_steps": total}, "scaling": {"num_workers": [workers, workers], "cpus_per_worker": cpus},
        "report_every_steps": warmup_steps, "data": [], "tasks": [],
        "checkpoint": {"every_steps": total, "num_to_keep": 1, "storage_path": os.path.join(workdir, "ray_results")}})
    out = os.path.join(workdir, name)
    summary = train(run_cfg, "student", [table], None, out, name)
    if not summary["cached_input"]:
        raise RuntimeError("the benchmark table was not cached in the object store; with every CPU held by the "
                           "training workers its read tasks could not run (lower --rows)")
    with open(os.path.join(out, HISTORY_FILE)) as f:
        history = [json.loads(line) for line in f]
    steady = steady_rate(history, warmup_steps)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(os.path.join(workdir, "ray_results", name), ignore_errors=True)
    return {"workers": workers, "cpus_per_worker": cpus, "torch_threads": max(1, int(cpus)), **steady,
            "world_size": history[-1]["world_size"], "global_batch": history[-1]["global_batch"],
            "trainer_images_per_s": round(summary["images_per_s"], 2), "fit_s": summary["fit_s"],
            "startup_s": summary["attempts"][0].get("startup_s"), "reports": len(history)}


# ----------------------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class TrainOptions:
    """``jobs/benchmark.py train``'s settings."""

    warmup_steps: int = option(DEFAULT_WARMUP, "--warmup", f"untimed steps before timing (default {DEFAULT_WARMUP})",
                               type=at_least(1))
    steps: int = option(DEFAULT_STEPS, "--steps", f"timed steps (default {DEFAULT_STEPS})", type=at_least(1))
    rows: Optional[int] = option(None, "--rows", "rows of the world table (default: one global batch more than "
                                 "the run takes)", type=at_least(1))
    ray_configs: Optional[list[str]] = option(None, "--ray", "a Ray Train configuration, repeatable, e.g. 1x2 (1 "
                                              "worker, 2 CPUs = 2 torch threads) or 2x1 (default: 1x<cores> and "
                                              "<cores>x1)", type=checked_by(parse_ray_config), repeat=True,
                                              metavar="WORKERSxCPUS")
    threads: Optional[list[int]] = option(None, "--threads", "torch threads of the plain loop, repeatable; the "
                                          "fastest is the baseline (default: 1 and #CPUs)", type=at_least(1),
                                          repeat=True)
    repeats: int = option(2, "--repeats", "Ray rounds, each bracketed by plain runs (plain, ray, plain ...); "
                          "medians (default 2)", type=at_least(1))
    plain_max_seconds: float = option(DEFAULT_PLAIN_MAX_S, "--plain-max-seconds", "cap on each plain run's timed "
                                      "steps (warm-up: a third of it); its rate is over the steps done (default "
                                      f"{DEFAULT_PLAIN_MAX_S:g})", type=positive_float)
    workdir: Optional[str] = workdir_option()


def benchmark_train(cfg: Config, options: TrainOptions = TrainOptions()) -> dict[str, Any]:
    """Both sides on the same world table (``rows``, default one global batch more than the run's
    steps need), the same model and optimiser (``student.*`` of ``cfg``). ``ray_configs``:
    ``WORKERSxCPUS`` strings (default ``1x<cores>`` and ``<cores>x1``); ``threads``: the plain
    loop's torch threads (default 1 and #cores; the fastest is the baseline). ``repeats`` Ray
    rounds, each bracketed by plain runs; medians. ``plain_max_seconds`` caps each plain run's
    timed phase (a thread count that crawls on a busy machine must not take minutes). Needs a
    connected Ray."""
    warmup_steps, steps, rows, repeats = options.warmup_steps, options.steps, options.rows, options.repeats
    plain_max_seconds = options.plain_max_seconds
    positive("--warmup", warmup_steps)
    positive("--steps", steps)
    positive("--repeats", repeats)
    if plain_max_seconds <= 0:
        raise ConfigError(f"--plain-max-seconds must be > 0, got {plain_max_seconds}")
    cores = ray_cpus()
    configs = [parse_ray_config(c) for c in (options.ray_configs or [f"1x{cores}", f"{cores}x1"])]
    configs = list(dict.fromkeys(configs))
    for w, c in configs:
        if w * c > cores + 1e-9:
            raise ConfigError(f"Ray configuration {config_name(w, c)} needs {w * c:g} CPUs, Ray has {cores}")
    threads = sorted(set(options.threads or [1, cores]))
    for t in threads:
        positive("--threads", t)
        if t > cores:
            raise ConfigError(f"--threads {t}: the plain loop reserves one Ray CPU per thread, Ray has {cores}")
    batch = int(cfg.student.global_batch_size)
    rows = rows or batch * (warmup_steps + steps + 1)
    if rows < batch * (warmup_steps + steps):
        raise ConfigError(f"--rows {rows}: the run takes {batch * (warmup_steps + steps)} rows "
                          f"({warmup_steps + steps} steps x global batch {batch})")
    niceness = ray_worker_niceness()
    load_before = os.getloadavg()[0]
    own = options.workdir is None
    workdir = options.workdir or tempfile.mkdtemp(prefix="must-ray-bench-train-")
    try:
        table = world_table(cfg, os.path.join(workdir, "table"), rows)
        plain_runs: dict[str, list[dict]] = {str(t): [] for t in threads}
        ray_runs: dict[str, list[dict]] = {config_name(w, c): [] for w, c in configs}

        def run_plain_side() -> None:
            for t in threads:
                plain_runs[str(t)].append(run_plain(cfg, table, t, warmup_steps, steps, max_seconds=plain_max_seconds))

        def run_ray_side() -> None:
            for w, c in configs:
                ray_runs[config_name(w, c)].append(ray_train(cfg, table, w, c, warmup_steps, steps, workdir))

        run_plain_side()
        for _ in range(repeats):  # plain, Ray, plain, Ray, plain ...
            run_ray_side()
            run_plain_side()

        plain = {t: median(x["images_per_s"] for x in runs) for t, runs in plain_runs.items()}
        best_t = max(plain, key=plain.get)
        base = plain[best_t]
        ray_side = {}
        for name, runs in ray_runs.items():
            ips = median(x["images_per_s"] for x in runs)
            same = plain.get(str(runs[0]["torch_threads"]))
            ray_side[name] = {"images_per_s": ips, "steps_per_s": round(ips / batch, 3), "ratio": round(ips / base, 3),
                              "ratio_same_threads": round(ips / same, 3) if same else None,
                              "torch_threads": runs[0]["torch_threads"],
                              "data_wait_frac": median((x["data_wait_frac"] for x in runs), 4)}
        result = {
            "benchmark": "train", "rows": rows, "global_batch": batch, "warmup_steps": warmup_steps, "steps": steps,
            "cores": cores, "tasks": table_task_names(table), "backbone": cfg.student.model.backbone,
            "image_size": int(cfg.student.input.image_size or cfg.world.image_size), "repeats": repeats,
            "plain_images_per_s": base, "plain_steps_per_s": round(base / batch, 3), "plain_best_threads": int(best_t),
            "plain_images_per_s_by_threads": plain, "ray": ray_side,
            **{f"ratio_{name}": v["ratio"] for name, v in ray_side.items()},
            "target_ratio": TARGET_RATIO,
            "checks": [check(f"Ray Train {name} (workers x CPUs) / plain PyTorch, steady images/s", v["ratio"], ">=",
                             TARGET_RATIO) for name, v in ray_side.items()],
            "niceness": niceness, "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "runs": {"plain": plain_runs, "ray": ray_runs},
        }
        return result
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def table_task_names(table: str) -> list[str]:
    """The tasks with labels in ``table`` (what the student trains)."""
    from must_ray.table import table_tasks

    return table_tasks([table])


BENCHMARK = Benchmark("train", "student training: Ray Train vs plain PyTorch loop, steps/s", benchmark_train,
                      TrainOptions,
                      smoke=("--warmup", "1", "--steps", "2", "--ray", "1x2", "--threads", "1", "--repeats", "1"),
                      description="Steady-state student steps/s and images/s: Ray Train (must_ray.train.driver.train) "
                                  "vs a plain PyTorch loop running the trainer's own step on the same table. "
                                  "Model, batch and optimiser: the config's student section.")

__all__ = ["BENCHMARK", "TrainOptions", "benchmark_train", "plain_train", "run_plain", "ray_train", "steady_rate", "parse_ray_config"]
