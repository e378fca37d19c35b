"""A toy sixth task that lives outside must_ray, the way a user's task module would: object
boundaries ("edges") derived from the world's instance buffer.

**Label**: uint8 (H, W), 1 where a pixel's 4-neighbourhood holds another instance (or the room),
0 elsewhere. **Column**: ``edges_png`` (grey PNG). **Head**: a 1x1 convolution on the finest
pyramid level, upsampled to the input. **Loss**: per-pixel binary cross-entropy. **Predict**:
sigmoid > ``threshold``. **Metric**: ``f1`` (primary) and ``iou`` of the edge pixels, from
mergeable counts. **Probe**: a pixel probe regressing +-1 (the sign of the logit).

Registered by listing ``tests.edges_task`` in a config's ``task_modules``; nothing under
``must_ray/`` knows it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from must_ray.images import decode_png, encode_png
from must_ray.tasks import TaskConfig, register_task
from must_ray.tasks._layers import DenseTask, as_bytes, is_null
from must_ray.typed_config import ConfigError


@dataclass
class EdgesConfig(TaskConfig):
    """Knobs of the edges task (``tasks.edges``)."""

    threshold: float = 0.5  # edge probability above which a teacher marks a pixel

    def validate(self, key: str) -> None:
        super().validate(key)
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"{key}.threshold must be in (0, 1), got {self.threshold}")


class PointwiseHead(nn.Module):
    """A 1x1 convolution on the finest pyramid level, bilinearly upsampled to the input size."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)
        self.stride = stride

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.conv(feats[0])
        return F.interpolate(x, scale_factor=self.stride, mode="bilinear", align_corners=False)


def instance_edges(instances: np.ndarray) -> np.ndarray:
    """1 where a pixel's right/left/up/down neighbour belongs to another instance."""
    inst = np.asarray(instances)
    edge = np.zeros(inst.shape, dtype=bool)
    horizontal = inst[:, 1:] != inst[:, :-1]
    vertical = inst[1:, :] != inst[:-1, :]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge.astype(np.uint8)


@register_task
class EdgesTask(DenseTask):
    """Binary object-boundary maps."""

    name = "edges"
    primary_metric = "f1"
    higher_is_better = True
    config_class = EdgesConfig
    probe = "pixel"
    out_channels = 1
    target_key = "edges"
    label_dtype = np.uint8
    fill_value = 0

    @classmethod
    def columns(cls) -> list[pa.Field]:
        return [pa.field("edges_png", pa.binary(), nullable=True)]

    def encode(self, label: Any) -> dict[str, Any]:
        if label is None:
            return self.null_cells()
        return {"edges_png": encode_png(np.asarray(label, dtype=np.uint8))}

    def decode(self, cells: dict[str, Any]) -> Any:
        cell = cells.get("edges_png")
        return None if is_null(cell) else decode_png(as_bytes(cell), np.uint8)

    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        return PointwiseHead(int(channels[0]), int(strides[0]))

    def pixel_loss(self, outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bce = F.binary_cross_entropy_with_logits(outputs[:, 0], target.to(outputs.dtype), reduction="none")
        return bce, torch.ones_like(bce, dtype=torch.bool)

    def postprocess(self, outputs: torch.Tensor) -> list[Any]:
        return [m.numpy() for m in (torch.sigmoid(outputs[:, 0]) > self.cfg.threshold).to(torch.uint8)]

    def metric_state(self) -> dict[str, int]:
        return {"tp": 0, "fp": 0, "fn": 0}

    def metric_update(self, state: dict, preds: Sequence[Any], gts: Sequence[Any]) -> dict:
        state = dict(state)
        for p, g in self.pairs(preds, gts):
            g = g.astype(bool)
            p = np.zeros_like(g) if p is None else p.astype(bool)
            state["tp"] += int((p & g).sum())
            state["fp"] += int((p & ~g).sum())
            state["fn"] += int((~p & g).sum())
        return state

    def metric_merge(self, a: dict, b: dict) -> dict:
        return {k: a[k] + b[k] for k in a}

    def metric_compute(self, state: dict) -> dict[str, float]:
        tp, fp, fn = state["tp"], state["fp"], state["fn"]
        return {"f1": 2 * tp / max(2 * tp + fp + fn, 1), "iou": tp / max(tp + fp + fn, 1)}

    def trivial_prediction(self, gts: Sequence[Any]) -> list[Any]:
        """No edge anywhere (f1 0)."""
        return [None if g is None else np.zeros(np.asarray(g).shape[:2], dtype=np.uint8) for g in gts]

    def world_label(self, buffers: Mapping[str, Any]) -> Any:
        return instance_edges(buffers["instances"])

    def probe_target(self, label: Any) -> tuple[np.ndarray, np.ndarray]:
        lab = np.asarray(label, dtype=np.float64)
        return (2.0 * lab - 1.0)[..., None], np.ones(lab.shape, dtype=bool)
