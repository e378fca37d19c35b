"""``backbone``: a bare backbone labels ``features`` (feature distillation, RADIO / Theia). No task
head produces a feature map, so this kind runs the backbone alone: a must-ray model file's
(``path``: a trained teacher, a student) or a timm backbone by ``model_name`` (weights from a
``path`` file through timm's ``pretrained_cfg_overlay``, or the hub with ``pretrained: true``).
The level nearest ``tasks.features.stride`` becomes the label through ``FeaturesTask.teacher_labels``."""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import torch

from must_ray.config import Config, TeacherConfig
from must_ray.label.teachers.base import Teacher, TeacherSpec, register_teacher_kind
from must_ray.label.teachers.kinds._off_the_shelf import OffTheShelfKind
from must_ray.label.teachers.kinds.checkpoint import model_header
from must_ray.label.teachers.pixels import normalise, resample
from must_ray.label.teachers.weights import WeightsFiles, materialised
from must_ray.models import load_model
from must_ray.models.export import ModelFileError
from must_ray.models.multitask import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from must_ray.tasks import Task, build_task
from must_ray.typed_config import ConfigError


def nearest_level(reductions: Sequence[int], stride: int) -> int:
    """Index of the pyramid level whose reduction is nearest ``stride`` on a log scale (the
    coarser of two equally near)."""
    return min(range(len(reductions)), key=lambda i: (abs(math.log2(reductions[i] / stride)), -reductions[i]))


class BackboneTeacher(Teacher):
    """A features_only backbone -> ``features`` labels of its level nearest the task's stride."""

    def __init__(self, name: str, backbone: torch.nn.Module, task: Task, mean: Sequence[float],
                 std: Sequence[float], input_size: Optional[int]):
        self.name, self.task = name, task
        self.tasks = [task.name]
        self.backbone = backbone.to(memory_format=torch.channels_last)
        self.level = nearest_level(list(backbone.feature_info.reduction()), int(task.cfg.stride))
        self.mean, self.std, self.input_size = mean, std, input_size

    def predict(self, images: torch.Tensor) -> dict[str, list[Any]]:
        size = tuple(images.shape[1:3])
        x = resample(normalise(images, self.mean, self.std), self.input_size)
        feats = self.forward(self.backbone, x.contiguous(memory_format=torch.channels_last), images.device)
        return {self.task.name: self.task.teacher_labels(feats[self.level], size)}


@register_teacher_kind
class BackboneKind(OffTheShelfKind):
    """``backbone``: a bare backbone labels ``features`` (the module docstring says where it comes from)."""

    name = "backbone"
    labels = ("features",)
    provenance_keys = ("input_size", "pretrained")

    def check(self, cfg: Config, task: str, tcfg: TeacherConfig, files: WeightsFiles) -> None:
        if tcfg.path and not files.exists(tcfg.path):
            raise ConfigError(f"label.teachers.{task}: backbone weights file not found: {tcfg.path}")
        if tcfg.path and not tcfg.model_name:
            try:
                files.parsed(tcfg.path, model_header)
            except ModelFileError as exc:
                raise ModelFileError(f"label.teachers.{task}: {tcfg.path} {exc}; a timm weights file needs "
                                     f"label.teachers.{task}.model_name") from None

    def teacher_name(self, tcfg: TeacherConfig) -> str:
        """``backbone:<model_name>``, or ``backbone:<folder of the model file>`` (e.g. the teacher's task)."""
        return f"{self.name}:{tcfg.model_name or os.path.basename(os.path.dirname(os.path.abspath(tcfg.path)))}"

    def build(self, spec: TeacherSpec, cfg: Config, classes: Sequence[str], image_size: int,
              device: str | torch.device) -> Teacher:
        task = build_task(spec.tasks[0], len(classes), cfg.tasks.get(spec.tasks[0]))
        suffix = os.path.splitext(spec.path or "")[1] or ".pt"
        with materialised(spec.blob, suffix) as path:
            if spec.model_name:  # timm's own preprocessing for its weights
                backbone = build_backbone(spec.model_name, pretrained=bool(spec.cfg.get("pretrained")),
                                          weights_path=path)
                pcfg = getattr(backbone, "pretrained_cfg", None) or {}
                mean, std = pcfg.get("mean", IMAGENET_MEAN), pcfg.get("std", IMAGENET_STD)
            else:  # a must-ray model: the preprocessing it was trained with (images_to_tensor)
                backbone = load_model(path or spec.path, map_location="cpu")[0].backbone
                mean, std = IMAGENET_MEAN, IMAGENET_STD
        return BackboneTeacher(spec.name, backbone.to(device).eval(), task, mean, std, spec.cfg.get("input_size"))


__all__ = ["BackboneKind", "BackboneTeacher", "nearest_level"]
