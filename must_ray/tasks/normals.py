"""Surface normal estimation.

**Label**: float32 (H, W, 3) unit vectors in the camera frame (x right, y up, z towards the
viewer); a zero vector marks an invalid pixel. A left-right flip negates x.

**Column**: ``normals_png`` binary — RGB PNG with ``rgb = round((n + 1) * 127.5)``, invalid pixels
(128, 128, 128) (:func:`schema.encode_normals`). Round trip: within 1 degree.

**Head**: :class:`~must_ray.tasks._layers.DenseHead` with three channels, L2-normalised per pixel
(so outputs are unit vectors), upsampled to the input size.

**Loss**: ``1 - cos`` between predicted and ground-truth normals over valid pixels (|n| > 0.5),
per row mean, then mean over labelled rows.

**Predict** (teacher adapter): the normalised (H, W, 3) map.

**Metric**: angular error over valid ground-truth pixels: ``mean_angle`` (degrees; primary, lower
is better), ``median_angle`` (from a 0.05-degree histogram, so the state stays small and
mergeable) and ``within_11_25`` / ``within_22_5`` / ``within_30`` (% of pixels under the angle).
A missing prediction counts as 180 degrees everywhere; a zero predicted vector as 90 degrees.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from must_ray.images import decode_png, encode_png
from must_ray.tasks import register_task
from must_ray.tasks._layers import DenseTask, as_bytes, is_null
from must_ray.tasks.base import Legend, fit_to_image

BIN_DEG = 0.05
NUM_BINS = int(round(180 / BIN_DEG))
THRESHOLDS = (11.25, 22.5, 30.0)
ZERO_NORM = 1e-6  # a vector shorter than this has no direction: 90 degrees against anything


def _within_key(t: float) -> str:
    return "within_" + f"{t:g}".replace(".", "_")


def angular_error_deg(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Angle in degrees between (..., 3) vectors, via atan2(|a x b|, a . b) — accurate for tiny
    angles too; a zero vector gives 90 degrees against anything."""
    a = pred.astype(np.float64)
    b = gt.astype(np.float64)
    norm_a = np.linalg.norm(a, axis=-1, keepdims=True)
    norm_b = np.linalg.norm(b, axis=-1, keepdims=True)
    a = a / np.maximum(norm_a, 1e-12)
    b = b / np.maximum(norm_b, 1e-12)
    cross = np.linalg.norm(np.cross(a, b), axis=-1)
    dot = (a * b).sum(-1)
    angle = np.degrees(np.arctan2(cross, dot))
    degenerate = (norm_a[..., 0] < ZERO_NORM) | (norm_b[..., 0] < ZERO_NORM)
    return np.where(degenerate, 90.0, angle)


