"""``MultiTaskModel``: any timm backbone, an FPN neck, and one head per task from the registry.

A teacher is the same class with one task; the student has all of them. Heads receive the FPN
pyramid (equal channels, strides finest first), so every task head is written once against
``Task.build_head(channels, strides)`` and works with any backbone.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from must_ray.models.backbones import feature_indices, timm_architecture
from must_ray.tasks import Task


def build_backbone(name: str, pretrained: bool = False, weights_path: Optional[str] = None,
                   min_stride: int = 4, in_chans: int = 3) -> nn.Module:
    """A timm ``features_only`` backbone returning maps at strides >= ``min_stride``.

    ``name``: a timm model name or a preset (:data:`must_ray.models.backbones.BACKBONE_PRESETS`,
    e.g. ``vit_tiny_p8``). ``weights_path``: a local timm/PyTorch state-dict file
    (``.pth``/``.safetensors``), loaded through timm's ``pretrained_cfg_overlay`` so the same
    code path as hub weights is used; with ``pretrained=True`` and no path, timm fetches the hub
    weights (needs internet)."""
    arch, args = timm_architecture(name)
    if weights_path:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"backbone weights file not found: {weights_path}")
        pretrained = True
        args["pretrained_cfg_overlay"] = dict(file=weights_path)
    probe = timm.create_model(arch, features_only=True, pretrained=False, in_chans=in_chans,
                              **{k: v for k, v in args.items() if k != "pretrained_cfg_overlay"})
    strides = [level["reduction"] for level in probe.feature_info.info]  # every level, not only the default ones
    out_indices = feature_indices(strides, min_stride)
    if not pretrained and tuple(probe.feature_info.out_indices) == out_indices:
        return probe
    return timm.create_model(arch, features_only=True, pretrained=pretrained, in_chans=in_chans,
                             out_indices=out_indices, **args)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images_to_tensor(images, device: str | torch.device = "cpu", channels_last: bool = False) -> torch.Tensor:
    """uint8 RGB images (B, H, W, 3) as numpy or tensor -> normalised float (B, 3, H, W): the one
    preprocessing used by training, labelling and evaluation, so they always agree."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {tuple(x.shape)}")
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


class FPN(nn.Module):
    """Feature pyramid network (Lin et al. 2017): lateral 1x1 convs, top-down upsampling and a
    3x3 smoothing conv per level, so every level has ``channels`` channels."""

    def __init__(self, in_channels: Sequence[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
            for _ in in_channels
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [lat(f) for lat, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        return [s(x) for s, x in zip(self.smooth, laterals)]


class MultiTaskModel(nn.Module):
    """Shared backbone + FPN + ``heads[task]``; ``forward`` returns ``{task: raw outputs}``."""

    def __init__(self, backbone: str, tasks: Mapping[str, Task], fpn_channels: int = 64,
                 pretrained: bool = False, weights_path: Optional[str] = None, min_stride: int = 4):
        super().__init__()
        if not tasks:
            raise ValueError("MultiTaskModel needs at least one task")
        self.backbone_name = backbone
        self.task_names = list(tasks)
        self.backbone = build_backbone(backbone, pretrained=pretrained, weights_path=weights_path, min_stride=min_stride)
        in_channels = self.backbone.feature_info.channels()
        self.strides = list(self.backbone.feature_info.reduction())
        self.neck = FPN(in_channels, fpn_channels)
        channels = [fpn_channels] * len(in_channels)
        self.heads = nn.ModuleDict({name: task.build_head(channels, self.strides) for name, task in tasks.items()})

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The FPN pyramid for a batch of normalised images (B, 3, H, W)."""
        return self.neck(self.backbone(images))

    def forward(self, images: torch.Tensor, tasks: Optional[Sequence[str]] = None) -> dict:
        feats = self.features(images)
        names = self.task_names if tasks is None else tasks
        return {name: self.heads[name](feats) for name in names}
