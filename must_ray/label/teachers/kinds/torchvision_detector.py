"""``torchvision_detector``: any ``torchvision.models.detection`` model by ``model_name``
(``fasterrcnn_*``, ``retinanet_*``, ``fcos_*``) labels detection. Adapter: model class -> ours
through ``class_map`` (identity ``k -> k - 1`` when empty, class 0 being torchvision's background),
score threshold, class-wise NMS, at most ``max_boxes``, boxes normalised."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from must_ray.label.teachers.base import Teacher, register_teacher_kind
from must_ray.label.teachers.kinds._torchvision import TorchvisionKind
from must_ray.label.teachers.pixels import resample
from must_ray.tasks import Task
from must_ray.tasks.detection import make_label


class TorchvisionDetectorTeacher(Teacher):
    """torchvision detector -> detection labels (class mapping, score threshold, class-wise NMS,
    ``max_boxes``, boxes normalised to [0, 1])."""

    def __init__(self, name: str, model: torch.nn.Module, task: Task, lut: np.ndarray, input_size: Optional[int]):
        self.name, self.model, self.task = name, model, task
        self.tasks = [task.name]
        self.lut = torch.as_tensor(lut)
        self.input_size = input_size

    def predict(self, images: torch.Tensor) -> dict[str, list[Any]]:
        from torchvision.ops import batched_nms

        x = resample(images.permute(0, 3, 1, 2).float().div_(255.0), self.input_size)
        h, w = x.shape[-2:]
        outputs = self.forward(self.model, list(x), images.device)
        cfg = self.task.cfg
        labels = []
        for out in outputs:
            boxes = out["boxes"].detach().float().cpu()
            scores = out["scores"].detach().float().cpu()
            cls = out["labels"].detach().cpu().long()
            valid = (cls >= 0) & (cls < len(self.lut))
            ours = torch.full_like(cls, -1)
            ours[valid] = self.lut[cls[valid]]
            keep = (ours >= 0) & (scores >= cfg.score_threshold)
            boxes, scores, ours = boxes[keep], scores[keep], ours[keep]
            scale = torch.tensor([w, h, w, h], dtype=boxes.dtype)
            boxes = (boxes / scale).clamp(0.0, 1.0)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, ours = boxes[keep], scores[keep], ours[keep]
            order = batched_nms(boxes, scores, ours, float(cfg.nms_iou))[: int(cfg.max_boxes)]
            labels.append(make_label(boxes[order].numpy(), ours[order].numpy(), scores[order].numpy()))
        return {self.task.name: labels}


@register_teacher_kind
class TorchvisionDetectorKind(TorchvisionKind):
    name = "torchvision_detector"
    labels = ("detection",)

    def model_kwargs(self, input_size: int) -> dict[str, Any]:
        return {"min_size": input_size, "max_size": input_size}

    def adapter(self, name: str, model: torch.nn.Module, task: Task, lut, input_size: Optional[int]) -> Teacher:
        return TorchvisionDetectorTeacher(name, model, task, lut, input_size)


__all__ = ["TorchvisionDetectorKind", "TorchvisionDetectorTeacher"]
