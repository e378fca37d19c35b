"""The field's way to pseudo-label, the third contestant of ``jobs/benchmark.py label``: the plain
Ray Data batch-inference idiom a user writes first (Ray's own batch-inference examples), with
must-ray's teachers and codecs so that the work per image is the same as the job's:

``read_binary_files`` -> ``map_batches(decode)`` (tasks: decode + resize once) ->
``map_batches(Teachers, compute=ActorPoolStrategy(...))`` (every teacher, label cells encoded) ->
``write_parquet``.

What it leaves out is what makes ``must_ray.label`` a production job: no plan, no exactly-once
commits (a failure mid-write leaves partial files and a rerun labels everything again), no
quarantine (an undecodable image fails the whole job), no progress, no provenance or summary.
The ratio ``ours / idiom`` is the price of those (target: >= 0.95).
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from must_ray.config import Config, config_from_dict
from must_ray.typed_config import config_to_dict


def decode(batch: dict[str, np.ndarray], size: int, max_pixels: int) -> dict[str, Any]:
    """Decode and resize each file once (the pixels every teacher sees) and keep its ``image`` cell."""
    from must_ray.label.inputs import prepare_image

    pixels, pngs, heights, widths = [], [], [], []
    for data in batch["bytes"]:
        small, png, h, w = prepare_image(data, size, max_pixels)
        pixels.append(small)
        pngs.append(png)
        heights.append(h)
        widths.append(w)
    return {"path": batch["path"], "pixels": np.stack(pixels), "image": np.array(pngs, dtype=object),
            "height": np.array(heights), "width": np.array(widths)}


class Teachers:
    """The ``map_batches`` callable class: every teacher built once per actor, then per batch
    all teachers on the decoded pixels and each task's ``encode`` into the table's columns."""

    def __init__(self, cfg_dict: dict, specs: list, classes: list[str], names: list[str], size: int):
        import torch

        from must_ray.label.labeler import torch_threads
        from must_ray.label.teachers import TeacherSet
        from must_ray.tasks import build_tasks

        cfg = config_from_dict(cfg_dict)
        torch.set_num_threads(torch_threads(cfg))
        self.teachers = TeacherSet(specs, cfg, classes, size)
        self.tasks = build_tasks(names, len(classes), cfg.tasks)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        labels = self.teachers.predict(batch["pixels"])
        cols: dict[str, list] = {"image_id": list(batch["path"]), "image": list(batch["image"]),
                                 "source": ["benchmark"] * len(batch["path"]),
                                 "height": [int(h) for h in batch["height"]], "width": [int(w) for w in batch["width"]]}
        for name, task in self.tasks.items():
            for label in labels[name]:
                for k, v in task.encode(label).items():
                    cols.setdefault(k, []).append(v)
        return pa.table(cols)


def idiom_job(cfg: Config, image_dir: str, out_dir: str) -> dict[str, Any]:
    """The idiom on a connected Ray, from the image folder to the Parquet files in ``out_dir``;
    the actor pool and CPUs are ``label.actors`` / ``label.num_cpus_per_actor``, the read, decode
    and write tasks take ``label.decode_num_cpus`` each (the job's own settings), the teachers are
    resolved by the job's code."""
    import ray

    from must_ray.label.run import label_image_size, label_tasks
    from must_ray.label.teachers import resolve_teachers

    t0 = time.perf_counter()
    lc = cfg.label
    size, names = label_image_size(cfg), label_tasks(cfg)
    specs, classes = resolve_teachers(cfg, names, size)
    io_cpus = {"num_cpus": lc.decode_num_cpus}  # Ray's default of 1 CPU per read/write task cannot run beside
    # an actor pool that holds the rest of a small node (the job's decode share: what it leaves free)
    ds = ray.data.read_binary_files(image_dir, include_paths=True, ray_remote_args=io_cpus)
    ds = ds.map_batches(decode, fn_kwargs={"size": size, "max_pixels": lc.max_image_pixels},
                        batch_size=lc.batch_size, num_cpus=lc.decode_num_cpus)
    ds = ds.map_batches(Teachers, fn_constructor_args=(config_to_dict(cfg), specs, classes, names, size),
                        batch_size=lc.batch_size, num_cpus=lc.num_cpus_per_actor, num_gpus=lc.num_gpus_per_actor,
                        compute=ray.data.ActorPoolStrategy(min_size=lc.actors[0], max_size=lc.actors[1]))
    ds.write_parquet(out_dir, ray_remote_args=io_cpus)
    seconds = time.perf_counter() - t0
    files = [n for n in os.listdir(out_dir) if n.endswith(".parquet")]
    rows = sum(pq.ParquetFile(os.path.join(out_dir, n)).metadata.num_rows for n in files)
    images = len(os.listdir(image_dir))
    return {"images": images, "rows": rows, "files": len(files), "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 2)}


__all__ = ["idiom_job", "Teachers", "decode"]
