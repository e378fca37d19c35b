"""FLOP utilisation: the machine's measured fp32 matmul peak vs the FLOP rate that teacher
inference and student training steps achieve. ``jobs/benchmark.py flops`` prints
:func:`benchmark_flops`'s result as one JSON line. There is no pass/fail target (the design asks
for the figure to be reported); the variants show what batch size, memory format, threads and
``torch.compile`` change.

* **Peak**: ``torch.matmul`` of two ``size x size`` fp32 matrices, best of a few seconds of runs,
  with 1 torch thread and with one per core (``2 size^3`` FLOPs per product).
* **Theoretical peak** (``benchmarks/cpu_peak.py``): 2 FLOPs per FMA x a core's fp32 FMA lanes
  per cycle (vector width from the CPU flags, FMA units from the microarchitecture, confirmed by
  an FMA-only kernel) x the clock it runs at (a timed chain of dependent ``imul``), times the
  threads: every rate is also a fraction of it (``fma_utilisation``), so "close to the limit"
  means the hardware's limit.
* **FLOPs of the work**: counted once per workload with ``torch.utils.flop_counter.FlopCounterMode``
  (convolutions and matmuls, forward and backward; element-wise ops, pooling, post-processing and
  the optimiser count zero, so utilisation is a lower bound of what the cores do).
* **Teachers**: every configured teacher (random-init where no checkpoint exists) on rendered world
  images at the label resolution. ``predict`` is the labelling call (``TeacherSet.predict``:
  preprocessing, the models, post-processing into labels); ``forward`` is the models alone.
* **Student**: one ``must_ray.train.step.train_step`` (forward, masked losses, backward, AdamW) of the
  all-task ``MultiTaskModel`` on collated world batches.

Each variant's rate is the median of ``reps`` timed calls after one warm-up call, and its
utilisation is relative to the peak measured with the same number of threads.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from benchmarks.common import check, positive
from benchmarks.cpu_peak import fma_peak
from benchmarks.options import Benchmark, at_least, option
from must_ray.config import Config
from must_ray.typed_config import ConfigError

DEFAULT_MATMUL = 2048
DEFAULT_REPS = 3
DEFAULT_TEACHER_BATCHES = (16, 256)  # tried besides label.batch_size
DEFAULT_STUDENT_BATCHES = (64,)  # tried besides student.global_batch_size


def matmul_peak(threads: int, size: int = DEFAULT_MATMUL, seconds: float = 2.0) -> tuple[float, float]:
    """fp32 ``torch.matmul`` of ``size x size`` matrices with ``threads`` torch threads, run for
    ``seconds``: ``(best GFLOP/s, best GFLOP per CPU-second)``. The second is a core's peak even
    when other work shares the cores (it counts only the CPU time this process got)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.matmul(a, b, out=out)
    best, best_cpu, t_end, runs = float("inf"), float("inf"), time.perf_counter() + seconds, 0
    while runs < 3 or time.perf_counter() < t_end:
        c0, t0 = time.process_time(), time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, max(time.process_time() - c0, 1e-9))
        runs += 1
    flops = 2 * size ** 3
    return round(flops / best / 1e9, 2), round(flops / best_cpu / 1e9, 2)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (conv/matmul ops, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def time_call(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds of ``reps`` calls of ``fn`` after one
    warm-up call. (CPU seconds barely move when other work shares the cores; wall seconds do.)"""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _variant(name: str, flops: int, images: int, seconds: tuple[float, float], threads: int, peaks: dict,
             **extra: Any) -> dict[str, Any]:
    """One row: rates from wall time (``utilisation``: of the wall peak with as many threads) and
    from CPU time (``cpu_utilisation``: GFLOP per CPU-second of a core's matmul peak)."""
    wall, cpu = seconds
    gflops = flops / wall / 1e9
    cpu = max(cpu, 1e-9)
    fma = peaks.get("fma")
    return {"name": name, "threads": threads, "batch": images, **extra, "images_per_s": round(images / wall, 2),
            "images_per_cpu_s": round(images / cpu, 2), "gflops": round(gflops, 2),
            "utilisation": round(gflops / peaks["wall"][threads], 4),
            "cpu_utilisation": round(flops / cpu / 1e9 / peaks["cpu"], 4),
            "fma_utilisation": round(gflops / (fma * threads), 4) if fma else None}


def world_images(cfg: Config, num: int, size: int):
    """``num`` rendered world scenes (unlabeled split) as uint8 (num, size, size, 3)."""
    import numpy as np

    from must_ray.images import encode_png
    from must_ray.label.inputs import prepare_image
    from must_ray.world import render_scenes

    split = cfg.world.splits.get("unlabeled")
    offset, domain = (split.seed_offset, split.domain) if split else (100_000, "default")
    scenes = render_scenes(cfg.world.seed, list(range(offset, offset + num)), image_size=cfg.world.image_size,
                           domain=domain, min_objects=cfg.world.min_objects, max_objects=cfg.world.max_objects)
    return np.stack([prepare_image(encode_png(s["image"]), size, cfg.label.max_image_pixels)[0] for s in scenes])


def teacher_variants(cfg: Config, batches: Sequence[int], threads: Sequence[int], peaks: dict,
                     reps: int, compile_: bool) -> dict[str, Any]:
    """Teacher inference rates: ``predict`` (the labelling call) and ``forward`` (our models alone,
    in the memory format ``MustTeacher`` uses) at the label batch size for every thread count;
    then, on 1 thread, the other ``batches``, the other memory format and (``compile_``)
    ``torch.compile``."""
    import torch

    from benchmarks.label import usable_teachers
    from must_ray.label.run import label_image_size, label_tasks
    from must_ray.label.teachers import TeacherSet, resolve_teachers
    from must_ray.label.teachers.kinds.checkpoint import MustTeacher
    from must_ray.models import images_to_tensor

    cfg, kinds = usable_teachers(cfg)
    size = label_image_size(cfg)
    specs, classes = resolve_teachers(cfg, label_tasks(cfg), size)
    teachers = TeacherSet(specs, cfg, classes, size)
    own = [t for t in teachers.teachers if isinstance(t, MustTeacher)]
    default_batch = int(cfg.label.batch_size)
    images = world_images(cfg, max([default_batch, *batches]), size)

    def set_format(channels_last: bool) -> None:
        for t in own:
            t.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def forward_fn(batch: int, channels_last: bool, models: Optional[list] = None) -> Callable[[], None]:
        x = images_to_tensor(torch.from_numpy(images[:batch]), channels_last=channels_last)
        models = models or [t.model for t in own]

        def run() -> None:
            with torch.inference_mode():
                for teacher, model in zip(own, models):
                    model(x, tasks=teacher.tasks)
        return run

    predict_flops = count_flops(lambda: teachers.predict(images[:default_batch]))
    out: list[dict[str, Any]] = []
    for t in threads:
        torch.set_num_threads(t)
        sec = time_call(lambda: teachers.predict(images[:default_batch]), reps)
        out.append(_variant(f"predict, batch {default_batch}, {t} thread(s)", predict_flops, default_batch, sec, t, peaks))
    result = {"teachers": kinds, "image_size": size, "mflop_per_image": round(predict_flops / default_batch / 1e6, 2),
              "variants": out}
    if not own:  # off-the-shelf teachers only: no forward variants
        return result
    cl = own[0].channels_last
    fmt, other = ("channels_last", "contiguous") if cl else ("contiguous", "channels_last")
    per_image = {b: count_flops(forward_fn(b, cl)) / b for b in {default_batch, *batches}}
    flops_default = int(per_image[default_batch] * default_batch)
    for t in threads:
        torch.set_num_threads(t)
        sec = time_call(forward_fn(default_batch, cl), reps)
        out.append(_variant(f"forward, batch {default_batch}, {t} thread(s), {fmt}", flops_default, default_batch, sec,
                            t, peaks, channels_last=cl))
    torch.set_num_threads(1)
    for b in batches:
        if b != default_batch:
            sec = time_call(forward_fn(b, cl), reps)
            out.append(_variant(f"forward, batch {b}, 1 thread, {fmt}", int(per_image[b] * b), b, sec, 1, peaks,
                                channels_last=cl))
    set_format(not cl)
    sec = time_call(forward_fn(default_batch, not cl), reps)
    out.append(_variant(f"forward, batch {default_batch}, 1 thread, {other}", flops_default, default_batch, sec, 1,
                        peaks, channels_last=not cl))
    set_format(cl)
    if compile_:
        t0 = time.perf_counter()
        fn = forward_fn(default_batch, cl, [torch.compile(t.model) for t in own])
        fn()  # compiles
        compile_s = time.perf_counter() - t0
        sec = time_call(fn, reps)
        out.append(_variant(f"forward, batch {default_batch}, 1 thread, {fmt}, torch.compile", flops_default,
                            default_batch, sec, 1, peaks, channels_last=cl, compile_s=round(compile_s, 1)))
    return result


def student_variants(cfg: Config, batches: Sequence[int], threads: Sequence[int], peaks: dict,
                     reps: int, workdir: str) -> dict[str, Any]:
    """Student training-step rates (``train_step`` on collated batches): the configured step
    (``student.channels_last``, global batch) for every thread count; then, on 1 thread, the other
    memory format and the other ``batches``."""
    import os

    import pyarrow.parquet as pq
    import torch

    from benchmarks.common import world_table
    from must_ray.table import conform, table_classes, table_tasks
    from must_ray.train.collate import TrainCollate, split_batch
    from must_ray.train.optim import build_optimizer
    from must_ray.train.step import build_module, train_step

    tcfg = cfg.student
    default_batch = int(tcfg.global_batch_size)
    table = world_table(cfg, os.path.join(workdir, "table"), max([default_batch, *batches]))
    names, classes = table_tasks([table]), table_classes([table])
    data = conform(pq.read_table(table), names)
    inp = tcfg.input
    collate = TrainCollate(names, len(classes), cfg.tasks, image_size=int(inp.image_size or cfg.world.image_size),
                           augment=inp.augment, crop_scale_min=inp.crop_scale_min, seed=tcfg.seed)

    def step_fn(batch: int, channels_last: bool) -> Callable[[], None]:
        torch.manual_seed(tcfg.seed)
        tasks, module = build_module(cfg, tcfg, names, len(classes))
        module = module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        optimizer, scheduler = build_optimizer(module, tcfg, 10_000)
        images, targets = split_batch(collate(data.slice(0, batch)))
        present = {t: bool(targets[t]["mask"].any()) for t in names}
        module.train()

        def run() -> None:
            train_step(module, module, tasks, images, targets, present, optimizer, scheduler,
                       grad_clip=tcfg.optimizer.grad_clip, channels_last=channels_last)
        return run

    cl = bool(tcfg.channels_last)
    per_image = {b: count_flops(step_fn(b, cl)) / b for b in {default_batch, *batches}}
    out: list[dict[str, Any]] = []
    fmt = "channels_last" if cl else "contiguous"
    for t in threads:
        torch.set_num_threads(t)
        sec = time_call(step_fn(default_batch, cl), reps)
        out.append(_variant(f"train step, batch {default_batch}, {t} thread(s), {fmt}",
                            int(per_image[default_batch] * default_batch), default_batch, sec, t, peaks,
                            channels_last=cl))
    torch.set_num_threads(1)
    other = "contiguous" if cl else "channels_last"
    sec = time_call(step_fn(default_batch, not cl), reps)
    out.append(_variant(f"train step, batch {default_batch}, 1 thread, {other}", int(per_image[default_batch] * default_batch),
                        default_batch, sec, 1, peaks, channels_last=not cl))
    for b in batches:
        if b != default_batch:
            sec = time_call(step_fn(b, cl), reps)
            out.append(_variant(f"train step, batch {b}, 1 thread, {fmt}", int(per_image[b] * b), b, sec, 1, peaks,
                                channels_last=cl))
    return {"backbone": tcfg.model.backbone, "tasks": names, "image_size": int(inp.image_size or cfg.world.image_size),
            "mflop_per_image": round(per_image[default_batch] / 1e6, 2), "variants": out}


@dataclass(frozen=True)
class FlopsOptions:
    """``jobs/benchmark.py flops``'s settings (``workdir``: for library callers only)."""

    matmul_size: int = option(DEFAULT_MATMUL, "--matmul-size", "side of the square matrices of the peak measurement "
                              f"(default {DEFAULT_MATMUL})", type=at_least(16))
    reps: int = option(DEFAULT_REPS, "--reps", f"timed calls per variant, median (default {DEFAULT_REPS})",
                       type=at_least(1))
    teacher_batches: Optional[list[int]] = option(None, "--teacher-batch", "extra teacher batch sizes to try, "
                                                  "repeatable (default 16 and 256; label.batch_size always)",
                                                  type=at_least(1), repeat=True)
    student_batches: Optional[list[int]] = option(None, "--student-batch", "extra student batch sizes to try, "
                                                  "repeatable (default 64; student.global_batch_size always)",
                                                  type=at_least(1), repeat=True)
    threads: Optional[list[int]] = option(None, "--threads", "thread counts, repeatable (default 1 and #CPUs)",
                                          type=at_least(1), repeat=True)
    compile: bool = option(False, "--compile", "add a torch.compile variant of the teachers' forward (compiling "
                           "takes minutes on 2 cores)", switch=True)
    workdir: Optional[str] = None


def benchmark_flops(cfg: Config, options: FlopsOptions = FlopsOptions()) -> dict[str, Any]:
    """Peak, FLOPs and achieved rates (see the module doc). ``threads`` default: 1 and #cores.
    Runs in this process (no Ray); torch's thread count is restored afterwards."""
    import os
    import shutil
    import tempfile

    import torch

    matmul_size, reps = options.matmul_size, options.reps
    teacher_batches = options.teacher_batches or DEFAULT_TEACHER_BATCHES
    student_batches = options.student_batches or DEFAULT_STUDENT_BATCHES
    positive("--matmul-size", matmul_size, 16)
    positive("--reps", reps)
    for b in [*teacher_batches, *student_batches]:
        positive("batch size", b)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = sorted(set(options.threads or [1, cores]))
    if 1 not in threads:
        raise ConfigError("--threads must include 1 (the variants run on one thread)")
    before = torch.get_num_threads()
    own = options.workdir is None
    workdir = options.workdir or tempfile.mkdtemp(prefix="must-ray-bench-flops-")
    load_before = os.getloadavg()[0]
    try:
        measured = {t: matmul_peak(t, matmul_size) for t in threads}
        theory = fma_peak()
        peaks = {"wall": {t: m[0] for t, m in measured.items()}, "cpu": measured[1][1],
                 "fma": theory["gflops_per_core"]}
        teacher = teacher_variants(cfg, teacher_batches, threads, peaks, reps, options.compile)
        torch.set_num_threads(before)
        student = student_variants(cfg, student_batches, threads, peaks, reps, workdir)
        first = {"teacher": teacher["variants"][0], "student": student["variants"][0]}
        return {
            "benchmark": "flops", "cores": cores, "matmul_size": matmul_size, "reps": reps,
            "peak_gflops": {str(t): p for t, p in peaks["wall"].items()},
            "peak_gflops_per_cpu_s": peaks["cpu"], "fma_peak": theory,
            "matmul_fma_utilisation": (round(peaks["cpu"] / theory["gflops_per_core"], 4)
                                       if theory["gflops_per_core"] else None),
            **{f"{k}_{f}": v[f] for k, v in first.items()
               for f in ("gflops", "utilisation", "cpu_utilisation", "fma_utilisation")},
            "checks": [c for k, v in first.items() for c in (
                check(f"{k} {v['name']}: fraction of the matmul peak (wall time)", v["utilisation"]),
                check(f"{k} {v['name']}: fraction of a core's matmul peak per CPU-second", v["cpu_utilisation"]),
                check(f"{k} {v['name']}: fraction of the cores' theoretical FMA peak", v["fma_utilisation"]))
                if c["value"] is not None]
            + ([check("fp32 matmul, one core: fraction of its theoretical FMA peak (per CPU-second)",
                      round(peaks["cpu"] / theory["gflops_per_core"], 4))] if theory["gflops_per_core"] else []),
            "teacher": teacher, "student": student,
            "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
        }
    finally:
        torch.set_num_threads(before)
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark("flops", "matmul peak vs teacher inference / student step FLOP rate", benchmark_flops,
                      FlopsOptions, needs_ray=False,
                      smoke=("--matmul-size", "256", "--reps", "1", "--teacher-batch", "4", "--student-batch", "4",
                             "--threads", "1"),
                      description="Measured fp32 matmul peak vs the FLOP rate (FlopCounterMode counts) of teacher "
                                  "inference and student training steps, with variants (batch, channels_last, "
                                  "threads, torch.compile). Runs in this process, without Ray.")

__all__ = ["BENCHMARK", "FlopsOptions", "benchmark_flops", "matmul_peak", "count_flops", "teacher_variants", "student_variants"]
