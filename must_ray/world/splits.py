"""Named splits of the synthetic world, written as examples tables with Ray Data.

A split is ``(num, seed_offset, tasks, domain)`` from :class:`~must_ray.config.SplitConfig`:
scene ``i`` of the split is scene ``(world.seed, seed_offset + i)`` of the domain, so any row can be
regenerated anywhere and splits with disjoint offsets never share a scene. Rendering runs in Ray
Data actors (scales out over a cluster). Each actor call renders and writes one whole file, scenes
``[k * rows_per_file, (k + 1) * rows_per_file)`` in index order, so a file's bytes are a function of
the split and ``k`` alone: no scheduling, retry or completion order reaches the table, and writing
the same split twice gives byte-identical Parquet files.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from must_ray import __version__
from must_ray.config import Config, SplitConfig, WorldConfig
from must_ray.images import encode_png
from must_ray.io import atomic_path, is_uri, write_atomic
from must_ray.progress import ProgressLine, current_tag, progress_tag
from must_ray.table import TableNotFoundError, examples_schema, non_table_files, rows_to_table, table_files
from must_ray.tasks import build_tasks
from must_ray.typed_config import ConfigError, config_to_dict
from must_ray.world.labels import scene_labels
from must_ray.world.render import render_scenes
from must_ray.world.scenes import CATEGORIES, NUM_CATEGORIES

WORLD_SOURCE = "must-ray-world"


def image_id_for(seed: int, domain: str, index: int) -> str:
    """The stable key of world scene ``(seed, index)`` in ``domain``."""
    return f"world/{domain}/s{seed}/{index:09d}"


def split_provenance(world: WorldConfig, name: str, split: SplitConfig) -> dict[str, Any]:
    """What the Parquet metadata records about a world split."""
    return {
        "kind": "world",
        "split": name,
        "tasks": list(split.tasks),
        "classes": list(CATEGORIES),
        "world": {k: v for k, v in config_to_dict(world).items() if k != "splits"},
        "split_config": config_to_dict(split),
        "code_version": __version__,
    }


class RenderBatch:
    """Scene indices of one split (``{"id": [...]}``) -> their examples-table rows, in order.

    A class (not a closure) so the task objects are built once per worker. Every task derives its
    label from the scene's raw render buffers (``Task.world_label``)."""

    def __init__(self, world: WorldConfig, split: SplitConfig, task_cfgs: dict, image_dir: Optional[str] = None):
        self.world = world
        self.split = split
        self.tasks = build_tasks(split.tasks, NUM_CATEGORIES, task_cfgs)
        self.image_dir = image_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        indices = [int(self.split.seed_offset + i) for i in batch["id"]]
        scenes = render_scenes(
            self.world.seed, indices, image_size=self.world.image_size, domain=self.split.domain,
            min_objects=self.world.min_objects, max_objects=self.world.max_objects,
        )
        rows = []
        for index, scene in zip(indices, scenes):
            image_id = image_id_for(self.world.seed, self.split.domain, index)
            png = encode_png(scene["image"])
            if self.image_dir:
                _write_image_file(self.image_dir, image_id, png)
            h, w = scene["image"].shape[:2]
            row = {"image_id": image_id, "image": png, "source": WORLD_SOURCE, "height": h, "width": w}
            for name, label in scene_labels(scene, self.tasks).items():
                row.update(self.tasks[name].encode(label))
            rows.append(row)
        return rows_to_table(rows, list(self.tasks))


def image_file_name(image_id: str) -> str:
    """File name of a world image written as a plain file (``--image-dir``)."""
    return image_id.replace("/", "_") + ".png"


def _write_image_file(directory: str, image_id: str, png: bytes) -> None:
    write_atomic(os.path.join(directory, image_file_name(image_id)), png)


def split_file_name(name: str, index: int) -> str:
    """Name of file ``index`` of split ``name`` (scenes from ``index * rows_per_file``)."""
    return f"{name}-{index:05d}.parquet"


