"""How the per-task losses of a step add up to the one loss that is back-propagated."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


class TaskWeighting(nn.Module):
    """Per-task loss weights. ``fixed``: ``sum_t w_t L_t`` with ``w_t = <role>.loss.weights[t]``
    (default ``tasks.<t>.loss_weight``).
    ``uncertainty`` (Kendall, Gal & Cipolla 2018): a learned log-variance ``s_t`` per task,
    ``sum_t w_t (exp(-s_t) L_t + s_t)``. One scalar parameter per task, so a task absent from a
    step can have its gradient set to ``None`` and is skipped by the optimiser.
    ``drop_p`` > 0 adds teacher dropping (UNIC, Sariyildiz et al. 2024) to either mode: see
    :meth:`drop_tasks`."""

    def __init__(self, tasks: Sequence[str], weights: dict[str, float], mode: str = "fixed",
                 drop_p: float = 0.0, seed: int = 0):
        super().__init__()
        self.mode = mode
        self.drop_p = float(drop_p)
        self.seed = int(seed)
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

    def drop_tasks(self, tasks: dict[str, Any], outputs: dict[str, Any], targets: dict[str, dict], step: int,
                   ) -> dict[str, dict]:
        """Teacher dropping: per image, the task whose weighted loss is highest keeps its label and
        every other task's label is dropped with probability ``drop_p`` (its ``mask`` cell set to
        False), so no image learns from one teacher alone while another is far off. Each task's
        loss stays the mean over the rows it keeps, which renormalises it. The draw depends on the
        run's seed and ``step`` only, so a resumed run drops the same labels."""
        names = [t for t in self.tasks if t in targets]
        masks = {t: targets[t]["mask"].to(torch.bool) for t in names}
        rows = int(next(iter(masks.values())).shape[0])
        weight = self.effective()
        per_image = torch.full((rows, len(names)), float("-inf"))
        with torch.no_grad():
            for j, t in enumerate(names):
                for i in torch.nonzero(masks[t]).flatten().tolist():
                    only = torch.zeros(rows, dtype=torch.bool)
                    only[i] = True
                    per_image[i, j] = weight[t] * float(tasks[t].loss(outputs[t], {**targets[t], "mask": only}))
        draw = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        keep = torch.rand((rows, len(names)), generator=draw) >= self.drop_p
        keep[torch.arange(rows), per_image.argmax(dim=1)] = True
        return {t: {**targets[t], "mask": masks[t] & keep[:, j].to(masks[t].device)} for j, t in enumerate(names)}
