"""Labelling throughput with 1 vs 2 teacher actors. ``jobs/benchmark.py scaling`` prints
:func:`benchmark_scaling`'s result as one JSON line; the target is ``2 actors / 1 actor >= 1.8``
(steady images/s).

Both runs are the real labelling job (``must_ray.label.run.run_labeling``) on the same world PNG
files with the same teachers and the same per-actor settings; only ``label.actors`` differs.
Each actor is one core's worth of work: one torch thread (``label.torch_threads=1``) and PNG
encoding inline in that thread (``label.encode_threads=0``; the job's default encode thread
overlaps encoding with the teachers, so a lone actor would use ~1.1 cores and the 1-actor baseline
would not be one core), with ``cpus_per_actor`` logical CPUs; the decode tasks reserve
``decode_cpus`` each. On a node with C cores the default is
``cpus_per_actor = min(1, (C - decode_cpus) / max_actors)``, so the largest pool still leaves room
for a decode task (an actor pool that holds every CPU starves the decode tasks and stalls).

The figure is the pool's steady rate at full strength (``pool_images_per_s`` of
``benchmarks/label_profile.py``): each actor's images over its own window, from its being ready to
its last commit, summed over the actors. Actor start-up is excluded, the second actor's too (on
2 cores it comes up 1-2 s after the first, which a pool of millions of images amortises); the
run summary's steady rate, from the *first* actor being ready, and end-to-end images/s are
reported too (``speedup_from_first_ready``, ``speedup_end_to_end``). Rounds alternate the order
(1, 2, 2, 1 ...); medians.
``actor_cpu_ms_per_image``: CPU time the teacher actors used per image (``process_time`` per
shard); the same for both pool sizes means a second actor adds no work, so a speedup short of the
target is CPU the actors did not get.

``capacity``: what the machine offers right now, measured before and after the runs with the
same resources and priority as the actors: the summed rate of N concurrent single-thread Ray tasks
doing fp32 matmuls over the rate of one (:func:`parallel_capacity`). It is the ceiling of the
speedup (~N on idle dedicated cores, less when other work shares them; a probe above N is a
disturbed single-worker measurement, so the ceiling is capped at N); ``efficiency`` is the
speedup over that ceiling (target >= 0.95).
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

from benchmarks.common import check, median, positive, ray_cpus, with_overrides
from benchmarks.options import Benchmark, at_least, option, positive_float, workdir_option
from must_ray.config import Config
from must_ray.typed_config import ConfigError

TARGET_SPEEDUP = 1.8
TARGET_EFFICIENCY = 0.95  # of what as many single-thread workers get on this machine right now
DEFAULT_NUM = 2048
DEFAULT_DECODE_CPUS = 0.25


def parallel_capacity(workers: int, cpus: float, seconds: float = 2.0, rounds: int = 3) -> float:
    """Summed matmul rate of ``workers`` concurrent single-thread Ray tasks (``cpus`` each) over
    the rate of one task alone; the median of ``rounds`` such pairs in alternating order. Tasks
    start at a common instant (after their imports) and each reports its own rate over its own
    window, so start-up skew does not count."""
    import ray

    @ray.remote(num_cpus=cpus)
    def spin(start_at: float, seconds: float) -> float:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        time.sleep(max(0.0, start_at - time.time()))
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            torch.matmul(a, b)
            n += 1
        rate = n / (time.perf_counter() - t0)
        torch.set_num_threads(before)  # pooled worker: leave it as it was
        return rate

    lead = min(2.0, max(0.5, 5 * seconds))  # for the workers to start and import torch before the common start
    ratios = []
    for r in range(rounds):  # one, many / many, one ...: a drifting load biases neither
        order = ("one", "many") if r % 2 == 0 else ("many", "one")
        rate = {}
        for side in order:
            n = 1 if side == "one" else workers
            rate[side] = sum(ray.get([spin.remote(time.time() + lead, seconds) for _ in range(n)]))
        ratios.append(rate["many"] / rate["one"])
    return round(statistics.median(ratios), 3)


@dataclass(frozen=True)
class ScalingOptions:
    """``jobs/benchmark.py scaling``'s settings."""

    num: int = option(DEFAULT_NUM, "--num", f"images (default {DEFAULT_NUM})", type=at_least(1))
    actors: Optional[list[int]] = option(None, "--actors", "pool sizes, repeatable (default 1 and 2)",
                                         type=at_least(1), repeat=True)
    cpus_per_actor: Optional[float] = option(None, "--cpus-per-actor", "logical CPUs per actor (default min(1, "
                                             "(CPUs - decode CPUs) / largest pool))", type=positive_float)
    decode_cpus: float = option(DEFAULT_DECODE_CPUS, "--decode-cpus",
                                f"logical CPUs per decode task (default {DEFAULT_DECODE_CPUS})", type=positive_float)
    repeats: int = option(2, "--repeats", "rounds, alternating the order (1, 2, 2, 1); medians (default 2)",
                          type=at_least(1))
    probe_seconds: float = option(2.0, "--probe-seconds", "length of each machine-capacity probe (concurrent "
                                  "matmul workers vs one; default 2)", type=positive_float)
    workdir: Optional[str] = workdir_option()


