"""How the per-task losses of a step add up to the one loss that is back-propagated."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class TaskWeighting(nn.Module):
    """Per-task loss weights. ``fixed``: ``sum_t w_t L_t`` with ``w_t = <role>.loss.weights[t]``
    (default ``tasks.<t>.loss_weight``).
    ``uncertainty`` (Kendall, Gal & Cipolla 2018): a learned log-variance ``s_t`` per task,
    ``sum_t w_t (exp(-s_t) L_t + s_t)``. One scalar parameter per task, so a task absent from a
    step can have its gradient set to ``None`` and is skipped by the optimiser."""

    def __init__(self, tasks: Sequence[str], weights: dict[str, float], mode: str = "fixed"):
        super().__init__()
        self.mode = mode
        self.tasks = list(tasks)
        self.fixed = {t: float(weights.get(t, 1.0)) for t in tasks}
        self.log_vars = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(())) for t in tasks} if mode == "uncertainty" else {})

    def forward(self, losses: dict[str, torch.Tensor], present: dict[str, bool]) -> torch.Tensor:
        total = None
        for t in self.tasks:
            loss = losses[t]
            if self.mode == "uncertainty":
                s = self.log_vars[t]
                term = (torch.exp(-s) * loss + s) if present[t] else loss + s * 0.0
            else:
                term = loss
            term = self.fixed[t] * term
            total = term if total is None else total + term
        return total

    def effective(self) -> dict[str, float]:
        """The multiplier each task's loss currently gets."""
        if self.mode == "uncertainty":
            return {t: self.fixed[t] * float(torch.exp(-self.log_vars[t].detach())) for t in self.tasks}
        return dict(self.fixed)