class RenderFiles:
    """Ray Data batch function: file indices -> each file rendered (``render_batch`` scenes at a
    time) and written whole, its rows in scene order; returns one ``(file, rows)`` row per file."""

    def __init__(self, world: WorldConfig, name: str, split: SplitConfig, task_cfgs: dict, out_dir: str,
                 schema: pa.Schema, image_dir: Optional[str] = None):
        self.render = RenderBatch(world, split, task_cfgs, image_dir)
        self.world, self.name, self.split, self.out_dir, self.schema = world, name, split, out_dir, schema

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        files, rows = [], []
        for k in (int(i) for i in batch["id"]):
            start = k * self.world.rows_per_file
            stop = min(start + self.world.rows_per_file, self.split.num)
            parts = [self.render({"id": np.arange(i, min(i + self.world.render_batch, stop))})
                     for i in range(start, stop, self.world.render_batch)]
            table = pa.concat_tables(parts).cast(self.schema)
            files.append(_write_table(self.out_dir, split_file_name(self.name, k), table))
            rows.append(table.num_rows)
        return {"file": np.array(files, dtype=object), "rows": np.array(rows)}


def _write_table(out_dir: str, file_name: str, table: pa.Table) -> str:
    """Write one Parquet file of a split: atomically on a local disk, one PUT on an object store."""
    if is_uri(out_dir):
        fs, root = pafs.FileSystem.from_uri(out_dir)
        path = f"{root.rstrip('/')}/{file_name}"
        pq.write_table(table, path, filesystem=fs)
        return f"{out_dir.rstrip('/')}/{file_name}"
    path = os.path.join(out_dir, file_name)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _clear_table(out_dir: str) -> None:
    """Remove the table files of a previous write (the folder holds nothing else:
    :func:`check_split_output`), so a smaller split leaves no stale file behind."""
    if not is_uri(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    try:
        fs, files = table_files(out_dir)
    except TableNotFoundError:
        return
    for f in files:
        fs.delete_file(f)


def check_split_output(out_dir: str) -> None:
    """Refuse (ConfigError, one line) an output folder for a split that holds anything but a
    table: writing a split replaces the folder, so those files would be lost."""
    others = non_table_files(out_dir)
    if others == [os.path.abspath(out_dir)]:
        raise ConfigError(f"--out {out_dir}: an existing file, not a folder; choose a folder path for the table")
    if others:
        raise ConfigError(f"--out {out_dir}: holds files that are not part of a table ({', '.join(others[:3])}); "
                          "writing the split would delete them: choose a new or empty folder")


def write_split(cfg: Config, name: str, out_dir: str, num: Optional[int] = None,
                image_dir: Optional[str] = None) -> dict[str, Any]:
    """Render split ``name`` of ``cfg.world`` into an examples table at ``out_dir`` (a directory
    of Parquet files, replaced if present); optionally also as PNG files in ``image_dir``.
    Returns a summary (path, rows, files, tasks)."""
    import ray

    if name not in cfg.world.splits:
        raise ConfigError(f"world.splits: no split named {name!r}; known: {', '.join(sorted(cfg.world.splits))}")
    split = cfg.world.splits[name]
    if num is not None:
        if num < 1:
            raise ConfigError(f"--num must be >= 1, got {num}")
        split = SplitConfig(num=num, seed_offset=split.seed_offset, tasks=list(split.tasks), domain=split.domain)
    if split.num < 1:
        raise ConfigError(f"world.splits.{name}.num must be >= 1 to write it")
    check_split_output(out_dir)
    if image_dir:
        os.makedirs(image_dir, exist_ok=True)

    _clear_table(out_dir)
    num_files = max(1, math.ceil(split.num / cfg.world.rows_per_file))
    max_actors = max(1, min(num_files, int(ray.cluster_resources().get("CPU", 1))))
    schema = examples_schema(split.tasks, split_provenance(cfg.world, name, split))
    ds = ray.data.range(num_files, override_num_blocks=num_files).map_batches(
        RenderFiles, fn_constructor_args=(cfg.world, name, split, cfg.tasks, out_dir, schema, image_dir),
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
    )
    line = ProgressLine(f"{current_tag('world')} {name}", split.num, "rows")
    done = 0
    with progress_tag(current_tag("world"), ray_data=False):  # this line, not one per file
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            done += int(batch["rows"].sum())
            if done < split.num:
                line.update(done)
    line.done = done
    line.finish()
    if done != split.num:
        raise RuntimeError(f"world split {name}: rendered {done} rows, expected {split.num}")
    return {"split": name, "path": out_dir, "rows": split.num, "files": len(table_files(out_dir)[1]),
            "tasks": list(split.tasks),
            "image_dir": image_dir}
