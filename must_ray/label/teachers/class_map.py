"""``label.teachers.<task>.class_map``: an off-the-shelf model's classes -> our class ids.

Keys are the model's class ids written as text (``"3"``) or class names its library knows offline
(case-insensitive); unmapped model classes map to -1 and each adapter decides what that means
(dropped, background, lost mass).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def model_class(key: str, names: Sequence[str], num_model: int, what: str) -> int:
    """A ``class_map`` key -> the model's class id: an id written as text or a known class name."""
    text = str(key).strip()
    if text.lstrip("-").isdigit():
        idx = int(text)
    else:
        lower = {n.lower(): i for i, n in enumerate(names)}
        if text.lower() not in lower:
            hint = f" (known names: {', '.join(list(names)[:12])} ...)" if names else " (no class names known for this model)"
            raise ValueError(f"{what}: class_map key {key!r} is neither a class id nor a known class name{hint}")
        idx = lower[text.lower()]
    if not 0 <= idx < num_model:
        raise ValueError(f"{what}: class_map key {key!r} is model class {idx}, outside [0, {num_model})")
    return idx


def class_lut(class_map: dict[str, int], names: Sequence[str], num_model: int, num_ours: int, what: str,
              identity_offset: int = 0) -> np.ndarray:
    """A lookup table ``model class -> our class id`` (-1 = unmapped). An empty ``class_map`` is the
    identity shifted by ``identity_offset`` (``k -> k - offset``; torchvision's class 0 is background)."""
    lut = np.full(num_model, -1, dtype=np.int64)
    if not class_map:
        for k in range(num_model):
            if 0 <= k - identity_offset < num_ours:
                lut[k] = k - identity_offset
        return lut
    for key, ours in class_map.items():
        if not 0 <= ours < num_ours:
            raise ValueError(f"{what}: class_map.{key} -> {ours}, but the vocabulary has {num_ours} classes")
        lut[model_class(key, names, num_model, what)] = ours
    return lut


def mass_matrix(lut: np.ndarray, num_ours: int, unmapped_to: int = -1, shift: int = 0) -> torch.Tensor:
    """A ``(model classes, num_ours)`` 0/1 tensor summing model probabilities into ours: model
    class ``k`` adds to our column ``lut[k] + shift``; unmapped classes add to ``unmapped_to``
    (-1: nowhere, their mass is lost)."""
    m = torch.zeros(len(lut), num_ours)
    for k, ours in enumerate(lut):
        col = ours + shift if ours >= 0 else unmapped_to
        if col >= 0:
            m[k, col] = 1.0
    return m


__all__ = ["model_class", "class_lut", "mass_matrix"]
