"""One training step, shared by the Ray Train worker (:mod:`must_ray.train.trainer`) and the
benchmarks' plain PyTorch loop, so both train exactly the same model the same way."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import torch
from timm.utils import ModelEmaV3
from torch import nn

from must_ray.config import Config, TrainConfig
from must_ray.models import MultiTaskModel, images_to_tensor
from must_ray.models.precision import to_float32
from must_ray.tasks import build_tasks
from must_ray.train.weighting import TaskWeighting


class TrainModule(nn.Module):
    """What DDP wraps: the model and the task weighting (so learned weights are synchronised)."""

    def __init__(self, model: nn.Module, weighting: TaskWeighting):
        super().__init__()
        self.model = model
        self.weighting = weighting

    def forward(self, images: torch.Tensor) -> dict:
        return self.model(images)


def build_module(cfg: Config, tcfg: TrainConfig, task_names: Sequence[str],
                 num_classes: int) -> tuple[dict, TrainModule]:
    """``(tasks, TrainModule)`` of a run: ``MultiTaskModel`` (backbone, FPN, one head per task) and
    the task weighting (``tcfg.loss``)."""
    tasks = build_tasks(list(task_names), num_classes, cfg.tasks)
    mcfg = tcfg.model
    model = MultiTaskModel(mcfg.backbone, tasks, fpn_channels=mcfg.fpn_channels, pretrained=mcfg.pretrained,
                           weights_path=mcfg.backbone_weights)
    weights = {t: tcfg.loss.weights.get(t, cfg.tasks[t].loss_weight if t in cfg.tasks else 1.0) for t in task_names}
    weighting = TaskWeighting(task_names, weights, tcfg.loss.weighting, tcfg.loss.teacher_drop_p, tcfg.seed)
    return tasks, TrainModule(model, weighting)


def train_step(raw: TrainModule, wrapped: nn.Module, tasks: dict, images_u8: torch.Tensor, targets: dict,
               present: dict[str, bool], optimizer, scheduler, *, grad_clip: float = 0.0,
               ema: Optional[ModelEmaV3] = None, step: int = 0, channels_last: bool = False,
               autocast: Optional[Callable] = None) -> tuple[torch.Tensor, dict]:
    """One optimiser step on a collated batch: forward (``wrapped``: DDP or the module itself), masked
    per-task losses (after teacher dropping when ``loss.teacher_drop_p`` > 0), weighting, backward,
    absent tasks' gradients dropped (AdamW skips them),
    clipping, optimiser + scheduler step, EMA. ``present[t]``: the *global* batch has a label for
    ``t`` (absent heads run in eval mode); ``step``: this step's 0-based index. Returns
    ``(total loss, {task: loss})``."""
    task_names = list(tasks)
    for t in task_names:  # absent heads: eval mode, so their BatchNorm statistics stay put
        raw.model.heads[t].train(present[t])
    device = next(raw.parameters()).device
    images = images_to_tensor(images_u8, device=device, channels_last=channels_last)
    with (autocast() if autocast is not None else nullcontext()):
        outputs = wrapped(images)
    if autocast is not None:
        outputs = to_float32(outputs)  # the losses in fp32 after a bf16 forward
    if raw.weighting.drop_p > 0:
        targets = {**targets, **raw.weighting.drop_tasks(tasks, outputs, targets, step)}
    losses = {t: tasks[t].loss(outputs[t], targets[t]) for t in task_names}
    total = raw.weighting(losses, present)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    for t in task_names:
        if not present[t]:
            for p in raw.model.heads[t].parameters():
                p.grad = None
            if t in raw.weighting.log_vars:
                raw.weighting.log_vars[t].grad = None
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in raw.parameters() if p.grad is not None], grad_clip)
    optimizer.step()
    scheduler.step()
    if ema is not None:
        ema.update(raw.model, step=step + 1)
    return total, losses
