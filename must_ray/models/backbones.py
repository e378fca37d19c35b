"""Backbone names: a timm model name, or a preset (a timm architecture with changed arguments).

Presets exist for the families whose stock configurations do not fit our small images: a plain
ViT (``vit_tiny_patch16_224``) at 64 px would see a 4x4 grid of 16-pixel patches and refuse any
other input size, so ``vit_tiny_p8`` is the same architecture with 8-pixel patches, 64-pixel
position embeddings and ``dynamic_img_size`` (any input size). A preset exports as its timm
architecture plus these arguments (``model_args`` of a Hugging Face timm folder), so users load
it with stock timm.
"""
from __future__ import annotations

from typing import Any, Sequence

#: name -> (timm architecture, the arguments that differ from timm's defaults)
BACKBONE_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_tiny_p8": ("vit_tiny_patch16_224", {"patch_size": 8, "img_size": 64, "dynamic_img_size": True}),
    "vit_small_p8": ("vit_small_patch16_224", {"patch_size": 8, "img_size": 64, "dynamic_img_size": True}),
    "test_vit_p8": ("test_vit", {"patch_size": 8, "img_size": 64, "dynamic_img_size": True}),
}

#: most pyramid levels taken from a run of levels at one stride (the blocks of a plain ViT)
MAX_LEVELS_PER_STRIDE = 4


def timm_architecture(name: str) -> tuple[str, dict[str, Any]]:
    """``(timm architecture, model arguments)`` that backbone ``name`` is built from: a preset's
    pair, or ``(name, {})`` for a plain timm model name."""
    arch, args = BACKBONE_PRESETS.get(name, (name, {}))
    return arch, dict(args)


def feature_indices(strides: Sequence[int], min_stride: int) -> tuple[int, ...]:
    """Which of a features_only model's levels feed the FPN: every level at stride >=
    ``min_stride`` (the coarsest one if none is); of a run of levels at one stride (a ViT's
    blocks) at most :data:`MAX_LEVELS_PER_STRIDE`, evenly spaced and always including the run's
    last, so the network keeps every block it has (nothing is pruned from what is exported)."""
    kept = [i for i, s in enumerate(strides) if s >= min_stride] or [len(strides) - 1]
    runs: dict[int, list[int]] = {}
    for i in kept:
        runs.setdefault(int(strides[i]), []).append(i)
    out = []
    for run in runs.values():
        n, k = len(run), min(len(run), MAX_LEVELS_PER_STRIDE)
        out.extend(run[(j + 1) * n // k - 1] for j in range(k))
    return tuple(sorted(out))


__all__ = ["BACKBONE_PRESETS", "MAX_LEVELS_PER_STRIDE", "timm_architecture", "feature_indices"]
