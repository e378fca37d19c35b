"""The contract every task module fulfils.

A *task* owns everything that differs between, say, depth and detection: the columns it adds to
the examples table and their codecs, the head that predicts it from feature maps, the masked loss,
the metric, the conversion of raw head outputs into labels (what a teacher writes), how a
geometric augmentation moves its labels, and how a label is drawn in the label grid (:meth:`Task.draw`,
with a :class:`Legend` that says how to read it). The rest of the system (schema, trainer, labeller,
evaluator) only talks to this interface, so adding a sixth task means adding one module that
subclasses :class:`Task` and decorates it with :func:`must_ray.tasks.register_task`. A task also
owns its knobs (:attr:`Task.config_class`, validated through the registry), how it derives its
ground truth from the synthetic world's raw render buffers (:meth:`Task.world_label`) and what a
frozen-feature transfer probe regresses for it (:attr:`Task.probe`, :meth:`Task.probe_target`).
The hooks a new task defines are listed in ``docs/tasks.md``.

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
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from must_ray.task_registry import TaskConfig, make_task_config
from must_ray.tasks._drawing import caption, colour_map, robust_range


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
    #: unit of each metric_compute() value, shown in reports ("0-1", "%", "m", "deg", "ratio")
    metric_units: Mapping[str, str] = {}
    #: True when labels are per-pixel maps (decoded and resized in the loader)
    dense: bool = False
    #: the task's knobs (``tasks.<name>`` in a config): a dataclass subclassing TaskConfig
    config_class: type[TaskConfig] = TaskConfig
    #: the light transfer probe (:mod:`must_ray.evaluate.transfer`): ``"image"`` (a ridge on the
    #: pooled features), ``"pixel"`` (a ridge on per-pixel features) or ``None`` (no light probe)
    probe: Optional[str] = None
    #: True when a config gets this task only by naming it (``label.teachers.<name>``, a split's
    #: ``tasks``): no default teacher split, trained teacher or test column (``default_task_names``)
    opt_in: bool = False

    def __init__(self, num_classes: int, cfg: Any = None):
        """``num_classes``: object categories of the world/dataset (tasks that have no classes
        ignore it); ``cfg``: the task's knobs, a :attr:`config_class` object or a mapping of them
        (validated; unknown knobs raise ConfigError), ``None`` for the defaults."""
        self.num_classes = int(num_classes)
        self.cfg = make_task_config(self.config_class, cfg, f"tasks.{self.name}")

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

    # ------------------------------------------------------------------ the synthetic world
    def world_label(self, buffers: Mapping[str, Any]) -> Any:
        """This task's ground-truth label of one rendered scene, derived from the world's raw render
        ``buffers`` (:func:`must_ray.world.render_scenes`: ``image``, ``depth``, ``normals``,
        ``instances``, ``instance_categories``, ``instance_pixels``, ``instance_boxes``,
        ``instance_visible``, ``meta``), so the world step serves any registered task."""
        raise NotImplementedError(f"task {self.name!r} derives no label from the world's render buffers")

    # ------------------------------------------------------------------ transfer probe
    def probe_target(self, label: Any) -> tuple[np.ndarray, np.ndarray]:
        """What the light probe regresses for one label, in the space of the head's raw outputs (so
        :meth:`predict` turns probe outputs into labels): ``(targets, valid)`` with targets (K,) and
        valid a bool scalar for an ``"image"`` probe; for a ``"pixel"`` probe, of a label already
        resized to the feature grid (:meth:`augment`), targets (h, w, K) and valid (h, w) bool."""
        raise NotImplementedError(f"task {self.name!r} has no light probe")

    # ------------------------------------------------------------------ drawing (the label grid)
    def draw_range(self, labels: Sequence[Any]) -> Optional[tuple[float, float]]:
        """The value range all of this task's panels in one grid share (so that they compare and
        one colour bar reads them all), from the reference ``labels`` (the ground truth when the
        grid has it); ``None`` when the drawing needs no range. Default: a dense task's robust
        range of its scalar map (:func:`scalar_map`)."""
        maps = [scalar_map(lab) for lab in labels if lab is not None] if self.dense else []
        return robust_range(maps) if maps else None

    def draw(self, label: Any, image: np.ndarray, *, class_names: Sequence[str] = (),
             value_range: Optional[tuple[float, float]] = None) -> np.ndarray:
        """One grid panel: ``label`` drawn for ``image`` (uint8 RGB (H, W, 3) at the panel's size)
        as a uint8 RGB array of that size; ``value_range`` comes from :meth:`draw_range`. Default:
        a dense label's scalar map, resized to the image, through viridis over ``value_range``;
        any other label as a caption of its text under the image."""
        if not self.dense:
            return caption(image, str(label))
        values = fit_to_image(scalar_map(label), image)
        lo, hi = value_range or robust_range([values])
        return colour_map(values, lo, hi, "viridis")

    def legend(self, class_names: Sequence[str] = (),
               value_range: Optional[tuple[float, float]] = None) -> Optional[Legend]:
        """How to read this task's panels, drawn once under the grid; ``None`` when the panels
        explain themselves. Default: a dense task's viridis colour bar over ``value_range``."""
        if not self.dense or value_range is None:
            return None
        return Legend(self.name, colormap="viridis", value_range=value_range)


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


# ----------------------------------------------------------------------------- drawing (the label grid)


@dataclass(frozen=True, eq=False)
class Legend:
    """How to read a task's grid panels, drawn once under the grid: named colour ``swatches``
    (e.g. segmentation classes), a colour bar (matplotlib ``colormap`` over ``value_range``, in
    ``unit``), a small key ``image`` (e.g. a sphere's normals) and a short ``note``."""

    title: str
    swatches: tuple[tuple[str, tuple[int, int, int]], ...] = ()
    colormap: str = ""
    value_range: Optional[tuple[float, float]] = None
    unit: str = ""
    image: Optional[np.ndarray] = None
    note: str = ""


def scalar_map(label: Any) -> np.ndarray:
    """A dense label as one (H, W) float map: the label itself, or its first channel."""
    arr = np.asarray(label, dtype=np.float64)
    return arr if arr.ndim == 2 else arr[..., 0]


def fit_to_image(arr: np.ndarray, image: np.ndarray) -> np.ndarray:
    """A dense map resized (nearest neighbour) to ``image``'s height and width, so a label of any
    resolution fills its panel without interpolating values."""
    size = tuple(np.asarray(image).shape[:2])
    return arr if arr.shape[:2] == size else resize_nearest(arr, Crop(), size)
