"""The decoded batch (uint8 ``(B, S, S, 3)`` at the label resolution, on the device) -> a model's
input tensor: scaled, normalised and resampled to the teacher's own input side."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), ``(x / 255 - mean) / std``."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def resample(x: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """``x`` (B, C, H, W) at ``size`` x ``size`` (antialiased bilinear); unchanged when ``size`` is
    None or already the size."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


__all__ = ["normalise", "resample"]
