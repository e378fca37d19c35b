"""Labelling throughput: the Ray Data job vs a plain single-process PyTorch loop doing the same
work (read -> decode + resize -> the same teachers -> encode -> Parquet) on the same images, the
same teachers and the same cores. ``jobs/benchmark.py label`` prints :func:`benchmark_label`'s
result as one JSON line; the target is ``ratio = ray / plain >= 0.9``.

Three contestants: the job, the plain loop, and the field's way (``benchmarks/label_idiom.py``: the
Ray Data batch-inference idiom ``read_binary_files -> map_batches(decode) -> map_batches(Teachers,
ActorPoolStrategy) -> write_parquet``, same teachers and codecs, no exactly-once, no quarantine).
``ratio_vs_idiom`` is the job's end-to-end images/s over the idiom's (target >= 0.95: what the
job's guarantees cost). Two ratios against the plain loop, both reported:

``ratio`` (end to end)
    wall time from "here are the image files and the teachers" to "the table is on disk". The
    plain loop runs as a fresh process (``python -m benchmarks.label``), so it pays its
    ``import torch`` and teacher loading like the Ray job pays its actor start-up (a worker process
    that imports torch and builds the teachers). The Ray cluster itself is up before the clock
    starts (on a cluster it already runs); the Ray side also pays for what makes it a production
    job: the plan/manifest, atomic per-shard commits with fsync, the final exactly-once check.
``steady_ratio``
    images/s once running: the plain loop's loop alone vs the Ray job from its first actor being
    ready to its last commit. This is the number that matters for a pool of millions of images,
    where start-up is amortised.

The plain loop is run with 1 torch thread and with one thread per core, and the faster one is the
baseline (on small, busy machines intra-op threading can be slower than one thread). Rounds run in
ABBA order and each side reports its median, so drifting background load biases neither side.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from benchmarks.common import check, module_main, ray_worker_niceness, run_module
from benchmarks.label_idiom import idiom_job
from benchmarks.options import Benchmark, at_least, option, workdir_option
from must_ray.config import Config, config_from_dict
from must_ray.typed_config import config_to_dict

TARGET_RATIO = 0.9
TARGET_VS_IDIOM = 0.95  # exactly-once, quarantine, plan and progress cost at most 5 %


def write_benchmark_images(cfg: Config, directory: str, num_images: int) -> list[str]:
    """Render ``num_images`` scenes of the world's unlabeled split as PNG files (no Ray)."""
    from must_ray.images import encode_png
    from must_ray.world import render_scenes
    from must_ray.world.splits import image_file_name, image_id_for

    os.makedirs(directory, exist_ok=True)
    split = cfg.world.splits.get("unlabeled")
    offset, domain = (split.seed_offset, split.domain) if split else (100_000, "default")
    paths = []
    for start in range(0, num_images, 64):
        idx = [offset + i for i in range(start, min(num_images, start + 64))]
        for i, scene in zip(idx, render_scenes(cfg.world.seed, idx, image_size=cfg.world.image_size, domain=domain,
                                               min_objects=cfg.world.min_objects, max_objects=cfg.world.max_objects)):
            path = os.path.join(directory, image_file_name(image_id_for(cfg.world.seed, domain, i)))
            with open(path, "wb") as f:
                f.write(encode_png(scene["image"]))
            paths.append(path)
    return sorted(paths)


def usable_teachers(cfg: Config) -> tuple[Config, dict[str, str]]:
    """``cfg`` with every teacher whose checkpoint is missing switched to ``kind=random`` (so the
    benchmark runs before the teachers are trained); returns the kinds used per task."""
    from must_ray.label.run import label_tasks
    from must_ray.label.teachers import default_teacher_path

    data = config_to_dict(cfg)
    for task in label_tasks(cfg):
        t = cfg.label.teachers[task]
        if t.kind == "checkpoint" and not os.path.isfile(t.path or default_teacher_path(cfg, task)):
            data["label"]["teachers"][task]["kind"] = "random"
    new = config_from_dict(data)
    return new, {t: new.label.teachers[t].kind for t in label_tasks(new)}


