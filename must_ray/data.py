"""Training input: examples tables -> Ray Data -> decoded, augmented, collated task targets.

Two halves:

* **Driver side** (:func:`read_tables`, :func:`table_tasks`, :func:`table_classes`): read any
  number of examples tables with ``ray.data.read_parquet``, conform each to the run's task list
  (``schema.conform``: a task a table lacks reads as all-null, i.e. masked) and union them. Files
  are shuffled per epoch (``FileShuffleConfig(reseed_after_execution=True)``); rows are mixed further
  by each worker's local shuffle buffer. Reading stays light (Parquet + column ops only), so the
  read tasks reserve a fraction of a CPU (``TrainConfig.read_cpus``) and never starve while the
  training workers hold the rest.
* **Worker side** (:class:`TrainCollate`): an ``ArrowBatchCollateFn`` for
  ``DataIterator.iter_torch_batches``. It runs in Ray Data's prefetch thread pool, overlapped with
  the training step, and turns an Arrow batch into tensors: it decodes each image, samples one
  :class:`~must_ray.tasks.base.Crop` per image (random-resized window + horizontal flip, keyed by
  ``(seed, epoch, image_id)`` so it is reproducible and thread-safe), resizes the image bilinearly
  under that crop, decodes every present label (dense labels are PNG-decoded here, never before),
  moves it with ``Task.augment`` under the *same* crop, and stacks targets with ``Task.targets``.

The collated batch is a flat ``{str: Tensor}`` mapping (so Ray moves it to the GPU inside the
prefetch threads): ``"image"`` uint8 (B, H, W, 3) and ``"<task>/<key>"`` for each target tensor
(always including ``"<task>/mask"``). :func:`split_batch` turns it back into
``(images, {task: targets})``.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

try:  # Ray >= 2.44; the fallback keeps this module importable (and testable) without Ray Data
    from ray.data.collate_fn import ArrowBatchCollateFn
except ImportError:  # pragma: no cover
    ArrowBatchCollateFn = object  # type: ignore[misc,assignment]

from must_ray.schema import BASE_COLUMNS, conform, decode_image_rgb
from must_ray.tasks import build_tasks, get_task_class, registered_task_names
from must_ray.tasks.base import Crop

ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)  # random-resized-crop aspect ratios (w / h), log-uniform


# ----------------------------------------------------------------------------- tables (driver)


def _parquet_dataset(path: str):
    import pyarrow.dataset as pads

    return pads.dataset(path, format="parquet")


def table_schema(path: str) -> pa.Schema:
    """The Arrow schema (with key-value metadata) of an examples table: a Parquet file, a
    directory of them, or a URI pyarrow understands (``s3://...``)."""
    import pyarrow.parquet as pq

    ds = _parquet_dataset(path)
    files = sorted(ds.files)
    if not files:
        raise FileNotFoundError(f"no Parquet files in {path}")
    return pq.read_schema(files[0], filesystem=ds.filesystem)


def table_rows(path: str) -> int:
    """Row count from Parquet footers (no data read)."""
    return int(_parquet_dataset(path).count_rows())


def table_tasks(paths: Sequence[str]) -> list[str]:
    """Registered tasks (canonical order) whose presence column exists in at least one table."""
    names: set[str] = set()
    for p in paths:
        names.update(table_schema(p).names)
    return [t for t in registered_task_names() if get_task_class(t).presence_column() in names]


def table_classes(paths: Sequence[str]) -> list[str]:
    """The class vocabulary (provenance ``classes``) shared by ``paths``. Tables without a
    vocabulary are ignored; tables that disagree, or none having one, raise ValueError."""
    from must_ray.schema import read_provenance

    found: dict[str, list[str]] = {}
    for p in paths:
        classes = read_provenance(table_schema(p)).get("classes")
        if classes:
            found[p] = list(classes)
    if not found:
        raise ValueError(f"none of the tables {list(paths)} records a class vocabulary "
                         "(Parquet metadata must_ray.classes); cannot size the heads")
    first_path, first = next(iter(found.items()))
    for p, classes in found.items():
        if classes != first:
            raise ValueError(f"tables disagree on the class vocabulary: {first_path} has {first}, {p} has {classes}")
    return first


class _Conform:
    """map_batches function: an Arrow batch -> exactly the run's columns (absent tasks null)."""

    def __init__(self, tasks: Sequence[str]):
        self.tasks = list(tasks)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return conform(batch, self.tasks).replace_schema_metadata(None)


def read_tables(paths: Sequence[str], tasks: Sequence[str], *, seed: int = 0, read_cpus: float = 0.25,
                shuffle_files: bool = True):
    """One Ray Dataset over every table in ``paths``, conformed to ``tasks`` and unioned.

    Only the base columns and the tasks' columns a table has are read; conform adds the rest as
    nulls. ``read_cpus``: logical CPUs each read task reserves (fractional, so reading is never
    starved by training workers that hold whole CPUs)."""
    import ray.data
    from ray.data import FileShuffleConfig

    if not paths:
        raise ValueError("no training tables given")
    wanted = set(BASE_COLUMNS)
    for t in tasks:
        wanted.update(f.name for f in get_task_class(t).columns())
    parts = []
    for i, path in enumerate(paths):
        names = table_schema(path).names
        missing = [c for c in BASE_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path} is not an examples table: it lacks base columns {missing}")
        columns = [c for c in names if c in wanted]
        shuffle = FileShuffleConfig(seed=seed + i, reseed_after_execution=True) if shuffle_files else None
        ds = ray.data.read_parquet(path, shuffle=shuffle, num_cpus=read_cpus).select_columns(columns)
        ds = ds.map_batches(_Conform(list(tasks)), batch_format="pyarrow", batch_size=None, num_cpus=read_cpus)
        parts.append(ds)
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def tables_bytes(paths: Sequence[str]) -> int:
    """Total size of the tables' Parquet files (a proxy for their in-memory size: the bulk is
    already-compressed image/label PNG bytes)."""
    total = 0
    for p in paths:
        ds = _parquet_dataset(p)
        for info in ds.filesystem.get_file_info(list(ds.files)):
            total += max(int(info.size or 0), 0)
    return total


def cache_in_object_store(ds, num_rows: int, block_rows: int, seed: int = 0):
    """Materialise ``ds`` in the object store, split into blocks of about ``block_rows`` rows, with
    the block order re-randomised at every execution (= every epoch). Each epoch then starts
    from memory instead of re-reading Parquet (which costs seconds of task start-up per epoch on
    small tables), and the block shuffle + each worker's local shuffle buffer mix the rows."""
    from ray.data import RandomSeedConfig

    blocks = max(1, math.ceil(num_rows / max(1, block_rows)))
    cached = ds.materialize()
    if cached.num_blocks() < blocks:  # splitting blocks already in memory is cheap; before, it is a stage
        cached = cached.repartition(blocks).materialize()
    return cached.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


# ----------------------------------------------------------------------------- crops and images


def sample_crop(rng: np.random.Generator, scale_min: float, flip: bool = True) -> Crop:
    """A random-resized-crop window covering ``[scale_min, 1]`` of the image area with an aspect
    ratio in ``ASPECT_RANGE`` (clipped to the image), uniform position, and a flip with p = 0.5."""
    area = rng.uniform(scale_min, 1.0)
    log_lo, log_hi = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = min(1.0, math.sqrt(area * aspect))
    h = min(1.0, math.sqrt(area / aspect))
    x0 = rng.uniform(0.0, 1.0 - w)
    y0 = rng.uniform(0.0, 1.0 - h)
    return Crop(float(x0), float(y0), float(x0 + w), float(y0 + h), bool(flip and rng.random() < 0.5))


def crop_image(image: np.ndarray, crop: Crop, out_size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> the ``crop`` window resized bilinearly to ``out_size`` (h, w), mirrored
    if ``crop.flip``. Uses the same window geometry as ``tasks.base.resize_nearest`` (pixel-area
    coordinates), so image and dense labels stay aligned."""
    h, w = image.shape[:2]
    oh, ow = out_size
    if (crop.x0, crop.y0, crop.x1, crop.y1) == (0.0, 0.0, 1.0, 1.0) and (h, w) == (oh, ow):
        out = image
    else:
        box = (crop.x0 * w, crop.y0 * h, crop.x1 * w, crop.y1 * h)
        out = np.asarray(Image.fromarray(image).resize((ow, oh), Image.BILINEAR, box=box))
    if crop.flip:
        out = out[:, ::-1]
    return out


# ----------------------------------------------------------------------------- collate (worker)


class TrainCollate(ArrowBatchCollateFn):
    """Arrow batch -> ``{"image": uint8 (B, H, W, 3), "<task>/<key>": target tensors}``.

    ``task_cfgs`` maps task name -> ``TaskConfig``; ``augment`` switches the random crop + flip
    (off: every image is only resized to ``image_size``). Thread-safe: the random state is derived
    per image from ``(seed, epoch, image_id)``."""

    def __init__(self, tasks: Sequence[str], num_classes: int, task_cfgs: Optional[Mapping[str, Any]] = None,
                 image_size: int = 64, augment: bool = True, crop_scale_min: float = 0.6, seed: int = 0,
                 epoch: int = 0):
        super().__init__()
        self.task_names = list(tasks)
        self.tasks = build_tasks(self.task_names, num_classes, dict(task_cfgs or {}))
        self.out_size = (int(image_size), int(image_size))
        self.augment = bool(augment)
        self.crop_scale_min = float(crop_scale_min)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self._columns = {t: [f.name for f in task.columns()] for t, task in self.tasks.items()}

    def crop_for(self, image_id: str) -> Crop:
        if not self.augment:
            return Crop()
        key = zlib.crc32(image_id.encode("utf-8", "surrogatepass"))
        rng = np.random.default_rng([self.seed, self.epoch, key])
        return sample_crop(rng, self.crop_scale_min)

    def labels(self, batch: pa.Table, task: str, crops: Sequence[Crop]) -> list[Any]:
        """Decoded, augmented labels of ``task`` for every row (``None`` where the presence cell
        is null or the batch lacks the task's columns)."""
        cols = self._columns[task]
        n = batch.num_rows
        if cols[0] not in batch.column_names:
            return [None] * n
        presence = batch.column(cols[0])
        if presence.null_count == n:
            return [None] * n
        valid = presence.is_valid().to_pylist()
        cells = {c: (batch.column(c).to_pylist() if c in batch.column_names else [None] * n) for c in cols}
        t = self.tasks[task]
        out: list[Any] = []
        for i in range(n):
            if not valid[i]:
                out.append(None)
                continue
            label = t.decode({c: cells[c][i] for c in cols})
            out.append(t.augment(label, crops[i], self.out_size))
        return out

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        ids = batch.column("image_id").to_pylist()
        crops = [self.crop_for(i) for i in ids]
        images = np.stack([crop_image(decode_image_rgb(b), c, self.out_size)
                           for b, c in zip(batch.column("image").to_pylist(), crops)])
        out: dict[str, torch.Tensor] = {"image": torch.from_numpy(images)}
        for name in self.task_names:
            targets = self.tasks[name].targets(self.labels(batch, name, crops), self.out_size)
            for key, value in targets.items():
                out[f"{name}/{key}"] = value
        return out


def split_batch(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """The flat collated mapping -> ``(uint8 images, {task: targets})``."""
    targets: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in batch.items():
        if key == "image":
            continue
        task, _, name = key.partition("/")
        targets.setdefault(task, {})[name] = value
    return batch["image"], targets


def batch_to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move every tensor of a collated batch to ``device`` (no-op on the CPU)."""
    if device.type == "cpu":
        return dict(batch)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
