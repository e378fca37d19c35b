"""The training checkpoint: what a checkpoint directory holds and how it is read back.

A directory ``checkpoint_step<step>_a<attempt>[_final]`` holds ``state.pt`` (tensors and
primitives only, loaded with ``weights_only=True``), ``meta.json`` (the bookkeeping without
tensors, which the driver reads before resuming), ``metrics.jsonl`` (the report history so far)
and, in the final one, the exported ``model.pt`` (docs/training.md)."""
from __future__ import annotations

import json
import logging
import os
import posixpath
from typing import Any, Optional, Sequence

import pyarrow.fs as pafs
import torch

from must_ray.io import HISTORY_FILE, is_uri

CHECKPOINT_FORMAT = "must-ray-train-checkpoint/1"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_"
#: Ray Train V2's record of a run's registered checkpoints, in ``<storage_path>/<run name>/``
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def checkpoint_dir_name(step: int, attempt: int, final: bool) -> str:
    """The directory name Ray Train gives the checkpoint of ``step`` in worker-group start ``attempt``."""
    return f"{CHECKPOINT_PREFIX}step{step:08d}_a{attempt}{'_final' if final else ''}"


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


def registered_checkpoints(experiment_dir: str) -> tuple[Optional[Any], set[str]]:
    """``(latest, names)``: the checkpoint Ray Train hands the run's next workers
    (``ray.train.get_checkpoint()``; None for a new run) and the directory names of every
    checkpoint it has registered, from the run's ``checkpoint_manager_snapshot.json`` (local or
    URI). A checkpoint directory outside ``names`` was written by a worker whose report Ray
    Train never collected (an orphan of a killed driver): nothing will ever resume from it."""
    import ray.train

    fs, path = _locate(experiment_dir)
    if fs.get_file_info(f"{path}/{SNAPSHOT_FILE}").type != pafs.FileType.File:
        return None, set()
    quiet = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its "a run snapshot was found" note is for Ray Train's own start
    try:
        result = ray.train.Result.from_path(experiment_dir)
    finally:
        quiet.setLevel(level)
    kept = [c for c, _ in (result.best_checkpoints or [])] + ([result.checkpoint] if result.checkpoint else [])
    return result.checkpoint, {posixpath.basename(c.path.rstrip("/")) for c in kept}


def checkpoint_meta(checkpoint) -> dict:
    """The ``meta.json`` of a ``ray.train.Checkpoint`` (read without downloading ``state.pt``)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{META_FILE}") as f:
        return json.loads(f.read().decode("utf-8"))


def remove_unregistered_checkpoints(experiment_dir: str) -> list[str]:
    """Delete the run's checkpoint directories that Ray Train never registered (so
    ``num_to_keep`` never deletes them, and a reader of the newest directory is never misled);
    returns their names. Call it only while no worker of the run is writing (before or after
    ``fit``)."""
    fs, path = _locate(experiment_dir)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    _, names = registered_checkpoints(experiment_dir)
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX) \
                and info.base_name not in names:
            fs.delete_dir(info.path)
            removed.append(info.base_name)
    return sorted(removed)


def _locate(location: str) -> tuple[pafs.FileSystem, str]:
    fs, path = pafs.FileSystem.from_uri(location if is_uri(location) else os.path.abspath(location))
    return fs, path.rstrip("/")
