"""Building blocks shared by the task modules (not a task itself: the registry skips modules whose
name starts with ``_``).

* cell helpers: :func:`as_bytes`, :func:`as_array` accept table cells the way pyarrow / Ray Data
  hand them over (Python lists, numpy arrays, pyarrow scalars, bytes-likes);
* head blocks: :class:`ConvBNReLU`, :class:`FeatureFuser` (all pyramid levels fused onto one
  level) and :class:`DenseHead` (fused trunk -> per-pixel outputs at the input resolution);
* masking helpers: :func:`select_rows` and :func:`masked_pixel_mean`, which give rows without a
  label exactly zero loss *and* exactly zero gradient (they are indexed away, never multiplied
  by zero, so a non-finite output in an unlabelled row cannot leak a NaN into the gradient);
* :class:`DenseTask`, the common base of segmentation, depth and normals (per-pixel labels):
  augmentation, head, targets, masked loss and prediction resizing live here once.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from must_ray.tasks.base import Crop, Task, resize_nearest, zero_loss

# ----------------------------------------------------------------------------- cells


def as_bytes(cell: Any) -> bytes:
    """A binary cell as ``bytes`` (it may arrive as bytes, bytearray, memoryview, numpy bytes or a
    pyarrow scalar)."""
    if hasattr(cell, "as_py"):
        cell = cell.as_py()
    if isinstance(cell, bytes):
        return cell
    if isinstance(cell, np.ndarray):
        return cell.tobytes()
    return bytes(cell)


def as_array(cell: Any, dtype: Any) -> np.ndarray:
    """A list cell (Python list, numpy array, pyarrow scalar or ``None``) as a 1-D numpy array of
    ``dtype``; ``None`` reads as empty."""
    if cell is None:
        return np.zeros((0,), dtype=dtype)
    if hasattr(cell, "as_py"):
        cell = cell.as_py()
        if cell is None:
            return np.zeros((0,), dtype=dtype)
    return np.asarray(cell, dtype=dtype).reshape(-1)


def is_null(cell: Any) -> bool:
    """True for a null cell (``None``, a null pyarrow scalar or a float NaN that pandas uses)."""
    if cell is None:
        return True
    if hasattr(cell, "is_valid"):
        return not cell.is_valid
    return isinstance(cell, float) and np.isnan(cell)


# ----------------------------------------------------------------------------- head blocks


class ConvBNReLU(nn.Sequential):
    """3x3 (or ``k`` x ``k``) convolution, batch norm, ReLU: the unit every dense head is made of."""

    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def pick_level(strides: Sequence[int], min_stride: int) -> int:
    """Index of the finest pyramid level whose stride is >= ``min_stride`` (the coarsest level if
    none is). Heads work at stride 4 when the pyramid has it: fine enough for small objects at
    64x64 inputs, 4x cheaper than stride 2."""
    for i, s in enumerate(strides):
        if s >= min_stride:
            return i
    return len(strides) - 1


class FeatureFuser(nn.Module):
    """Fuse every pyramid level onto level ``level``: a 1x1 lateral conv per level to ``width``
    channels, coarser levels upsampled bilinearly, finer ones average-pooled, all summed, then one
    3x3 conv-bn-relu. Works for FPN pyramids (equal channels) and bare timm feature maps alike."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], width: int, level: int):
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"channels {list(channels)} and strides {list(strides)} must be non-empty and equal length")
        self.level = level
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.out = ConvBNReLU(width, width)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[self.level].shape[-2:]
        fused = None
        for lat, f in zip(self.lateral, feats):
            x = lat(f)
            if x.shape[-2:] != size:
                if x.shape[-2] < size[0]:
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                else:
                    x = F.adaptive_avg_pool2d(x, size)
            fused = x if fused is None else fused + x
        return self.out(fused)


class DenseHead(nn.Module):
    """Per-pixel head: :class:`FeatureFuser` at stride ``min_stride`` (or the nearest level), one
    more conv-bn-relu, a 1x1 conv to ``out_channels``, bilinear upsampling to the input size
    (finest stride x finest map size). ``normalize`` L2-normalises the channels (surface normals).
    ``bias_init`` sets the initial constant output (e.g. a typical log-depth)."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], out_channels: int, width: int = 64,
                 min_stride: int = 4, normalize: bool = False, bias_init: float = 0.0):
        super().__init__()
        self.stride0 = int(strides[0])
        self.fuse = FeatureFuser(channels, strides, width, pick_level(strides, min_stride))
        self.conv = ConvBNReLU(width, width)
        self.pred = nn.Conv2d(width, out_channels, 1)
        nn.init.constant_(self.pred.bias, bias_init)
        self.normalize = normalize

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.pred(self.conv(self.fuse(feats)))
        h, w = feats[0].shape[-2:]
        size = (h * self.stride0, w * self.stride0)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if self.normalize:
            x = F.normalize(x, dim=1, eps=1e-6)
        return x


def resize_map(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly resize a (B, C, H, W) map to ``size`` (no-op when it already has it)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- masking


def select_rows(outputs: Any, mask: torch.Tensor) -> Any:
    """The rows of ``outputs`` (a tensor or dict of tensors) where ``mask`` is True. Indexing keeps
    the graph connected to the whole tensor but the dropped rows get exactly zero gradient."""
    if isinstance(outputs, dict):
        return {k: select_rows(v, mask) for k, v in outputs.items()}
    return outputs[mask.to(outputs.device)]


def masked_pixel_mean(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over rows of each row's mean over its valid pixels. ``per_pixel`` and ``valid`` are
    (N, H, W) for the N labelled rows; a labelled row without valid pixels contributes 0.
    Invalid pixels are removed with ``where`` (not multiplied by 0), so they cannot inject NaNs."""
    zero = per_pixel.new_zeros(())
    per_pixel = torch.where(valid, per_pixel, zero)
    counts = valid.flatten(1).sum(1).clamp(min=1).to(per_pixel.dtype)
    return (per_pixel.flatten(1).sum(1) / counts).mean()


