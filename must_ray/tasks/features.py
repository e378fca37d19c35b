"""Feature distillation as a task (RADIO, Theia): the student regresses a teacher backbone's
spatial feature map.

Opt-in (:attr:`Task.opt_in`): the synthetic world has no ground truth for it, so a config gets it
by naming its teacher, ``label.teachers.features: {kind: backbone, path: <model file>}`` (any
must-ray model's backbone, or a timm backbone by ``model_name``; ``docs/tasks.md``).

**Label**: float32 (h, w, ``dim``) at ``stride`` (h = ceil(H / stride)): the teacher's feature map
at the pyramid level nearest ``stride``, pooled to that grid, mapped to ``dim`` channels by a fixed
seeded orthogonal projection (none when the backbone already has ``dim``) and standardised per
location (zero mean, unit variance over the channels). The standardisation puts every feature
teacher on one scale, which is what Theia's per-teacher normalisation is for; it needs no pass
over the data first, so exactly-once sharded labelling stays one pass.

**Columns**: ``features_map`` binary — the map as little-endian float16 (about 2 KiB per 64-pixel
image at the defaults); ``features_shape`` list<int32> — (h, w, dim), so decoding needs no config.

**Head**: every pyramid level fused onto the level at ``stride`` (:class:`FeatureFuser`), a
conv-bn-relu, a 1x1 conv to ``dim``: the small adaptor head the papers put on the student.

**Loss**: per location ``(1 - cosine) + l1_weight * smooth-L1`` (Theia's pair), averaged over the
grid, then over labelled rows.

**Metric**: ``cosine`` (primary, higher is better): the mean per-location cosine similarity to
the label; ``smooth_l1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from must_ray.tasks import TaskConfig, register_task
from must_ray.tasks._layers import (
    ConvBNReLU,
    DenseTask,
    FeatureFuser,
    as_array,
    as_bytes,
    is_null,
    label_rows,
    pick_level,
    resize_map,
)
from must_ray.tasks.base import Crop, Legend, Task, fit_to_image, resize_nearest, zero_loss
from must_ray.typed_config import ConfigError


@dataclass
class FeaturesConfig(TaskConfig):
    """Knobs of feature distillation (``tasks.features``)."""

    stride: int = 16  # pixels per cell of the stored map (and of the head's output)
    dim: int = 64  # channels stored and predicted (the teacher's are projected to it)
    projection_seed: int = 0  # seed of the fixed projection from the teacher's channels to dim
    l1_weight: float = 1.0  # smooth-L1's share of the loss beside (1 - cosine)

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.stride < 1:
            raise ConfigError(f"{key}.stride must be >= 1, got {self.stride}")
        if not 2 <= self.dim <= 4096:
            raise ConfigError(f"{key}.dim must be in [2, 4096] (standardised over its channels), got {self.dim}")
        if self.l1_weight < 0:
            raise ConfigError(f"{key}.l1_weight must be >= 0, got {self.l1_weight}")


class FeaturesHead(nn.Module):
    """Adaptor head: the pyramid fused at the level nearest ``stride``, conv-bn-relu, 1x1 to ``dim``."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], stride: int, dim: int, width: int = 64):
        super().__init__()
        self.fuse = FeatureFuser(channels, strides, width, pick_level(strides, stride))
        self.conv = ConvBNReLU(width, width)
        self.pred = nn.Conv2d(width, dim, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.pred(self.conv(self.fuse(feats)))


@register_task
class FeaturesTask(Task):
    """Regress a teacher backbone's standardised spatial features."""

    name = "features"
    primary_metric = "cosine"
    metric_units = {"cosine": "-1..1", "smooth_l1": "ratio"}
    higher_is_better = True
    dense = True
    opt_in = True
    config_class = FeaturesConfig

    def grid(self, image_size: Sequence[int]) -> tuple[int, int]:
        """The label's (h, w) for an image of ``image_size`` (height, width)."""
        s = int(self.cfg.stride)
        return max(1, math.ceil(int(image_size[0]) / s)), max(1, math.ceil(int(image_size[1]) / s))

    # ------------------------------------------------------------------ teacher side
    def projection(self, channels: int) -> torch.Tensor:
        """The fixed (dim, channels) map from a teacher's channels to ``dim``: orthonormal rows
        (or columns, when it widens), drawn from ``projection_seed``; identity at equal sizes."""
        dim = int(self.cfg.dim)
        if channels == dim:
            return torch.eye(dim)
        g = torch.Generator().manual_seed(int(self.cfg.projection_seed) * 100_003 + channels)
        q, _ = torch.linalg.qr(torch.randn(max(channels, dim), min(channels, dim), generator=g, dtype=torch.float64))
        return (q.T if dim < channels else q).float()

    def teacher_labels(self, feature_map: torch.Tensor, image_size: Sequence[int]) -> list[np.ndarray]:
        """A teacher backbone's map (B, C, h', w') for images of ``image_size`` -> one label per
        image: pooled (or upsampled) to :meth:`grid`, projected to ``dim``, standardised per location."""
        x = feature_map.detach().float()
        grid = self.grid(image_size)
        x = F.adaptive_avg_pool2d(x, grid) if x.shape[-2] >= grid[0] else resize_map(x, grid)
        x = torch.einsum("dc,bchw->bdhw", self.projection(x.shape[1]).to(x.device), x)
        return channel_last_maps(standardise(x))

    # ------------------------------------------------------------------ table
    @classmethod
    def columns(cls) -> list[pa.Field]:
        return [pa.field("features_map", pa.binary(), nullable=True),
                pa.field("features_shape", pa.list_(pa.int32()), nullable=True)]

    def encode(self, label: Any) -> dict[str, Any]:
        if label is None:
            return self.null_cells()
        arr = np.asarray(label, dtype=np.float32)
        if arr.ndim != 3:
            raise ValueError(f"features label must be (h, w, dim), got {arr.shape}")
        return {"features_map": arr.astype("<f2").tobytes(), "features_shape": [int(n) for n in arr.shape]}

    def decode(self, cells: dict[str, Any]) -> Any:
        cell = cells.get("features_map")
        if is_null(cell):
            return None
        shape = tuple(int(n) for n in as_array(cells.get("features_shape"), np.int64))
        return np.frombuffer(as_bytes(cell), dtype="<f2").astype(np.float32).reshape(shape)

    # ------------------------------------------------------------------ augmentation
    def augment(self, label: Any, crop: Crop, out_size: tuple[int, int]) -> Any:
        """The map resampled (nearest) under ``crop`` onto the grid of ``out_size``; a flip mirrors
        it (features are treated as mirror-equivariant, as the papers' random flips assume)."""
        if label is None:
            return None
        return np.ascontiguousarray(resize_nearest(np.asarray(label), crop, self.grid(out_size)))

    # ------------------------------------------------------------------ model side
    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        return FeaturesHead(channels, strides, int(self.cfg.stride), int(self.cfg.dim))

    def targets(self, labels: Sequence[Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Labels on the grid of ``image_size`` stacked to (B, dim, h, w); missing rows are zeros, masked."""
        h, w = self.grid(image_size)
        maps = []
        for lab in labels:
            arr = np.zeros((h, w, int(self.cfg.dim)), np.float32) if lab is None else np.asarray(lab, np.float32)
            if arr.shape[:2] != (h, w):
                arr = resize_nearest(arr, Crop(), (h, w))
            maps.append(arr)
        if not maps:
            return {"features": torch.zeros((0, int(self.cfg.dim), h, w)), "mask": label_rows(labels)}
        stacked = torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).contiguous()
        return {"features": stacked, "mask": label_rows(labels)}

    def loss(self, outputs: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = targets["mask"].to(outputs.device)
        if not bool(mask.any()):
            return zero_loss(outputs)
        target = targets["features"].to(outputs.device)[mask]
        if target.shape[1] != outputs.shape[1]:
            raise ValueError(f"features labels have {target.shape[1]} channels but the head predicts "
                             f"{outputs.shape[1]}: set tasks.features.dim to the labels' dim")
        out = resize_map(outputs[mask].float(), target.shape[-2:])
        cosine = 1.0 - F.cosine_similarity(out, target, dim=1, eps=1e-6)
        l1 = F.smooth_l1_loss(out, target, reduction="none").mean(1)
        return (cosine + float(self.cfg.l1_weight) * l1).mean()

    def predict(self, outputs: torch.Tensor, image_size: tuple[int, int]) -> list[Any]:
        """Raw outputs on the grid of ``image_size`` as (h, w, dim) float32 maps (what a student
        writes as a feature teacher in a later round)."""
        with torch.no_grad():
            return channel_last_maps(resize_map(outputs.detach().float(), self.grid(image_size)))

    # ------------------------------------------------------------------ evaluation
    def metric_state(self) -> dict[str, float]:
        return {"cosine": 0.0, "smooth_l1": 0.0, "count": 0}

    def metric_update(self, state: dict, preds: Sequence[Any], gts: Sequence[Any]) -> dict:
        state = dict(state)
        for p, g in DenseTask.pairs(preds, gts):
            g = torch.from_numpy(np.ascontiguousarray(g, np.float32))
            p = torch.zeros_like(g) if p is None else torch.from_numpy(np.ascontiguousarray(p, np.float32))
            state["cosine"] += float(F.cosine_similarity(p, g, dim=-1, eps=1e-6).sum())
            state["smooth_l1"] += float(F.smooth_l1_loss(p, g, reduction="none").mean(-1).sum())
            state["count"] += int(g.shape[0] * g.shape[1])
        return state

    def metric_merge(self, a: dict, b: dict) -> dict:
        return {k: a[k] + b[k] for k in a}

    def metric_compute(self, state: dict) -> dict[str, float]:
        n = state["count"]
        if not n:
            return {"cosine": 0.0, "smooth_l1": float("inf")}
        return {"cosine": state["cosine"] / n, "smooth_l1": state["smooth_l1"] / n}

    def trivial_prediction(self, gts: Sequence[Any]) -> list[Any]:
        """The mean feature vector of ``gts`` at every location."""
        maps = [np.asarray(g, np.float64) for g in gts if g is not None]
        if not maps:
            return [None for _ in gts]
        mean = np.concatenate([m.reshape(-1, m.shape[-1]) for m in maps]).mean(0)
        return [None if g is None else np.broadcast_to(mean, np.asarray(g).shape).astype(np.float32) for g in gts]

    # ------------------------------------------------------------------ drawing (the label grid)
    def draw_range(self, labels: Sequence[Any]) -> None:
        return None

    def draw(self, label: Any, image: np.ndarray, *, class_names: Sequence[str] = (),
             value_range: Any = None) -> np.ndarray:
        """The map's first three channels as red, green and blue (each over -2..2 standard
        deviations), enlarged to the image."""
        arr = np.asarray(label, np.float64)
        rgb = np.stack([arr[..., min(i, arr.shape[-1] - 1)] for i in range(3)], -1)
        rgb = np.clip((rgb + 2.0) / 4.0, 0.0, 1.0)
        return (fit_to_image(rgb, image) * 255).astype(np.uint8)

    def legend(self, class_names: Sequence[str] = (), value_range: Any = None) -> Legend:
        return Legend(self.name, note="channels 0-2 as RGB, -2..2 std")


def channel_last_maps(x: torch.Tensor) -> list[np.ndarray]:
    """(B, C, h, w) -> B float32 labels of (h, w, C): the task's label form, from a teacher or a head."""
    return list(x.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32))


def standardise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, C, h, w) maps with each location's C-vector at zero mean and unit variance."""
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


__all__ = ["FeaturesTask", "FeaturesConfig", "FeaturesHead", "channel_last_maps", "standardise"]
