"""The training checkpoint: what a checkpoint directory holds and how it is read back.

A directory ``checkpoint_step<step>_a<attempt>[_final]`` holds ``state.pt`` (tensors and
primitives only, loaded with ``weights_only=True``), ``meta.json`` (the bookkeeping without
tensors, which the driver reads before resuming), ``metrics.jsonl`` (the report history so far)
and, in the final one, the exported ``model.pt`` (docs/training.md)."""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional, Sequence

import torch

from must_ray.io import HISTORY_FILE

CHECKPOINT_FORMAT = "must-ray-train-checkpoint/1"
STATE_FILE = "state.pt"
META_FILE = "meta.json"


def checkpoint_dir_name(step: int, attempt: int, final: bool) -> str:
    """The directory name Ray Train gives the checkpoint of ``step`` in worker-group start ``attempt``."""
    return f"checkpoint_step{step:08d}_a{attempt}{'_final' if final else ''}"


def read_history(directory: str) -> list[dict]:
    """The report history stored in a checkpoint directory ([] when it has none)."""
    path = os.path.join(directory, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_history(path: str, history: Sequence[dict]) -> None:
    """``history`` as JSON lines (one report per line)."""
    with open(path, "w") as f:
        for m in history:
            f.write(json.dumps(m) + "\n")


def write_checkpoint(directory: str, state: dict[str, Any], meta: dict[str, Any], history: Sequence[dict]) -> None:
    """Write ``state.pt``, ``meta.json`` and ``metrics.jsonl`` into ``directory``."""
    torch.save(state, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f)
    write_history(os.path.join(directory, HISTORY_FILE), history)


def read_checkpoint(checkpoint) -> tuple[dict[str, Any], list[dict]]:
    """``(state, history)`` of a ``ray.train.Checkpoint`` written by :func:`write_checkpoint`;
    refuses anything that is not a must-ray training checkpoint."""
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        history = read_history(d)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"checkpoint {checkpoint.path} is not a must-ray training checkpoint")
    return state, history


def latest_checkpoint_meta(experiment_dir: str) -> Optional[dict]:
    """The ``meta.json`` of the newest checkpoint under a (local) run directory, if any."""
    best = None
    for path in glob.glob(os.path.join(experiment_dir, "checkpoint_*", META_FILE)):
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if best is None or meta.get("step", -1) > best.get("step", -1):
            best = meta
    return best
