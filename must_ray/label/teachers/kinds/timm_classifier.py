"""``timm``: a timm classifier by ``model_name`` labels classification. Weights from ``path``
(timm's ``pretrained_cfg_overlay`` file route) or the hub (``pretrained: true``). Adapter: tempered
softmax over the model's classes, mass summed into ours through ``class_map`` (identity when
empty), top-k."""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from must_ray.config import Config
from must_ray.label.teachers.base import Teacher, TeacherSpec, register_teacher_kind
from must_ray.label.teachers.class_map import class_lut, mass_matrix
from must_ray.label.teachers.kinds._off_the_shelf import OffTheShelfKind
from must_ray.label.teachers.pixels import normalise, resample
from must_ray.label.teachers.weights import materialised
from must_ray.models.multitask import IMAGENET_MEAN, IMAGENET_STD
from must_ray.tasks import Task, build_task
from must_ray.tasks.classification import make_label


class TimmClassifierTeacher(Teacher):
    """timm classifier -> classification labels (tempered softmax, mass mapped into our classes, top-k)."""

    def __init__(self, name: str, model: torch.nn.Module, task: Task, lut: np.ndarray,
                 mean: Sequence[float], std: Sequence[float], input_size: Optional[int]):
        self.name, self.model, self.task = name, model, task
        self.tasks = [task.name]
        self.mean, self.std, self.input_size = mean, std, input_size
        self.agg = mass_matrix(lut, task.num_classes)

    def predict(self, images: torch.Tensor) -> dict[str, list[Any]]:
        x = resample(normalise(images, self.mean, self.std), self.input_size)
        logits = self.forward(self.model, x, images.device)
        probs = F.softmax(logits / self.task.cfg.temperature, dim=1).cpu() @ self.agg  # (B, C) mapped mass
        k = min(int(self.task.cfg.topk), probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1, largest=True, sorted=True)
        return {self.task.name: [make_label(int(i[0]), i.numpy(), p.numpy()) for i, p in zip(top_i, top_p)]}


@register_teacher_kind
class TimmKind(OffTheShelfKind):
    name = "timm"
    labels = ("classification",)

    @staticmethod
    def class_names(model_name: str, num_model: int) -> list[str]:
        """ImageNet's class descriptions for a 1000-class model (known offline), else none."""
        if num_model != 1000:
            return []
        try:
            from timm.data import ImageNetInfo

            return [d.split(",")[0].strip() for d in ImageNetInfo().label_descriptions()]
        except Exception:  # noqa: BLE001 - names are a convenience only
            return []

    def build(self, spec: TeacherSpec, cfg: Config, classes: Sequence[str], image_size: int,
              device: str | torch.device) -> Teacher:
        import timm

        task_name = spec.tasks[0]
        num_ours = len(classes)
        num_model = spec.cfg.get("num_classes")
        with materialised(spec.blob, os.path.splitext(spec.path or "")[1] or ".pth") as path:
            if path:  # a weights file: a classifier over `num_classes` (default: ours)
                num_model = num_model or num_ours
                model = timm.create_model(spec.model_name, pretrained=True, num_classes=num_model,
                                          pretrained_cfg_overlay=dict(file=path, num_classes=num_model))
            else:  # hub weights: the model's own classifier unless num_classes is given
                kwargs = {"num_classes": num_model} if num_model else {}
                model = timm.create_model(spec.model_name, pretrained=bool(spec.cfg.get("pretrained")), **kwargs)
                num_model = int(model.num_classes)
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = pcfg.get("mean", IMAGENET_MEAN), pcfg.get("std", IMAGENET_STD)
        lut = class_lut(spec.cfg.get("class_map") or {}, self.class_names(spec.model_name, num_model), num_model,
                        num_ours, f"label.teachers.{task_name}")
        task = build_task(task_name, num_ours, cfg.tasks.get(task_name))
        return TimmClassifierTeacher(spec.name, model.to(device).eval(), task, lut, mean, std,
                                     spec.cfg.get("input_size"))


__all__ = ["TimmKind", "TimmClassifierTeacher"]
