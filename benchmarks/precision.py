"""bf16 vs fp32 on this CPU: teacher inference and the student step under
``torch.autocast("cpu", dtype=torch.bfloat16)`` with channels_last, and how far bf16 labels are
from fp32 labels. ``jobs/benchmark.py precision`` prints :func:`benchmark_precision`'s result as
one JSON line.

* **Speed**: images/s of ``TeacherSet.predict`` (the labelling call, every configured teacher) and
  of the trainer's ``train_step`` (the all-task student on precollated world batches), fp32 and
  bf16, alternating (fp32, bf16, bf16, fp32 ...) so that drifting load biases neither; medians.
* **Agreement**: the bf16 labels scored against the fp32 labels *as ground truth*, in each task's
  own metric (``Task.metric_*``: top-1 agreement for classification, mIoU for segmentation, AP of
  bf16 boxes against fp32 boxes for detection, AbsRel for depth, mean angle for normals). Targets:
  :data:`AGREEMENT` (a task without one is reported).
* **What ``auto`` picks** here (``must_ray.models.precision``): bf16 only on a CPU with native bf16
  units (``avx512_bf16`` / ``amx_bf16`` in its flags); elsewhere bf16 is emulated and the speed
  rows say what it would cost.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

from benchmarks.common import check, with_overrides
from benchmarks.options import Benchmark, at_least, option, workdir_option
from must_ray.config import Config

#: the agreement a task's bf16 labels must reach against its fp32 labels (metric, op, target)
AGREEMENT: dict[str, tuple[str, str, float]] = {
    "classification": ("top1", ">=", 0.95), "segmentation": ("miou", ">=", 0.9),
    "detection": ("map50", ">=", 0.9), "depth": ("abs_rel", "<=", 0.02), "normals": ("mean_angle", "<=", 3.0)}
PRECISIONS = ("fp32", "bf16")


def teacher_sets(cfg: Config) -> tuple[dict[str, Any], dict[str, str], int, list[str]]:
    """One ``TeacherSet`` per precision (the same weights), the teachers' kinds, the label size and
    the class vocabulary."""
    from benchmarks.label import usable_teachers
    from must_ray.label.run import label_image_size, label_tasks
    from must_ray.label.teachers import TeacherSet, resolve_teachers

    cfg, kinds = usable_teachers(cfg)
    size = label_image_size(cfg)
    specs, classes = resolve_teachers(cfg, label_tasks(cfg), size)
    sets = {p: TeacherSet(specs, with_overrides(cfg, label={"precision": p}), classes, size) for p in PRECISIONS}
    return sets, kinds, size, classes


def alternating(fns: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median seconds of each of ``fns`` (name -> zero-argument call) over ``rounds`` rounds in
    ABBA order, after one untimed call each."""
    names = list(fns)
    for fn in fns.values():
        fn()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            seconds[n].append(time.perf_counter() - t0)
    return {n: statistics.median(s) for n, s in seconds.items()}


def agreement(task_objs: dict[str, Any], bf16: dict[str, list], fp32: dict[str, list]) -> dict[str, dict[str, float]]:
    """Each task's metrics of the bf16 labels against the fp32 labels as ground truth."""
    out = {}
    for name, task in task_objs.items():
        state = task.metric_update(task.metric_state(), bf16[name], fp32[name])
        out[name] = {k: round(float(v), 4) for k, v in task.metric_compute(state).items()}
    return out


