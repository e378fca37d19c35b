"""Fault injection for the training tests: a step hook (``train(..., step_hooks=[...])``) that kills
a Ray Train worker mid-run, so the tests see a real restart from the last checkpoint.

Ray Train workers unpickle the hook; they cannot be relied on to import ``tests.*``, so the
module is pickled by value (:func:`ray.cloudpickle.register_pickle_by_value`, done by
:func:`shippable`)."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field


def _two_controller_polls() -> float:
    """Ray Train collects what workers reported when its controller polls them (every
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` when the driver's environment sets it, else the run's
    ``scaling.poll_interval_s``, 1 s by default; 2 s is assumed, the longer): a worker that waits
    two polls before dying has its last report (and checkpoint) registered, so the restart point
    is deterministic."""
    return 2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")) + 0.5


@dataclass
class ExitAfterStep:
    """The worker of rank ``rank`` calls ``os._exit(1)`` right after step ``step`` (after that
    step's report), once: it first creates ``marker`` and does nothing when the marker exists,
    so the restarted group completes."""

    step: int
    marker: str
    rank: int = 0
    delay_s: float = field(default_factory=_two_controller_polls)

    def __call__(self, trainer) -> None:
        if trainer.step != self.step or trainer.rank != self.rank or os.path.exists(self.marker):
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.marker)), exist_ok=True)
        with open(self.marker, "w") as f:
            f.write(f"worker rank {trainer.rank} killed itself after step {trainer.step} (pid {os.getpid()})\n")
        sys.stderr.write(f"[tests.faults] rank {trainer.rank} exits after step {trainer.step}\n")
        sys.stderr.flush()
        time.sleep(self.delay_s)
        os._exit(1)


def shippable() -> None:
    """Let Ray pickle this module's hooks by value (workers need not import ``tests``)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
