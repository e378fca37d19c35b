"""Monocular metric depth.

**Label**: float32 (H, W) depth in metres; 0 = invalid (no measurement / sky).

**Columns**: ``depth_png`` binary — uint16 PNG of ``round(depth / scale)`` (valid depths never
round to 0) via :func:`schema.encode_depth`; ``depth_scale`` float32 — metres per unit, stored per
row (``cfg.depth_scale`` when encoding) so decoding needs no config. Round trip: within one
``depth_scale`` step.

**Head**: :class:`~must_ray.tasks._layers.DenseHead` with one channel: log-depth (initialised to
the geometric middle of 1 m and ``cfg.max_depth``), upsampled to the input size.

**Loss**: L1 on log-depth over valid pixels (scale-aware and robust across near and far
surfaces), per row mean, then mean over labelled rows.

**Predict** (teacher adapter): ``exp`` of the output, clipped to ``[cfg.depth_scale,
cfg.max_depth]`` (strictly positive: 0 would mean "invalid").

**Metric**: ``abs_rel`` (primary, lower is better) = mean |p - g| / g, ``delta1`` = fraction with
max(p/g, g/p) < 1.25 (also ``delta2``/``delta3`` at 1.25^2, 1.25^3) and ``rmse`` in metres, all
over pixels valid in the ground truth; a prediction <= 0 (or missing) counts as a tiny epsilon,
i.e. as wrong. The state holds sums and a count, merged by addition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from must_ray.images import decode_png, encode_png
from must_ray.tasks import TaskConfig, register_task
from must_ray.tasks._drawing import colour_map, robust_range
from must_ray.tasks._layers import DenseTask, as_bytes, is_null
from must_ray.tasks.base import Legend, fit_to_image
from must_ray.typed_config import ConfigError

EPS = 1e-6  # stand-in for non-positive predicted depth in metrics


@dataclass
class DepthConfig(TaskConfig):
    """Knobs of depth (``tasks.depth``)."""

    depth_scale: float = 0.001  # metres per uint16 unit in the table (1 mm)
    max_depth: float = 20.0  # metres; predictions are clipped to it

    def validate(self, key: str) -> None:
        super().validate(key)
        if not 0 < self.depth_scale:
            raise ConfigError(f"{key}.depth_scale must be > 0, got {self.depth_scale}")
        if self.max_depth <= 0 or self.max_depth / self.depth_scale > 65535:
            raise ConfigError(
                f"{key}.max_depth must be > 0 and fit uint16 at depth_scale "
                f"(max_depth/depth_scale <= 65535), got {self.max_depth}/{self.depth_scale}"
            )


@register_task
class DepthTask(DenseTask):
    """Per-pixel metric depth regression (in log space)."""

    name = "depth"
    primary_metric = "abs_rel"
    metric_units = {"abs_rel": "ratio", "rmse": "m", "delta1": "0-1", "delta2": "0-1", "delta3": "0-1"}
    higher_is_better = False
    config_class = DepthConfig
    probe = "pixel"
    out_channels = 1
    target_key = "depth"
    label_dtype = np.float32
    fill_value = 0.0

    # ------------------------------------------------------------------ table
    @classmethod
    def columns(cls) -> list[pa.Field]:
        return [pa.field("depth_png", pa.binary(), nullable=True),
                pa.field("depth_scale", pa.float32(), nullable=True)]

    def encode(self, label: Any) -> dict[str, Any]:
        if label is None:
            return self.null_cells()
        arr = np.asarray(label, dtype=np.float32)
        if arr.ndim != 2:
            raise ValueError(f"depth label must be (H, W), got {arr.shape}")
        scale = float(np.float32(self.cfg.depth_scale))  # the value the float32 column will hold
        return {"depth_png": encode_depth(arr, scale), "depth_scale": scale}

    def decode(self, cells: dict[str, Any]) -> Any:
        cell = cells.get("depth_png")
        if is_null(cell):
            return None
        scale = cells.get("depth_scale")
        if is_null(scale):
            scale = self.cfg.depth_scale
        scale = float(scale.as_py() if hasattr(scale, "as_py") else scale)
        return decode_depth(as_bytes(cell), scale)

    # ------------------------------------------------------------------ model side
    def head_bias_init(self) -> float:
        return 0.5 * math.log(self.cfg.max_depth)

    def pixel_loss(self, outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = target.to(outputs.dtype)
        valid = torch.isfinite(target) & (target > 0)
        log_gt = torch.log(torch.where(valid, target, torch.ones_like(target)))
        return (outputs[:, 0] - log_gt).abs(), valid

    def postprocess(self, outputs: torch.Tensor) -> list[Any]:
        lo, hi = float(self.cfg.depth_scale), float(self.cfg.max_depth)
        depth = outputs[:, 0].clamp(max=math.log(hi)).exp().clamp(lo, hi)
        return [d.numpy().astype(np.float32) for d in depth]

    # ------------------------------------------------------------------ evaluation
    def metric_state(self) -> dict[str, float]:
        return {"abs_rel": 0.0, "sq_err": 0.0, "delta1": 0.0, "delta2": 0.0, "delta3": 0.0, "count": 0}

    def metric_update(self, state: dict, preds: Sequence[Any], gts: Sequence[Any]) -> dict:
        state = dict(state)
        for p, g in self.pairs(preds, gts):
            g = g.astype(np.float64)
            valid = np.isfinite(g) & (g > 0)
            if not valid.any():
                continue
            gv = g[valid]
            pv = np.full_like(gv, EPS) if p is None else p.astype(np.float64)[valid]
            pv = np.where(np.isfinite(pv) & (pv > 0), pv, EPS)
            ratio = np.maximum(pv / gv, gv / pv)
            state["abs_rel"] += float((np.abs(pv - gv) / gv).sum())
            state["sq_err"] += float(((pv - gv) ** 2).sum())
            for i in (1, 2, 3):
                state[f"delta{i}"] += float((ratio < 1.25 ** i).sum())
            state["count"] += int(gv.size)
        return state

    def metric_merge(self, a: dict, b: dict) -> dict:
        return {k: a[k] + b[k] for k in a}

    def metric_compute(self, state: dict) -> dict[str, float]:
        n = state["count"]
        if not n:
            return {"abs_rel": float("inf"), "delta1": 0.0, "delta2": 0.0, "delta3": 0.0, "rmse": float("inf")}
        out = {"abs_rel": state["abs_rel"] / n, "rmse": math.sqrt(state["sq_err"] / n)}
        out.update({f"delta{i}": state[f"delta{i}"] / n for i in (1, 2, 3)})
        return out

    # ------------------------------------------------------------------ baselines
    def trivial_prediction(self, gts: Sequence[Any]) -> list[Any]:
        """The mean valid ground-truth depth (over all of ``gts``) everywhere."""
        total, count = 0.0, 0
        for g in gts:
            if g is not None:
                g = np.asarray(g, dtype=np.float64)
                v = g[np.isfinite(g) & (g > 0)]
                total, count = total + float(v.sum()), count + v.size
        mean = total / count if count else 1.0
        return [None if g is None else np.full(np.asarray(g).shape[:2], mean, dtype=np.float32) for g in gts]

    # ------------------------------------------------------------------ world and probe
    def world_label(self, buffers: Mapping[str, Any]) -> Any:
        """The rendered z-depth in metres."""
        return np.array(buffers["depth"], dtype=np.float32, copy=True)

    def probe_target(self, label: Any) -> tuple[np.ndarray, np.ndarray]:
        """Log-depth per cell (the head's output space); invalid (0) depths are invalid."""
        d = np.asarray(label, dtype=np.float64)
        valid = np.isfinite(d) & (d > 0)
        return np.log(np.where(valid, d, 1.0))[..., None], valid

    # ------------------------------------------------------------------ drawing (the label grid)
    def draw_range(self, labels: Sequence[Any]) -> tuple[float, float] | None:
        """Robust range, in metres, of the valid (> 0) depths of ``labels``."""
        maps = [np.asarray(lab, dtype=np.float64) for lab in labels if lab is not None]
        return robust_range(maps, positive=True) if maps else None

    def draw(self, label: Any, image: np.ndarray, *, class_names: Sequence[str] = (),
             value_range: tuple[float, float] | None = None) -> np.ndarray:
        """Depth through reversed viridis over ``value_range`` (near = bright yellow, far = dark
        purple), resized to the image; invalid (0) pixels black."""
        d = fit_to_image(np.asarray(label, dtype=np.float64), image)
        lo, hi = value_range or robust_range([d], positive=True)
        return colour_map(d, lo, hi, "viridis_r", valid=np.isfinite(d) & (d > 0))

    def legend(self, class_names: Sequence[str] = (), value_range: tuple[float, float] | None = None) -> Legend:
        """The colour bar in metres (and black = no depth)."""
        return Legend(self.name, colormap="viridis_r", value_range=value_range or (0.0, 1.0), unit="m",
                      note="black: no depth")


def encode_depth(depth_m: np.ndarray, scale: float) -> bytes:
    """Metric depth (float, metres, 0 = invalid) -> 16-bit PNG in units of ``scale`` metres.
    Valid depths round to the nearest unit but never to 0 (which means invalid)."""
    d = np.asarray(depth_m, dtype=np.float64)
    units = np.rint(d / scale)
    valid = np.isfinite(d) & (d > 0)
    units = np.where(valid, np.clip(units, 1, 65535), 0)
    return encode_png(units.astype(np.uint16))


def decode_depth(data: bytes, scale: float) -> np.ndarray:
    """16-bit depth PNG -> float32 metres (0 = invalid)."""
    return decode_png(data, np.uint16).astype(np.float32) * np.float32(scale)
