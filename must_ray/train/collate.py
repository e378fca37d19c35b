"""The worker side of training input: an Arrow batch -> decoded, augmented, collated task targets.

(The driver side, examples tables -> one Ray Dataset, is :mod:`must_ray.train.dataset`.)

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

from must_ray.table import decode_column

try:  # Ray >= 2.44; the fallback keeps this module importable (and testable) without Ray Data
    from ray.data.collate_fn import ArrowBatchCollateFn
except ImportError:  # pragma: no cover
    ArrowBatchCollateFn = object  # type: ignore[misc,assignment]

from must_ray.images import decode_image_rgb
from must_ray.tasks import build_tasks
from must_ray.tasks.base import Crop

ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)  # random-resized-crop aspect ratios (w / h), log-uniform


# ----------------------------------------------------------------------------- tables (driver)


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

    def crop_for(self, image_id: str) -> Crop:
        if not self.augment:
            return Crop()
        key = zlib.crc32(image_id.encode("utf-8", "surrogatepass"))
        rng = np.random.default_rng([self.seed, self.epoch, key])
        return sample_crop(rng, self.crop_scale_min)

    def labels(self, batch: pa.Table, task: str, crops: Sequence[Crop]) -> list[Any]:
        """Decoded, augmented labels of ``task`` for every row (``None`` where the presence cell
        is null or the batch lacks the task's columns)."""
        t = self.tasks[task]
        return [None if label is None else t.augment(label, crop, self.out_size)
                for label, crop in zip(decode_column(t, batch), crops)]

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