def benchmark_scaling(cfg: Config, options: ScalingOptions = ScalingOptions()) -> dict[str, Any]:
    """Label the same ``num`` images with each pool size in ``actors`` (default 1 and 2;
    ``repeats`` rounds, alternating order); report each size's median steady and end-to-end
    images/s, the speedup of the largest pool over the smallest and the machine's capacity
    (:func:`parallel_capacity`, ``probe_seconds`` per probe, before and after). Needs a connected Ray."""
    from benchmarks.label import usable_teachers, write_benchmark_images
    from benchmarks.memory import labeling_run

    num, actors, decode_cpus = options.num, options.actors or (1, 2), options.decode_cpus
    repeats, probe_seconds = options.repeats, options.probe_seconds
    positive("--num", num)
    positive("--repeats", repeats)
    if probe_seconds <= 0:
        raise ConfigError(f"--probe-seconds must be > 0, got {probe_seconds}")
    sizes = sorted(set(int(a) for a in actors))
    if len(sizes) < 2 or sizes[0] < 1:
        raise ConfigError(f"--actors needs two or more distinct pool sizes >= 1, got {list(actors)}")
    if decode_cpus <= 0:
        raise ConfigError(f"--decode-cpus must be > 0, got {decode_cpus}")
    cores = ray_cpus()
    per_actor = options.cpus_per_actor or round(min(1.0, (cores - decode_cpus) / sizes[-1]), 3)
    if per_actor <= 0 or per_actor * sizes[-1] + decode_cpus > cores + 1e-9:
        raise ConfigError(f"{sizes[-1]} actors x {per_actor} CPUs + {decode_cpus} for a decode task exceed the "
                          f"{cores} CPUs of the Ray cluster (lower --cpus-per-actor or --decode-cpus)")
    cfg, kinds = usable_teachers(cfg)
    cfg = with_overrides(cfg, label={"num_cpus_per_actor": per_actor, "decode_num_cpus": decode_cpus,
                                     "torch_threads": 1, "encode_threads": 0})
    load_before = os.getloadavg()[0]
    own = options.workdir is None
    workdir = options.workdir or tempfile.mkdtemp(prefix="must-ray-bench-scaling-")
    try:
        image_dir = os.path.join(workdir, "images")
        write_benchmark_images(cfg, image_dir, num)
        capacity = [parallel_capacity(sizes[-1], per_actor, probe_seconds)]
        runs: dict[str, list[dict[str, Any]]] = {str(a): [] for a in sizes}
        for r in range(repeats):
            for a in (sizes if r % 2 == 0 else sizes[::-1]):
                run_cfg = with_overrides(cfg, label={"actors": [a, a]})
                runs[str(a)].append(labeling_run(run_cfg, image_dir, os.path.join(workdir, f"labels_{a}")))
        capacity.append(parallel_capacity(sizes[-1], per_actor, probe_seconds))
        ceiling = round(min(float(sizes[-1]), sum(capacity) / len(capacity)), 3)  # above N workers: noise
        steady = {a: median(x["pool_images_per_s"] for x in rs) for a, rs in runs.items()}
        first_ready = {a: median(x["steady_images_per_s"] for x in rs) for a, rs in runs.items()}
        e2e = {a: median(x["end_to_end_images_per_s"] for x in rs) for a, rs in runs.items()}
        # CPU the actor processes used per image: equal across pool sizes = no extra work per image,
        # so a missing speedup is CPU the actors did not get (contention), not overhead
        cpu_ms = {a: median(1000 * x["actor_cpu_s"] / max(x["inputs"], 1) for x in rs) for a, rs in runs.items()}
        lo, hi = str(sizes[0]), str(sizes[-1])
        speedup = round(steady[hi] / steady[lo], 3)
        efficiency = round(speedup / ceiling, 3)
        return {
            "benchmark": "scaling", "images": num, "cores": cores, "teachers": kinds, "repeats": repeats,
            "actors": sizes, "cpus_per_actor": per_actor, "decode_num_cpus": decode_cpus, "torch_threads": 1,
            "encode_threads": 0,
            "shard_size": cfg.label.shard_size, "batch_size": cfg.label.batch_size,
            "steady_images_per_s": steady, "steady_from_first_ready_images_per_s": first_ready,
            "images_per_s": e2e, "actor_cpu_ms_per_image": cpu_ms,
            "actor_ready_spread_s": {a: median(x["actor_ready_spread_s"] for x in rs) for a, rs in runs.items()},
            "speedup": speedup, "speedup_from_first_ready": round(first_ready[hi] / first_ready[lo], 3),
            "speedup_end_to_end": round(e2e[hi] / e2e[lo], 3), "target_speedup": TARGET_SPEEDUP,
            "capacity": ceiling, "capacity_before_after": capacity, "efficiency": efficiency,
            "target_efficiency": TARGET_EFFICIENCY,
            "checks": [check(f"labelling, {hi} actors / {lo} actor, steady images/s", speedup, ">=", TARGET_SPEEDUP),
                       check(f"machine capacity for {hi} single-thread workers (matmul probe; the speedup's ceiling)",
                             ceiling),
                       check(f"labelling speedup / machine capacity ({hi} vs {lo} actors)", efficiency, ">=",
                             TARGET_EFFICIENCY)],
            "actors_used": {a: [x["actors_used"] for x in rs] for a, rs in runs.items()},
            "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "runs": runs,
        }
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark("scaling", "labelling throughput, 1 vs 2 teacher actors", benchmark_scaling, ScalingOptions,
                      smoke=("--num", "16", "--repeats", "1", "--probe-seconds", "0.1"),
                      description="The labelling job on the same images with each actor-pool size (same per-actor "
                                  "CPUs, 1 torch thread per actor, label PNGs encoded in that thread); steady "
                                  "images/s and the speedup.")

__all__ = ["BENCHMARK", "ScalingOptions", "benchmark_scaling", "parallel_capacity"]
