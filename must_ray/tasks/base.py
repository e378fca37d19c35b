"""The contract every task module fulfils.

A *task* owns everything that differs between, say, depth and detection: the columns it adds to
the examples table and their codecs, the head that predicts it from feature maps, the masked loss,
the metric, the conversion of raw head outputs into labels (what a teacher writes), and how a
geometric augmentation moves its labels. The rest of the system (schema, trainer, labeller,
evaluator) only talks to this interface, so adding a sixth task means adding one module that
subclasses :class:`Task` and decorates it with :func:`must_ray.tasks.register_task`.

Terminology used throughout:

* **label** – one image's annotation as plain numpy, the task's native form (documented per task).
  Ground truth from the synthetic world, decoded table cells and post-processed teacher outputs are
  all labels, so metrics compare labels with labels.
* **row columns** – the task's Parquet cells for one image (``encode``/``decode`` convert).
  The task's *presence column* (its first column) is null when the row has no label for the task.
* **targets** – a batch of labels as tensors for the loss, always with a boolean ``mask`` (B,)
  saying which rows carry a label.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from must_ray.config import TaskConfig


@dataclass(frozen=True)
class Crop:
    """A geometric augmentation in normalised image coordinates: take the window
    ``(x0, y0, x1, y1)`` (each in [0, 1]) of the original image, resize it to ``out_size``
    (height, width) pixels, then mirror left-right if ``flip``."""

    x0: float = 0.0
    y0: float = 0.0
    x1: float = 1.0
    y1: float = 1.0
    flip: bool = False

    @property
    def is_identity(self) -> bool:
        return (self.x0, self.y0, self.x1, self.y1, self.flip) == (0.0, 0.0, 1.0, 1.0, False)


class Task(ABC):
    """Base class of a task; see the module docstring for the vocabulary."""

    #: registry key and the prefix of the task's table columns
    name: str = ""
    #: name of the headline metric in metric_compute(); its direction is higher_is_better
    primary_metric: str = ""
    higher_is_better: bool = True
    #: True when labels are per-pixel maps (decoded and resized in the loader)
    dense: bool = False

    def __init__(self, num_classes: int, cfg: Optional[TaskConfig] = None):
        """``num_classes``: object categories of the world/dataset (tasks that have no classes
        ignore it); ``cfg``: thresholds, loss weight etc."""
        self.num_classes = int(num_classes)
        self.cfg = cfg or TaskConfig()

    # ------------------------------------------------------------------ table
    @classmethod
    @abstractmethod
    def columns(cls) -> list[pa.Field]:
        """The task's Parquet columns, all nullable, named ``<prefix>_...``; the first is the
        presence column. Self-contained: decoding a row needs no config (e.g. depth stores its
        scale per row)."""

    @classmethod
    def presence_column(cls) -> str:
        return cls.columns()[0].name

    @abstractmethod
    def encode(self, label: Any) -> dict[str, Any]:
        """One label -> the task's row cells (Python/bytes values matching :meth:`columns`)."""

    @abstractmethod
    def decode(self, cells: dict[str, Any]) -> Any:
        """The task's row cells -> one label; ``None`` when the presence cell is null."""

    def null_cells(self) -> dict[str, Any]:
        """Cells for a row without this task's label."""
        return {f.name: None for f in self.columns()}

    # ------------------------------------------------------------------ augmentation
    @abstractmethod
    def augment(self, label: Any, crop: Crop, out_size: tuple[int, int]) -> Any:
        """Move a label with the image under ``crop`` (window, resize to ``out_size``, flip).
        Dense labels are resampled with nearest neighbour (values are never interpolated across
        object borders); boxes are shifted, scaled, clipped and dropped when they leave the window;
        normals have their x component negated on flips."""

    # ------------------------------------------------------------------ model side
    @abstractmethod
    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        """A head that maps the list of feature maps (``channels[i]`` channels at stride
        ``strides[i]``, finest first, as timm ``feature_info`` reports them) to this task's raw
        outputs (a tensor or a dict of tensors)."""

    @abstractmethod
    def targets(self, labels: Sequence[Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """A batch of labels (``None`` = missing) -> target tensors + ``mask`` (B,) bool."""

    @abstractmethod
    def loss(self, outputs: Any, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss averaged over rows with ``mask`` True. Rows without a label contribute
        nothing (zero loss and zero gradient); with no labelled row it returns a differentiable 0."""

    @abstractmethod
    def predict(self, outputs: Any, image_size: tuple[int, int]) -> list[Any]:
        """Raw head outputs for a batch -> one label per image, post-processed with the task's
        thresholds (this is what a teacher writes as a pseudo label)."""

    # ------------------------------------------------------------------ evaluation
    @abstractmethod
    def metric_state(self) -> Any:
        """A fresh accumulator for :meth:`metric_update` (must be picklable and mergeable)."""

    @abstractmethod
    def metric_update(self, state: Any, preds: Sequence[Any], gts: Sequence[Any]) -> Any:
        """Accumulate a batch of (prediction label, ground-truth label) pairs; rows whose ground
        truth is ``None`` are skipped. Returns the new state."""

    @abstractmethod
    def metric_merge(self, a: Any, b: Any) -> Any:
        """Combine two accumulators (distributed evaluation)."""

    @abstractmethod
    def metric_compute(self, state: Any) -> dict[str, float]:
        """Final metrics; includes :attr:`primary_metric`."""

    # ------------------------------------------------------------------ baselines
    def trivial_prediction(self, gts: Sequence[Any]) -> list[Any]:
        """Predictions of the trivial baseline this task's models must beat (majority class,
        mean depth, constant normal, no boxes ...), computed from the ground truth it is scored on."""
        raise NotImplementedError


def zero_loss(outputs: Any) -> torch.Tensor:
    """A differentiable zero connected to every tensor in ``outputs`` (so DDP sees all params used)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.sum() * 0.0
    if isinstance(outputs, dict):
        return sum((zero_loss(v) for v in outputs.values()), torch.zeros(()))
    if isinstance(outputs, (list, tuple)):
        return sum((zero_loss(v) for v in outputs), torch.zeros(()))
    return torch.zeros((), requires_grad=True)


def resize_nearest(arr: np.ndarray, crop: Crop, out_size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour window-resize-flip of a (H, W[, C]) map under ``crop``: the helper all
    dense tasks share so that image and labels move identically."""
    h, w = arr.shape[:2]
    oh, ow = out_size
    # pixel centres of the output grid mapped into the source window
    ys = crop.y0 * h + (np.arange(oh) + 0.5) * ((crop.y1 - crop.y0) * h / oh)
    xs = crop.x0 * w + (np.arange(ow) + 0.5) * ((crop.x1 - crop.x0) * w / ow)
    yi = np.clip(np.floor(ys).astype(np.int64), 0, h - 1)
    xi = np.clip(np.floor(xs).astype(np.int64), 0, w - 1)
    if crop.flip:
        xi = xi[::-1]
    return arr[yi[:, None], xi[None, :]]