def plain_loop(cfg: Config, files: list[str], out_path: str, threads: int) -> dict[str, Any]:
    """The baseline: one process, one loop, no Ray. Reads, decodes and resizes a batch, runs every
    teacher, encodes the cells, appends to one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from must_ray.images import BadImageError
    from must_ray.label.inputs import prepare_image
    from must_ray.label.run import label_image_size, label_tasks
    from must_ray.label.teachers import TeacherSet, resolve_teachers
    from must_ray.table import examples_schema
    from must_ray.tasks import build_tasks

    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    size = label_image_size(cfg)
    names = label_tasks(cfg)
    specs, classes = resolve_teachers(cfg, names, size)
    teachers = TeacherSet(specs, cfg, classes, size)
    tasks = build_tasks(names, len(classes), cfg.tasks)
    schema = examples_schema(names, {"kind": "pseudo_labels", "benchmark": "plain"})
    stage = {"read_decode_s": 0.0, "teachers_s": 0.0, "encode_s": 0.0, "write_s": 0.0}
    t_loop = time.perf_counter()
    rows = bad = 0
    with pq.ParquetWriter(out_path, schema) as writer:
        for start in range(0, len(files), cfg.label.batch_size):
            t0 = time.perf_counter()
            ids, pixels, pngs, hw = [], [], [], []
            for path in files[start:start + cfg.label.batch_size]:
                with open(path, "rb") as f:
                    data = f.read()
                try:
                    small, png, h, w = prepare_image(data, size, cfg.label.max_image_pixels)
                except BadImageError:
                    bad += 1
                    continue
                ids.append(path)
                pixels.append(small)
                pngs.append(png)
                hw.append((h, w))
            t1 = time.perf_counter()
            labels = teachers.predict(np.stack(pixels)) if pixels else {t: [] for t in names}
            t2 = time.perf_counter()
            cols: dict[str, list] = {f.name: [] for f in schema}
            for j, image_id in enumerate(ids):
                cols["image_id"].append(image_id)
                cols["image"].append(pngs[j])
                cols["source"].append("benchmark")
                cols["height"].append(hw[j][0])
                cols["width"].append(hw[j][1])
                for name, task in tasks.items():
                    for k, v in task.encode(labels[name][j]).items():
                        cols[k].append(v)
            table = pa.Table.from_pydict(cols, schema=schema)
            t3 = time.perf_counter()
            writer.write_table(table)
            t4 = time.perf_counter()
            rows += table.num_rows
            for k, a, b in (("read_decode_s", t0, t1), ("teachers_s", t1, t2), ("encode_s", t2, t3), ("write_s", t3, t4)):
                stage[k] += b - a
    total = time.perf_counter() - t_start
    loop = time.perf_counter() - t_loop
    return {"images": len(files), "rows": rows, "quarantined": bad, "seconds": round(total, 3),
            "images_per_s": round(len(files) / total, 2), "loop_images_per_s": round(len(files) / loop, 2),
            "setup_s": round(t_loop - t_start, 3), "torch_threads": threads,
            "stage_s": {k: round(v, 3) for k, v in stage.items()}}


def ray_job(cfg: Config, image_dir: str, out_dir: str) -> dict[str, Any]:
    """The production path: :func:`must_ray.label.run.run_labeling` on a connected Ray, profiled."""
    from benchmarks.label_profile import profiled_labeling

    t0 = time.perf_counter()
    summary = profiled_labeling(cfg, image_dir, out_dir)
    total = time.perf_counter() - t0
    n = summary["inputs"]
    return {"images": n, "rows": summary["rows"], "quarantined": summary["quarantined"], "seconds": round(total, 3),
            "images_per_s": round(n / total, 2), "pipeline_s": summary["pipeline_s"],
            "ray_pipeline_images_per_s": round(n / summary["pipeline_s"], 2) if summary["pipeline_s"] else None,
            "actors_used": summary["actors_used"], "shards": summary["shards"],
            "steady_images_per_s": summary["steady_images_per_s"], "actor_start_s": summary["actor_start_s"],
            "actor_init_s": summary["actor_init_s"], "actor_timeline_s": summary["actor_timeline_s"],
            "shards_decoded_in_actor": summary["shards_decoded_in_actor"],
            "stage_s": summary["stage_s"], "teacher_s": summary["teacher_s"]}


def run_plain_subprocess(cfg: Config, image_dir: str, out_path: str, threads: int, niceness: int = 0) -> dict[str, Any]:
    """:func:`plain_loop` in a fresh Python process at ``niceness`` (the Ray workers' niceness, so
    both sides get the same CPU priority on a shared machine); ``seconds`` = its whole wall time."""
    spec = {"cfg": config_to_dict(cfg), "image_dir": image_dir, "out": out_path, "threads": threads}
    result = run_module("benchmarks.label", spec, threads, niceness)
    wall = result.pop("process_s")
    result["in_process_seconds"] = result["seconds"]
    result["seconds"] = round(wall, 3)
    result["images_per_s"] = round(result["images"] / wall, 2)
    return result


@dataclass(frozen=True)
class LabelOptions:
    """``jobs/benchmark.py label``'s settings."""

    num_images: int = option(2048, "--num", "images (world scenes written as PNG files; default 2048)",
                             type=at_least(1))
    threads: Optional[list[int]] = option(None, "--threads", "torch threads of the plain loop, repeatable; the "
                                          "fastest is the baseline (default: 1 and #CPUs)", type=at_least(1),
                                          repeat=True)
    repeats: int = option(2, "--repeats", "rounds, in ABBA order (plain, ray, idiom, idiom, ray, plain ...); "
                          "medians are reported (default 2)", type=at_least(1))
    workdir: Optional[str] = workdir_option()