def agreement_checks(agreement: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """:data:`AGREEMENT`'s target for every task of ``agreement`` that has one, as checks."""
    out = []
    for task, values in agreement.items():
        if task in AGREEMENT and AGREEMENT[task][0] in values:
            metric, op, target = AGREEMENT[task]
            out.append(check(f"bf16 labels vs fp32 labels, {task} {metric}", values[metric], op, target))
    return out


def teacher_precision(cfg: Config, num_images: int, rounds: int) -> dict[str, Any]:
    """Teacher inference at both precisions on ``num_images`` world images: images/s and agreement."""
    import torch

    from benchmarks.flops import world_images
    from must_ray.tasks import build_tasks

    sets, kinds, size, classes = teacher_sets(cfg)
    images = world_images(cfg, num_images, size)
    batch = int(cfg.label.batch_size)
    labels: dict[str, dict[str, list]] = {}

    def run(p: str):
        def call() -> None:
            out: dict[str, list] = {}
            for start in range(0, num_images, batch):
                for task, values in sets[p].predict(images[start:start + batch]).items():
                    out.setdefault(task, []).extend(values)
            labels[p] = out
        return call

    with torch.inference_mode():
        seconds = alternating({p: run(p) for p in PRECISIONS}, rounds)
    tasks = build_tasks(sets["fp32"].tasks, len(classes), cfg.tasks)
    rates = {p: round(num_images / s, 2) for p, s in seconds.items()}
    return {"teachers": kinds, "image_size": size, "images": num_images, "batch": batch, "images_per_s": rates,
            "speedup": round(rates["bf16"] / rates["fp32"], 3), "agreement": agreement(tasks, labels["bf16"],
                                                                                       labels["fp32"])}


def student_precision(cfg: Config, threads: int, steps: int, rounds: int, workdir: str) -> dict[str, Any]:
    """The student's ``train_step`` at both precisions (plain loop, precollated batches): images/s."""
    from benchmarks.common import world_table
    from benchmarks.train import plain_train

    batch = int(cfg.student.global_batch_size)
    table = os.path.join(world_table(cfg, os.path.join(workdir, "table"), batch * 4), "test-00000.parquet")
    runs: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r in range(rounds):
        for p in (PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]):
            one = plain_train(with_overrides(cfg, student={"precision": p}), table, threads, 2, steps, precollated=True)
            runs[p].append(one["images_per_s"])
    rates = {p: round(statistics.median(v), 2) for p, v in runs.items()}
    return {"backbone": cfg.student.model.backbone, "global_batch": batch, "threads": threads, "steps": steps,
            "channels_last": cfg.student.channels_last, "images_per_s": rates,
            "speedup": round(rates["bf16"] / rates["fp32"], 3)}


@dataclass(frozen=True)
class PrecisionOptions:
    """``jobs/benchmark.py precision``'s settings."""

    num_images: int = option(256, "--num", "world images labelled at each precision (default 256)", type=at_least(1))
    threads: int = option(1, "--threads", "torch threads of both sides (default 1: a core's rate)", type=at_least(1))
    steps: int = option(8, "--steps", "timed student steps per run (default 8)", type=at_least(1))
    rounds: int = option(2, "--rounds", "rounds per precision, in ABBA order; medians (default 2)", type=at_least(1))
    workdir: Optional[str] = workdir_option()


def benchmark_precision(cfg: Config, options: PrecisionOptions = PrecisionOptions()) -> dict[str, Any]:
    """Teacher inference and the student step in fp32 and bf16 on this CPU (``threads`` torch
    threads, in this process), the bf16 labels' agreement with the fp32 ones, and what
    ``precision: auto`` resolves to here. No Ray needed."""
    import shutil

    import torch

    from must_ray.models.precision import cpu_bf16_flags, resolve_precision

    before = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    load_before = os.getloadavg()[0]
    own = options.workdir is None
    workdir = options.workdir or tempfile.mkdtemp(prefix="must-ray-bench-precision-")
    try:
        teachers = teacher_precision(cfg, options.num_images, options.rounds)
        student = student_precision(cfg, options.threads, options.steps, options.rounds, workdir)
    finally:
        torch.set_num_threads(before)
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    checks = [check("teacher inference, bf16 / fp32 images/s", teachers["speedup"]),
              check("student step, bf16 / fp32 images/s", student["speedup"]),
              *agreement_checks(teachers["agreement"])]
    return {"benchmark": "precision", "native_bf16": list(cpu_bf16_flags()),
            "auto_resolves_to": resolve_precision("auto", "cpu"), "threads": options.threads, "teacher": teachers,
            "student": student, "checks": checks, "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2)}


BENCHMARK = Benchmark("precision", "bf16 vs fp32 on this CPU: teacher and student images/s, bf16 label agreement",
                      benchmark_precision, PrecisionOptions, needs_ray=False,
                      smoke=("--num", "8", "--steps", "1", "--rounds", "1"),
                      description="Teacher inference (TeacherSet.predict) and the student's train_step under "
                                  "torch.autocast('cpu', bfloat16) with channels_last vs fp32, and the bf16 labels "
                                  "scored against the fp32 labels in each task's own metric.")

__all__ = ["BENCHMARK", "PrecisionOptions", "benchmark_precision", "teacher_precision", "agreement",
           "agreement_checks", "AGREEMENT"]
