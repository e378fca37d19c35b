"""Semantic segmentation.

**Label**: uint8 (H, W) class map: 0 = background, ``c + 1`` = object category ``c``, 255 = ignore.
So the task has ``C + 1`` classes.

**Column**: ``seg_png`` binary — the map as an 8-bit grey PNG (:func:`schema.encode_png`).

**Head**: :class:`~must_ray.tasks._layers.DenseHead` — all levels fused at stride 4, conv-bn-relu,
1x1 conv to ``C + 1`` logits, bilinear upsampling to the input size.

**Loss**: per-pixel cross-entropy, ignoring 255, averaged per row over its valid pixels and then
over labelled rows (unlabelled rows: zero loss, zero gradient).

**Predict** (teacher adapter): softmax, argmax; pixels whose max probability is below
``cfg.confidence_threshold`` become 255 (ignore), so uncertain pseudo labels do not train.

**Metric**: ``miou`` (primary, higher is better) over the ``C + 1`` classes from a confusion matrix
(rows = ground truth, columns = prediction plus one "no prediction" column for 255/missing
predictions, which count as misses of the true class); classes absent from both ground truth and
prediction are left out of the mean. Also ``pixel_acc``. The state is the matrix, merged by sum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from must_ray.images import decode_png, encode_png
from must_ray.tasks import TaskConfig, register_task
from must_ray.tasks._drawing import INVALID_COLOUR, SEG_PALETTE, class_colour
from must_ray.tasks._layers import DenseTask, as_bytes, is_null
from must_ray.tasks.base import Legend, fit_to_image
from must_ray.typed_config import ConfigError

IGNORE = 255


@dataclass
class SegmentationConfig(TaskConfig):
    """Knobs of segmentation (``tasks.segmentation``)."""

    confidence_threshold: float = 0.0  # a teacher's pixels below this probability -> ignore (255)
    postprocess_knobs = ("confidence_threshold",)

    def validate(self, key: str) -> None:
        super().validate(key)
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ConfigError(f"{key}.confidence_threshold must be in [0, 1], got {self.confidence_threshold}")


@register_task
class SegmentationTask(DenseTask):
    """Per-pixel classification into background + ``num_classes`` categories."""

    name = "segmentation"
    primary_metric = "miou"
    metric_units = {"miou": "0-1", "pixel_acc": "0-1"}
    higher_is_better = True
    config_class = SegmentationConfig
    probe = "pixel"
    target_key = "labels"
    label_dtype = np.uint8
    fill_value = IGNORE

    def __init__(self, num_classes: int, cfg=None):
        super().__init__(num_classes, cfg)
        self.out_channels = self.num_classes + 1

    # ------------------------------------------------------------------ table
    @classmethod
    def columns(cls) -> list[pa.Field]:
        return [pa.field("seg_png", pa.binary(), nullable=True)]

    def encode(self, label: Any) -> dict[str, Any]:
        if label is None:
            return self.null_cells()
        arr = np.asarray(label)
        if arr.ndim != 2:
            raise ValueError(f"segmentation label must be (H, W), got {arr.shape}")
        if arr.dtype != np.uint8:
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise ValueError("segmentation class ids must be in [0, 255]")
            arr = arr.astype(np.uint8)
        return {"seg_png": encode_png(arr)}

    def decode(self, cells: dict[str, Any]) -> Any:
        cell = cells.get("seg_png")
        if is_null(cell):
            return None
        return decode_png(as_bytes(cell), np.uint8)

    # ------------------------------------------------------------------ model side
    def targets(self, labels: Sequence[Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``labels`` (B, H, W) int64 class ids (255 = ignore, also for unlabelled rows) + ``mask``."""
        out = super().targets(labels, image_size)
        out["labels"] = out["labels"].long()
        return out

    def pixel_loss(self, outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = target.long()
        valid = (target != IGNORE) & (target < outputs.shape[1])
        ce = F.cross_entropy(outputs, torch.where(valid, target, torch.zeros_like(target)), reduction="none")
        return ce, valid

    def postprocess(self, outputs: torch.Tensor) -> list[Any]:
        probs = F.softmax(outputs, dim=1)
        conf, cls = probs.max(dim=1)
        cls = cls.to(torch.uint8)
        thr = float(self.cfg.confidence_threshold)
        if thr > 0:
            cls[conf < thr] = IGNORE
        return [m.numpy() for m in cls]

    # ------------------------------------------------------------------ evaluation
    def metric_state(self) -> np.ndarray:
        k = self.num_classes + 1
        return np.zeros((k, k + 1), dtype=np.int64)

    def metric_update(self, state: np.ndarray, preds: Sequence[Any], gts: Sequence[Any]) -> np.ndarray:
        k = self.num_classes + 1
        state = state.copy()
        for p, g in self.pairs(preds, gts):
            g = g.astype(np.int64).reshape(-1)
            valid = g < k  # drops 255 (ignore) and anything out of range
            g = g[valid]
            if p is None:
                pc = np.full_like(g, k)
            else:
                pc = p.astype(np.int64).reshape(-1)[valid]
                pc = np.where(pc < k, pc, k)  # 255 / out of range -> "no prediction"
            state += np.bincount(g * (k + 1) + pc, minlength=k * (k + 1)).reshape(k, k + 1)
        return state

    def metric_merge(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def metric_compute(self, state: np.ndarray) -> dict[str, float]:
        k = state.shape[0]
        tp = np.diag(state[:, :k]).astype(np.float64)
        gt = state.sum(axis=1).astype(np.float64)
        pred = state[:, :k].sum(axis=0).astype(np.float64)
        union = gt + pred - tp
        present = union > 0
        miou = float((tp[present] / union[present]).mean()) if present.any() else 0.0
        total = state.sum()
        return {"miou": miou, "pixel_acc": float(tp.sum() / total) if total else 0.0}

    # ------------------------------------------------------------------ baselines
    def trivial_prediction(self, gts: Sequence[Any]) -> list[Any]:
        """The most frequent ground-truth class (over all pixels of ``gts``) everywhere."""
        counts = np.zeros(256, dtype=np.int64)
        for g in gts:
            if g is not None:
                counts += np.bincount(np.asarray(g, dtype=np.uint8).reshape(-1), minlength=256)
        counts[IGNORE] = 0
        major = int(counts.argmax())
        return [None if g is None else np.full(np.asarray(g).shape[:2], major, dtype=np.uint8) for g in gts]

    # ------------------------------------------------------------------ world and probe
    def world_label(self, buffers: Mapping[str, Any]) -> Any:
        """Each pixel's instance category + 1, 0 where the room is seen."""
        inst = np.asarray(buffers["instances"])
        seg = np.zeros(inst.shape, dtype=np.uint8)
        obj = inst >= 0
        seg[obj] = np.asarray(buffers["instance_categories"])[inst[obj]] + 1
        return seg

    def probe_target(self, label: Any) -> tuple[np.ndarray, np.ndarray]:
        """The one-hot class per cell (read as logits); ignore pixels are invalid."""
        k = self.num_classes + 1
        valid = label < k
        return np.eye(k, dtype=np.float64)[np.where(valid, label, 0).astype(np.int64)], valid

    # ------------------------------------------------------------------ drawing (the label grid)
    def draw(self, label: Any, image: np.ndarray, *, class_names: Sequence[str] = (),
             value_range: tuple[float, float] | None = None) -> np.ndarray:
        """The class map in the class palette (:data:`~must_ray.tasks._drawing.SEG_PALETTE`:
        the colours boxes of the same category have; ignore is black), resized to the image."""
        return SEG_PALETTE[fit_to_image(np.asarray(label, dtype=np.uint8), image)]

    def legend(self, class_names: Sequence[str] = (), value_range: tuple[float, float] | None = None) -> Legend:
        """Background, every category and ignore, each with its colour."""
        names = [class_names[c] if c < len(class_names) else str(c)
                 for c in range(max(self.num_classes, len(class_names)))]
        swatches = [("background", class_colour(-1))] + [(n, class_colour(c)) for c, n in enumerate(names)]
        return Legend(self.name, swatches=tuple(swatches + [("ignore", INVALID_COLOUR)]))