def benchmark_label(cfg: Config, options: LabelOptions = LabelOptions()) -> dict[str, Any]:
    """Run both sides on the same ``num_images`` world images and the same teachers; return the
    JSON-ready result with both throughputs and the ratios (Ray / plain). Needs a connected Ray
    (the cluster whose CPUs are "the same cores").

    ``repeats`` rounds in ABBA order (plain, Ray, Ray, plain, ...), so a load that drifts during
    the benchmark (a shared machine) biases neither side; each side's throughput is the median of
    its rounds."""
    import statistics

    import ray

    num_images, repeats = options.num_images, options.repeats
    cores = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    threads = options.threads or sorted({1, cores})
    niceness = ray_worker_niceness()
    load_before = os.getloadavg()[0]
    cfg, kinds = usable_teachers(cfg)
    own = options.workdir is None
    workdir = options.workdir or tempfile.mkdtemp(prefix="must-ray-bench-label-")
    try:
        image_dir = os.path.join(workdir, "images")
        write_benchmark_images(cfg, image_dir, num_images)
        plain_runs: dict[str, list[dict[str, Any]]] = {str(t): [] for t in threads}
        ray_runs: list[dict[str, Any]] = []
        idiom_runs: list[dict[str, Any]] = []

        def run_plain() -> None:
            for t in threads:
                plain_runs[str(t)].append(
                    run_plain_subprocess(cfg, image_dir, os.path.join(workdir, f"plain{t}.parquet"), t, niceness))

        def run_ray() -> None:
            out = os.path.join(workdir, "ray_labels")
            from must_ray.label.store import OutputStore  # imports torch and ray

            OutputStore(out).clear()  # the table, its quarantine and its manifest: a fresh run
            ray_runs.append(ray_job(cfg, image_dir, out))

        def run_idiom() -> None:
            out = os.path.join(workdir, "idiom_labels")
            shutil.rmtree(out, ignore_errors=True)
            idiom_runs.append(idiom_job(cfg, image_dir, out))

        for r in range(max(1, repeats)):
            for step in ((run_plain, run_ray, run_idiom) if r % 2 == 0 else (run_idiom, run_ray, run_plain)):
                step()

        def med(runs: list[dict[str, Any]], key: str) -> float:
            return round(statistics.median(x[key] for x in runs), 2)

        plain_e2e = {t: med(runs, "images_per_s") for t, runs in plain_runs.items()}
        plain_steady = {t: med(runs, "loop_images_per_s") for t, runs in plain_runs.items()}
        best_t = max(plain_e2e, key=plain_e2e.get)
        best_steady_t = max(plain_steady, key=plain_steady.get)
        ray_e2e = med(ray_runs, "images_per_s")
        ray_steady = med(ray_runs, "steady_images_per_s")
        idiom_e2e = med(idiom_runs, "images_per_s")
        vs_idiom = round(ray_e2e / idiom_e2e, 3)
        lc = cfg.label
        return {
            "benchmark": "label",
            "images": num_images,
            "image_size": lc.image_size or cfg.world.image_size,
            "cores": cores,
            "teachers": kinds,
            "repeats": max(1, repeats),
            "plain_images_per_s": plain_e2e[best_t],
            "ray_images_per_s": ray_e2e,
            "ratio": round(ray_e2e / plain_e2e[best_t], 3),
            "plain_steady_images_per_s": plain_steady[best_steady_t],
            "ray_steady_images_per_s": ray_steady,
            "steady_ratio": round(ray_steady / plain_steady[best_steady_t], 3),
            "idiom_images_per_s": idiom_e2e,
            "ratio_vs_idiom": vs_idiom,
            "target_ratio": TARGET_RATIO,
            "target_ratio_vs_idiom": TARGET_VS_IDIOM,
            "checks": [check("labelling, Ray Data job / plain PyTorch loop, end to end", round(ray_e2e / plain_e2e[best_t], 3),
                             ">=", TARGET_RATIO),
                       check("labelling, Ray Data job / plain PyTorch loop, steady state",
                             round(ray_steady / plain_steady[best_steady_t], 3), ">=", TARGET_RATIO),
                       check("labelling, Ray Data job / the plain Ray Data idiom (no exactly-once, no quarantine), "
                             "end to end", vs_idiom, ">=", TARGET_VS_IDIOM)],
            "plain_best_threads": int(best_t),
            "plain_images_per_s_by_threads": plain_e2e,
            "niceness": niceness,  # both sides ran at the Ray workers' CPU priority
            "loadavg_1m_before": round(load_before, 2),  # > 0: other work shared the cores
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "ray_settings": {"actors": lc.actors, "num_cpus_per_actor": lc.num_cpus_per_actor,
                             "decode_num_cpus": lc.decode_num_cpus, "torch_threads": lc.torch_threads,
                             "encode_threads": lc.encode_threads, "shard_size": lc.shard_size,
                             "batch_size": lc.batch_size},
            "plain": plain_runs,
            "ray": ray_runs,
            "idiom": idiom_runs,
        }
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def _plain_main(spec: dict) -> dict[str, Any]:
    cfg = config_from_dict(spec["cfg"])
    files = sorted(os.path.join(spec["image_dir"], n) for n in os.listdir(spec["image_dir"]))
    return plain_loop(cfg, files, spec["out"], int(spec["threads"]))


BENCHMARK = Benchmark("label", "labelling: Ray Data job vs plain PyTorch loop and the plain Ray Data idiom",
                      benchmark_label, LabelOptions,
                      smoke=("--num", "16", "--threads", "1", "--repeats", "1"))

__all__ = ["BENCHMARK", "LabelOptions", "benchmark_label", "plain_loop", "ray_job", "run_plain_subprocess", "usable_teachers", "write_benchmark_images"]


if __name__ == "__main__":
    module_main(_plain_main)