@register_task
class NormalsTask(DenseTask):
    """Per-pixel camera-frame surface normal regression."""

    name = "normals"
    primary_metric = "mean_angle"
    metric_units = {"mean_angle": "deg", "median_angle": "deg", **{_within_key(t): "%" for t in THRESHOLDS}}
    higher_is_better = False
    probe = "pixel"
    out_channels = 3
    label_channels = 3
    target_key = "normals"
    label_dtype = np.float32
    fill_value = 0.0
    normalize_head = True

    # ------------------------------------------------------------------ table
    @classmethod
    def columns(cls) -> list[pa.Field]:
        return [pa.field("normals_png", pa.binary(), nullable=True)]

    def encode(self, label: Any) -> dict[str, Any]:
        if label is None:
            return self.null_cells()
        arr = np.asarray(label, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"normals label must be (H, W, 3), got {arr.shape}")
        return {"normals_png": encode_normals(arr)}

    def decode(self, cells: dict[str, Any]) -> Any:
        cell = cells.get("normals_png")
        if is_null(cell):
            return None
        return decode_normals(as_bytes(cell))

    # ------------------------------------------------------------------ augmentation
    def flip_label(self, arr: np.ndarray) -> np.ndarray:
        """A mirrored surface faces the mirrored way: negate x (zero vectors stay zero)."""
        out = np.array(arr, dtype=np.float32, copy=True)
        out[..., 0] *= -1.0
        out[..., 0] += 0.0  # no -0.0
        return out

    # ------------------------------------------------------------------ model side
    def targets(self, labels: Sequence[Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``normals`` (B, 3, H, W) float32 (zeros where unlabelled/invalid) + ``mask``."""
        out = super().targets(labels, image_size)
        out["normals"] = out["normals"].permute(0, 3, 1, 2).contiguous()
        return out

    def pixel_loss(self, outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = target.to(outputs.dtype)
        valid = target.norm(dim=1) > 0.5
        cos = (F.normalize(outputs, dim=1, eps=1e-6) * F.normalize(target, dim=1, eps=1e-6)).sum(dim=1)
        return 1.0 - cos, valid

    def postprocess(self, outputs: torch.Tensor) -> list[Any]:
        n = F.normalize(outputs, dim=1, eps=1e-6).permute(0, 2, 3, 1)
        return [m.numpy().astype(np.float32) for m in n]

    # ------------------------------------------------------------------ evaluation
    def metric_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"sum": 0.0, "count": 0, "hist": np.zeros(NUM_BINS, dtype=np.int64)}
        state.update({_within_key(t): 0 for t in THRESHOLDS})
        return state

    def metric_update(self, state: dict, preds: Sequence[Any], gts: Sequence[Any]) -> dict:
        state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
        for p, g in self.pairs(preds, gts):
            valid = np.linalg.norm(g.astype(np.float64), axis=-1) > 0.5
            if not valid.any():
                continue
            if p is None:
                ang = np.full(int(valid.sum()), 180.0)
            else:
                ang = angular_error_deg(p[valid], g[valid])
            state["sum"] += float(ang.sum())
            state["count"] += int(ang.size)
            bins = np.clip((ang / BIN_DEG).astype(np.int64), 0, NUM_BINS - 1)
            state["hist"] += np.bincount(bins, minlength=NUM_BINS)
            for t in THRESHOLDS:
                state[_within_key(t)] += int((ang < t).sum())
        return state

    def metric_merge(self, a: dict, b: dict) -> dict:
        return {k: a[k] + b[k] for k in a}

    def metric_compute(self, state: dict) -> dict[str, float]:
        n = state["count"]
        if not n:
            out = {"mean_angle": 180.0, "median_angle": 180.0}
            out.update({_within_key(t): 0.0 for t in THRESHOLDS})
            return out
        cum = np.cumsum(state["hist"])
        median_bin = int(np.searchsorted(cum, (n + 1) / 2.0))
        out = {"mean_angle": state["sum"] / n, "median_angle": (median_bin + 0.5) * BIN_DEG}
        out.update({_within_key(t): 100.0 * state[_within_key(t)] / n for t in THRESHOLDS})
        return out

    # ------------------------------------------------------------------ baselines
    def trivial_prediction(self, gts: Sequence[Any]) -> list[Any]:
        """The mean valid ground-truth normal (over all of ``gts``), normalised, everywhere."""
        total = np.zeros(3, dtype=np.float64)
        for g in gts:
            if g is not None:
                g = np.asarray(g, dtype=np.float64).reshape(-1, 3)
                total += g[np.linalg.norm(g, axis=-1) > 0.5].sum(axis=0)
        norm = np.linalg.norm(total)
        mean = total / norm if norm > 0 else np.array([0.0, 0.0, 1.0])
        return [None if g is None else np.broadcast_to(mean.astype(np.float32), np.asarray(g).shape[:2] + (3,)).copy()
                for g in gts]

    # ------------------------------------------------------------------ world and probe
    def world_label(self, buffers: Mapping[str, Any]) -> Any:
        """The rendered camera-frame normals."""
        return np.array(buffers["normals"], dtype=np.float32, copy=True)

    def probe_target(self, label: Any) -> tuple[np.ndarray, np.ndarray]:
        """The normal vector per cell; zero vectors are invalid."""
        n = np.asarray(label, dtype=np.float64)
        return n, np.linalg.norm(n, axis=-1) > 0.5

    # ------------------------------------------------------------------ drawing (the label grid)
    def draw(self, label: Any, image: np.ndarray, *, class_names: Sequence[str] = (),
             value_range: tuple[float, float] | None = None) -> np.ndarray:
        """Normals as RGB ``(n + 1) / 2`` (x -> red, y -> green, z -> blue), resized to the image;
        invalid (zero) vectors black."""
        n = fit_to_image(np.asarray(label, dtype=np.float64), image)
        rgb = np.clip(np.round((n + 1.0) * 127.5), 0, 255).astype(np.uint8)
        rgb[np.linalg.norm(n, axis=-1) < 0.5] = 0
        return rgb

    def legend(self, class_names: Sequence[str] = (), value_range: tuple[float, float] | None = None) -> Legend:
        """A sphere's normals drawn the same way: the key to the colours."""
        t = (np.arange(48) + 0.5) / 24 - 1.0
        x, y = np.meshgrid(t, -t)
        inside = x ** 2 + y ** 2 < 1.0
        sphere = np.stack([x, y, np.sqrt(np.clip(1.0 - x ** 2 - y ** 2, 0.0, None))], axis=-1) * inside[..., None]
        key = self.draw(sphere, np.zeros((96, 96, 3), np.uint8))
        return Legend(self.name, image=key, note="RGB = (n + 1) / 2\nx right, y up, z to camera")


def encode_normals(normals: np.ndarray) -> bytes:
    """Unit normals (H, W, 3) -> RGB PNG with ``rgb = round((n + 1) * 127.5)``.
    Invalid pixels (zero vectors) are stored as (128, 128, 128), which decodes to a near-zero
    vector and back to invalid."""
    n = np.asarray(normals, dtype=np.float32)
    valid = np.linalg.norm(n, axis=-1) > 0.5
    rgb = np.clip(np.rint((n + 1.0) * 127.5), 0, 255).astype(np.uint8)
    rgb[~valid] = 128
    return encode_png(rgb)


def decode_normals(data: bytes) -> np.ndarray:
    """RGB normals PNG -> float32 unit vectors (H, W, 3); invalid pixels are zero vectors."""
    rgb = decode_png(data, np.uint8).astype(np.float32)
    n = rgb / 127.5 - 1.0
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    valid = norm > 0.5
    return np.where(valid, n / np.maximum(norm, 1e-6), 0.0).astype(np.float32)
