"""How the weights move: AdamW with a warm-up + cosine learning rate, and the EMA of the weights
that the export holds (``timm.utils.ModelEmaV3``)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from timm.utils import ModelEmaV3
from torch import nn

from must_ray.config import TrainConfig

# ModelEmaV3's warm-up ``1 - (1 + s / gamma) ** -power`` with gamma = 9, power = 1 and s = the
# number of updates (update_after_step = -1) is ``min(decay, (1 + t) / (10 + t))`` for the 0-based
# update t: the usual warm-up, bit for bit the weights of the project's former own EMA class.
EMA_WARMUP = {"use_warmup": True, "warmup_gamma": 9.0, "warmup_power": 1.0, "update_after_step": -1}


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.01) -> float:
    """Multiplier of the peak LR for optimiser step ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then cosine decay to ``floor`` at ``total``. A pure function of the step,
    so a resumed run (even with a longer ``max_steps``) continues on the right curve."""
    warmup = max(0, min(int(warmup), max(int(total) - 1, 0)))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on conv/linear weights only (not biases, norms, task weights)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.startswith("weighting.") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, tcfg: TrainConfig, total_steps: int):
    """``(AdamW, LambdaLR)`` for a ``TrainModule``: decay on conv/linear weights only, warm-up +
    cosine over ``total_steps``."""
    opt = tcfg.optimizer
    optimizer = torch.optim.AdamW(param_groups(module, opt.weight_decay), lr=opt.lr, betas=(0.9, 0.999))
    warmup = int(tcfg.schedule.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))
    return optimizer, scheduler


def build_ema(model: nn.Module, decay: float) -> Optional[ModelEmaV3]:
    """The EMA of ``model``'s state (parameters and float buffers averaged, integer buffers
    copied) with the warm-up ``min(decay, (1 + t) / (10 + t))``; ``None`` when ``decay`` is 0.
    Update it with ``ema.update(model, step=<updates so far, this one included>)``."""
    if decay <= 0:
        return None
    return ModelEmaV3(model, decay=float(decay), stochastic_rounding=False, **EMA_WARMUP)


def ema_state(ema: ModelEmaV3) -> dict[str, torch.Tensor]:
    """The EMA weights as a CPU state dict with the model's own keys (what a checkpoint holds)."""
    return {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}
