"""What one report summarises: the steps since the previous report, accumulated on the device."""
from __future__ import annotations

import time
from typing import Sequence

import torch


class ReportWindow:
    """Per-task loss sums and labelled-step counts, the total loss and the time spent waiting for
    data since the last :meth:`reset`. Losses stay on the device (no host sync until a report)."""

    def __init__(self, tasks: Sequence[str], device: torch.device):
        n = len(tasks)
        self.loss = torch.zeros(n, dtype=torch.float64, device=device)
        self.n = torch.zeros(n, dtype=torch.float64)
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self.t = time.time()
        self.steps = 0
        self.wait = 0.0
        for tensor in (self.loss, self.n, self.total):
            tensor.zero_()

    @torch.no_grad()
    def add(self, total: torch.Tensor, losses: Sequence[torch.Tensor], local: torch.Tensor) -> None:
        """One step: its total loss and per-task losses; ``local[t]`` = 1 where this rank's batch
        labelled task ``t`` (a task's mean is over the steps that had its labels)."""
        self.total += total.detach().double()
        self.loss += torch.stack([loss.detach().double() for loss in losses]) * local.to(self.loss.device)
        self.n += local
        self.steps += 1

    def stats(self) -> torch.Tensor:
        """``[loss sums (T), labelled steps (T), total, data wait]`` as one CPU float64 vector (to all-reduce)."""
        return torch.cat([self.loss.cpu(), self.n, self.total.cpu().view(1),
                          torch.tensor([self.wait], dtype=torch.float64)])