def label_rows(labels: Sequence[Any]) -> torch.Tensor:
    """The ``mask`` (B,) bool of a batch of labels: True where a label is present."""
    return torch.tensor([lab is not None for lab in labels], dtype=torch.bool)


# ----------------------------------------------------------------------------- dense tasks


class DenseTask(Task):
    """Shared machinery of per-pixel tasks. Subclasses set the class attributes and implement
    :meth:`pixel_loss` and :meth:`postprocess` (plus codecs and metrics)."""

    dense = True
    #: channels the head predicts
    out_channels: int = 1
    #: key of the dense target tensor in :meth:`targets`
    target_key: str = "target"
    #: numpy dtype of the label map and the fill value of rows without a label / invalid pixels
    label_dtype: Any = np.float32
    fill_value: float = 0.0
    #: trailing channel axis of a label map (0: (H, W); 3: (H, W, 3))
    label_channels: int = 0
    #: head width (channels of the fused trunk) and whether it L2-normalises its channels
    head_width: int = 64
    normalize_head: bool = False

    # ---------------------------------------------------------------- augmentation
    def flip_label(self, arr: np.ndarray) -> np.ndarray:
        """Value change a left-right mirror implies (normals negate x); identity by default."""
        return arr

    def augment(self, label: Any, crop: Crop, out_size: tuple[int, int]) -> Any:
        """Nearest-neighbour window-resize-flip with :func:`base.resize_nearest` (the same sampling
        the image loader uses), plus :meth:`flip_label` on flips."""
        if label is None:
            return None
        out = resize_nearest(np.asarray(label), crop, out_size)
        if crop.flip:
            out = self.flip_label(out)
        return np.ascontiguousarray(out)

    # ---------------------------------------------------------------- model side
    def head_bias_init(self) -> float:
        """Initial constant output of the head's last layer."""
        return 0.0

    def build_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        return DenseHead(channels, strides, self.out_channels, width=self.head_width,
                         normalize=self.normalize_head, bias_init=self.head_bias_init())

    def targets(self, labels: Sequence[Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Stack the label maps (expected at ``image_size``; others are nearest-resized) into one
        tensor; rows without a label are filled with :attr:`fill_value` and masked out."""
        h, w = int(image_size[0]), int(image_size[1])
        maps = []
        for lab in labels:
            if lab is None:
                shape = (h, w, self.label_channels) if self.label_channels else (h, w)
                maps.append(np.full(shape, self.fill_value, dtype=self.label_dtype))
                continue
            arr = np.asarray(lab)
            if arr.shape[:2] != (h, w):
                arr = resize_nearest(arr, Crop(), (h, w))
            maps.append(arr.astype(self.label_dtype, copy=False))
        stacked = torch.from_numpy(np.stack(maps)) if maps else torch.zeros((0, h, w))
        return {self.target_key: stacked, "mask": label_rows(labels)}

    def pixel_loss(self, outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel loss (N, H, W) and validity (N, H, W) bool for the N labelled rows."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over labelled rows of the per-row mean :meth:`pixel_loss` over valid pixels;
        unlabelled rows are indexed away (zero loss, zero gradient)."""
        mask = targets["mask"].to(outputs.device)
        if not bool(mask.any()):
            return zero_loss(outputs)
        target = targets[self.target_key].to(outputs.device)[mask]
        out = resize_map(outputs[mask].float(), target.shape[-2:])  # losses in fp32 (AMP-safe)
        per_pixel, valid = self.pixel_loss(out, target)
        return masked_pixel_mean(per_pixel, valid)

    def postprocess(self, outputs: torch.Tensor) -> list[Any]:
        """Head outputs already at image size (B, C, H, W) -> one numpy label per row."""
        raise NotImplementedError

    def predict(self, outputs: torch.Tensor, image_size: tuple[int, int]) -> list[Any]:
        """Resize the raw outputs to ``image_size`` (bilinear, before any argmax/normalisation) and
        post-process them on the CPU into numpy labels."""
        with torch.no_grad():
            return self.postprocess(resize_map(outputs.detach().float(), image_size).cpu())

    # ---------------------------------------------------------------- evaluation helpers
    @staticmethod
    def pairs(preds: Sequence[Any], gts: Sequence[Any]) -> Iterator[tuple[Optional[np.ndarray], np.ndarray]]:
        """(pred, gt) numpy pairs for rows with ground truth; a prediction of another size is
        nearest-resized to the ground truth's, a missing one stays ``None``."""
        if len(preds) != len(gts):
            raise ValueError(f"{len(preds)} predictions for {len(gts)} ground truths")
        for p, g in zip(preds, gts):
            if g is None:
                continue
            g = np.asarray(g)
            if p is not None:
                p = np.asarray(p)
                if p.shape[:2] != g.shape[:2]:
                    p = resize_nearest(p, Crop(), g.shape[:2])
            yield p, g
