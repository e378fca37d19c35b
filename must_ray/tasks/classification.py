"""Image classification with soft (top-k) labels.

**Label**: ``{"label": int, "topk_ids": int32 (k,), "topk_probs": float32 (k,)}`` — the argmax class
and a top-k soft label (a teacher's tempered softmax, best first). Ground truth is
``topk_ids=[label], topk_probs=[1.0]``. Classes are the world's ``C`` object categories.

**Columns**: ``cls_label`` int32 (presence), ``cls_topk_ids`` list<int32>,
``cls_topk_probs`` list<float32>.

**Head**: every pyramid level global-average-pooled and concatenated, LayerNorm, a two-layer MLP to
``C`` logits. Pooling all levels lets the head use fine detail (small objects) as well as context.

**Loss**: soft-target cross-entropy ``-sum_c q_c log softmax(z)_c`` where ``q`` is the top-k
distribution renormalised to sum 1 (one-hot ``label`` when it has no mass), averaged over labelled
rows. This is MuST's distillation loss for classification pseudo labels.

**Predict** (teacher adapter): ``softmax(logits / cfg.temperature)``, top ``cfg.topk`` (at most C)
ids and probabilities, sorted descending (so they sum to <= 1).

**World label**: the category of the instance with the most visible pixels (0 without objects).
**Probe**: an image probe regressing the one-hot class (the logits' space).

**Metric**: ``top1`` (primary, higher is better) = accuracy of the predicted ``label``; also
``top5`` = the ground-truth label is among the first five predicted ``topk_ids``. State: counts.

The loss is not multiplied by ``cfg.loss_weight``; the trainer applies task weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from must_ray.tasks import TaskConfig, register_task
from must_ray.tasks._drawing import caption
from must_ray.tasks._layers import as_array, is_null, label_rows, select_rows
from must_ray.tasks.base import Crop, Task, zero_loss
from must_ray.typed_config import ConfigError


class PooledMLPHead(nn.Module):
    """Global average pool of every level, concatenated -> LayerNorm -> Linear-ReLU-Linear."""

    def __init__(self, channels: Sequence[int], num_outputs: int, hidden: int = 256):
        super().__init__()
        total = int(sum(channels))
        self.mlp = nn.Sequential(nn.LayerNorm(total), nn.Linear(total, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_outputs))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.mlp(torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1))


@dataclass
class ClassificationConfig(TaskConfig):
    """Knobs of classification (``tasks.classification``)."""

    topk: int = 5  # soft-label length a teacher writes
    temperature: float = 1.0  # softmax temperature of a teacher's soft labels
    postprocess_knobs = ("topk", "temperature")

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.topk < 1:
            raise ConfigError(f"{key}.topk must be >= 1, got {self.topk}")
        if self.temperature <= 0:
            raise ConfigError(f"{key}.temperature must be > 0, got {self.temperature}")


def make_label(label: int, topk_ids: Any = None, topk_probs: Any = None) -> dict[str, Any]:
    """A classification label in canonical dtypes (ground truth when top-k is omitted)."""
    label = int(label)
    ids = np.asarray([label] if topk_ids is None else topk_ids, dtype=np.int32).reshape(-1)
    probs = np.asarray([1.0] if topk_probs is None else topk_probs, dtype=np.float32).reshape(-1)
    if ids.shape != probs.shape:
        raise ValueError(f"topk_ids {ids.shape} and topk_probs {probs.shape} differ in length")
    return {"label": label, "topk_ids": ids, "topk_probs": probs}


@register_task
class ClassificationTask(Task):
    """Soft-label image classification over the ``num_classes`` object categories."""

    name = "classification"
    primary_metric = "top1"
    metric_units = {"top1": "0-1", "top5": "0-1"}
    higher_is_better = True
    dense = False
    config_class = ClassificationConfig
    probe = "image"

    # ------------------------------------------------------------------ table
    @classmethod
    def columns(cls) -> list[pa.Field]:
        return [
            pa.field("cls_label", pa.int32(), nullable=True),
            pa.field("cls_topk_ids", pa.list_(pa.int32()), nullable=True),
            pa.field("cls_topk_probs", pa.list_(pa.float32()), nullable=True),
        ]

    def encode(self, label: Any) -> dict[str, Any]:
        if label is None:
            return self.null_cells()
        lab = make_label(label["label"], label.get("topk_ids"), label.get("topk_probs"))
        return {"cls_label": lab["label"], "cls_topk_ids": lab["topk_ids"].tolist(),
                "cls_topk_probs": lab["topk_probs"].tolist()}

    def decode(self, cells: dict[str, Any]) -> Any:
        raw = cells.get("cls_label")
        if is_null(raw):
            return None
        label = int(raw.as_py() if hasattr(raw, "as_py") else raw)
        ids, probs = cells.get("cls_topk_ids"), cells.get("cls_topk_probs")
        if is_null(ids) or is_null(probs):
            return make_label(label)
        return make_label(label, as_array(ids, np.int32), as_array(probs, np.float32))

    # ------------------------------------------------------------------ augmentation
    def augment(self, label: Any, crop: Crop, out_size: tuple[int, int]) -> Any:
        """Image-level labels do not move with the image."""
        return label

    # ------------------------------------------------------------------ model side
    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        return PooledMLPHead(channels, self.num_classes)

    def soft_target(self, label: dict[str, Any]) -> np.ndarray:
        """The (C,) target distribution of one label: top-k probabilities renormalised to sum 1;
        ids outside [0, C) are dropped; a label without mass becomes one-hot on ``label``."""
        q = np.zeros(self.num_classes, dtype=np.float32)
        ids = np.asarray(label.get("topk_ids", []), dtype=np.int64).reshape(-1)
        probs = np.asarray(label.get("topk_probs", []), dtype=np.float32).reshape(-1)
        keep = (ids >= 0) & (ids < self.num_classes) & (probs > 0)
        np.add.at(q, ids[keep], probs[keep])
        total = q.sum()
        if total <= 0:
            q[:] = 0
            q[int(label["label"])] = 1.0
            return q
        return q / total

    def targets(self, labels: Sequence[Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``probs`` (B, C) soft targets (zeros for unlabelled rows) and ``mask`` (B,)."""
        q = np.zeros((len(labels), self.num_classes), dtype=np.float32)
        for i, lab in enumerate(labels):
            if lab is not None:
                q[i] = self.soft_target(lab)
        return {"probs": torch.from_numpy(q), "mask": label_rows(labels)}

    def loss(self, outputs: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = targets["mask"].to(outputs.device)
        if not bool(mask.any()):
            return zero_loss(outputs)
        logits = select_rows(outputs, mask).float()
        q = targets["probs"].to(outputs.device)[mask].float()
        return -(q * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

    def predict(self, outputs: torch.Tensor, image_size: tuple[int, int]) -> list[Any]:
        with torch.no_grad():
            probs = F.softmax(outputs.detach().float() / self.cfg.temperature, dim=1).cpu()
            k = min(int(self.cfg.topk), probs.shape[1])
            top_p, top_i = probs.topk(k, dim=1, largest=True, sorted=True)
        return [make_label(int(i[0]), i.numpy(), p.numpy()) for i, p in zip(top_i, top_p)]

    # ------------------------------------------------------------------ evaluation
    def metric_state(self) -> dict[str, int]:
        return {"correct": 0, "correct5": 0, "total": 0}

    def metric_update(self, state: dict, preds: Sequence[Any], gts: Sequence[Any]) -> dict:
        state = dict(state)
        for p, g in zip(preds, gts, strict=True):
            if g is None:
                continue
            state["total"] += 1
            if p is None:
                continue
            gl = int(g["label"])
            state["correct"] += int(int(p["label"]) == gl)
            ids = np.asarray(p.get("topk_ids", [p["label"]])).reshape(-1)[:5]
            state["correct5"] += int(gl in ids.tolist())
        return state

    def metric_merge(self, a: dict, b: dict) -> dict:
        return {k: a[k] + b[k] for k in a}

    def metric_compute(self, state: dict) -> dict[str, float]:
        n = max(state["total"], 1)
        return {"top1": state["correct"] / n, "top5": state["correct5"] / n}

    # ------------------------------------------------------------------ baselines
    def trivial_prediction(self, gts: Sequence[Any]) -> list[Any]:
        """The majority ground-truth class for every image."""
        labels = [int(g["label"]) for g in gts if g is not None]
        major = int(np.bincount(labels).argmax()) if labels else 0
        return [None if g is None else make_label(major) for g in gts]

    # ------------------------------------------------------------------ world and probe
    def world_label(self, buffers: Mapping[str, Any]) -> Any:
        """The category of the instance with the most visible pixels (class 0 without objects)."""
        cats = np.asarray(buffers["instance_categories"])
        return make_label(int(cats[int(np.argmax(buffers["instance_pixels"]))]) if len(cats) else 0)

    def probe_target(self, label: Any) -> tuple[np.ndarray, np.ndarray]:
        """The one-hot class (the probe's outputs are read as logits)."""
        return np.eye(self.num_classes)[int(label["label"])], np.bool_(True)

    # ------------------------------------------------------------------ drawing (the label grid)
    def draw(self, label: Any, image: np.ndarray, *, class_names: Sequence[str] = (),
             value_range: tuple[float, float] | None = None) -> np.ndarray:
        """The image with a caption: the label's class name and its probability."""
        c = int(label["label"])
        ids = np.asarray(label.get("topk_ids", [c]), dtype=np.int64).reshape(-1).tolist()
        probs = np.asarray(label.get("topk_probs", [1.0]), dtype=np.float64).reshape(-1)
        p = float(probs[ids.index(c)]) if c in ids else (float(probs[0]) if probs.size else 1.0)
        name = class_names[c] if 0 <= c < len(class_names) else str(c)
        return caption(image, f"{name} {p:.2f}")
