"""``torchvision_segmenter``: any ``torchvision.models.segmentation`` model by ``model_name``
(``deeplabv3_*``, ``lraspp_*``, ``fcn_*``) labels segmentation. Adapter: softmax, probabilities
summed into background + our categories through ``class_map`` (unmapped classes count as
background; identity when empty), argmax, pixels whose confidence is below
``confidence_threshold`` -> 255 (ignore)."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from must_ray.label.teachers.base import Teacher, register_teacher_kind
from must_ray.label.teachers.class_map import mass_matrix
from must_ray.label.teachers.kinds._torchvision import TorchvisionKind
from must_ray.label.teachers.pixels import normalise, resample
from must_ray.models.multitask import IMAGENET_MEAN, IMAGENET_STD
from must_ray.tasks import Task
from must_ray.tasks.segmentation import IGNORE


class TorchvisionSegmenterTeacher(Teacher):
    """torchvision segmenter -> segmentation labels (probabilities summed into background + our
    categories, argmax, low confidence -> 255)."""

    def __init__(self, name: str, model: torch.nn.Module, task: Task, lut: np.ndarray, input_size: Optional[int]):
        self.name, self.model, self.task = name, model, task
        self.tasks = [task.name]
        self.input_size = input_size
        # our segmentation labels: 0 background, c + 1 category c; unmapped model classes are background
        self.agg = mass_matrix(lut, task.num_classes + 1, unmapped_to=0, shift=1)

    def predict(self, images: torch.Tensor) -> dict[str, list[Any]]:
        size = tuple(images.shape[1:3])
        x = resample(normalise(images, IMAGENET_MEAN, IMAGENET_STD), self.input_size)
        logits = self.forward(self.model, x, images.device)["out"]
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        probs = torch.einsum("bkhw,kc->bchw", F.softmax(logits, dim=1), self.agg.to(logits.device)).cpu()
        conf, cls = probs.max(dim=1)
        cls = cls.to(torch.uint8)
        thr = float(self.task.cfg.confidence_threshold)
        if thr > 0:
            cls[conf < thr] = IGNORE
        return {self.task.name: [m.numpy() for m in cls]}


@register_teacher_kind
class TorchvisionSegmenterKind(TorchvisionKind):
    name = "torchvision_segmenter"
    labels = ("segmentation",)

    def model_kwargs(self, input_size: int) -> dict[str, Any]:
        return {"aux_loss": False}

    def adapter(self, name: str, model: torch.nn.Module, task: Task, lut, input_size: Optional[int]) -> Teacher:
        return TorchvisionSegmenterTeacher(name, model, task, lut, input_size)


__all__ = ["TorchvisionSegmenterKind", "TorchvisionSegmenterTeacher"]
