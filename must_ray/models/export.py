"""The standalone model file: what a training run exports, ``jobs/label.py`` loads as a teacher
and ``jobs/evaluate.py`` scores.

One ``torch.save`` of a plain dict (tensors, strings, numbers, lists, dicts only) so it loads with
``torch.load(weights_only=True)``: no pickled code, safe to take from a shared bucket.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import warnings
from typing import Any, Mapping, Optional

import torch

from must_ray.io import atomic_path
from must_ray.models.multitask import MultiTaskModel
from must_ray.task_registry import make_task_config
from must_ray.tasks import TaskConfig, build_task, get_task_class
from must_ray.typed_config import ConfigError, config_to_dict

FORMAT = "must-ray-model/1"
#: what a must-ray model file is, for error messages
WHAT_IS_A_MODEL_FILE = (f"a must-ray model file is the model.pt a training run writes (jobs/train_teacher.py, "
                        f"jobs/train_student.py, jobs/pipeline.py): a torch.save of the format {FORMAT!r} holding "
                        "the network's description and weights")


class ModelFileError(ConfigError):
    """A file given as a model that is missing or is not a must-ray model file (random bytes, a
    plain ``state_dict``, a truncated file ...). The one-line message names the file and says what
    a model file is; a :class:`ConfigError`, so the jobs answer it with exit 2 and no traceback."""


def save_model(path: str, model: MultiTaskModel, *, num_classes: int, task_cfgs: Mapping[str, TaskConfig],
               classes: Optional[list[str]] = None, image_size: int = 64, fpn_channels: int = 64,
               extra: Optional[dict[str, Any]] = None) -> str:
    """Write ``model`` with everything needed to rebuild it (backbone name, tasks and their
    configs, class vocabulary, input size). Atomic: a crash never leaves a half-written file.
    ``task_cfgs``: each task's config object (a task without one is saved with its defaults)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "backbone": model.backbone_name,
        "fpn_channels": int(fpn_channels),
        "tasks": list(model.task_names),
        "num_classes": int(num_classes),
        "task_cfgs": {t: config_to_dict(task_cfgs.get(t) or get_task_class(t).config_class())
                      for t in model.task_names},
        "classes": list(classes or []),
        "image_size": int(image_size),
        "extra": dict(extra or {}),
        "state_dict": state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_model(path: str, map_location: str | torch.device = "cpu",
               task_overrides: Optional[dict[str, TaskConfig]] = None) -> tuple[MultiTaskModel, dict]:
    """Rebuild a model written by :func:`save_model`; returns ``(model in eval mode, info)``
    where ``info`` has ``tasks`` (Task objects), ``classes``, ``image_size``, ``sha256`` ...
    ``task_overrides`` replaces the stored task configs (e.g. labelling thresholds)."""
    payload = _read_payload(path, map_location)
    task_cfgs = {t: stored_task_config(t, c) for t, c in payload["task_cfgs"].items()}
    task_cfgs.update(task_overrides or {})
    tasks = {t: build_task(t, payload["num_classes"], task_cfgs.get(t)) for t in payload["tasks"]}
    model = MultiTaskModel(payload["backbone"], tasks, fpn_channels=payload["fpn_channels"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    info["tasks"] = tasks
    info["path"] = path
    info["sha256"] = file_sha256(path)
    return model, info


def read_model_header(path: str) -> dict[str, Any]:
    """A model file's header (tasks, classes, backbone, sizes ...) without building the network."""
    return {k: v for k, v in _read_payload(path, "cpu").items() if k != "state_dict"}


def check_model_file(path: str, what: str = "model") -> dict[str, Any]:
    """Check, before any work, that ``path`` is a must-ray model file; returns its header.
    Raises :class:`ModelFileError` naming ``what`` (a flag or config key) and the path."""
    try:
        return read_model_header(path)
    except ModelFileError as exc:
        raise ModelFileError(f"{what}: {exc}") from None


def model_payload(data: bytes, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload of a must-ray model file given as its bytes. Anything else raises
    :class:`ModelFileError` whose message starts "is not a must-ray model file", for the caller to
    put the file's name (and its flag or key) in front."""
    return _load_payload(io.BytesIO(data), map_location)


def _read_payload(path: str, map_location: str | torch.device) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ModelFileError(f"model file not found: {path} ({WHAT_IS_A_MODEL_FILE})")
    try:
        return _load_payload(path, map_location)
    except ModelFileError as exc:
        raise ModelFileError(f"{path} {exc}") from None


def _load_payload(source: Any, map_location: str | torch.device) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol warning for files of other programs
            payload = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch.load raises, the file is not one of ours
        raise ModelFileError(f"is not a must-ray model file (torch cannot read it as plain tensors and values: "
                             f"truncated, damaged or another kind of file; {type(exc).__name__}); "
                             f"{WHAT_IS_A_MODEL_FILE}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        kind = "a torch file of another program (e.g. a plain state_dict)" if isinstance(payload, dict) else \
            f"a torch file holding a {type(payload).__name__}"
        raise ModelFileError(f"is not a must-ray model file: it is {kind}; {WHAT_IS_A_MODEL_FILE}")
    return payload


def stored_task_config(task: str, knobs: Mapping[str, Any]) -> TaskConfig:
    """Task ``task``'s config object from the knobs a model file stored; knobs the task's config
    class does not have (files written when every task shared one flat set of knobs) are dropped."""
    config_class = get_task_class(task).config_class
    names = {f.name for f in dataclasses.fields(config_class)}
    return make_task_config(config_class, {k: v for k, v in knobs.items() if k in names}, f"task_cfgs.{task}")


def file_sha256(path: str) -> str:
    """Content hash of a file (provenance of teachers in pseudo-label tables)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_matching_weights(model: torch.nn.Module, path: str) -> dict[str, int]:
    """Initialise ``model`` from any must-ray model file: every tensor whose name and shape match
    is copied (backbone and neck always; heads of shared tasks). Returns counts of loaded/skipped
    tensors. This is how a student starts from a strong checkpoint (the paper's MuST-on-top)."""
    payload = _read_payload(path, "cpu")
    own = model.state_dict()
    matched = {k: v for k, v in payload["state_dict"].items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return {"loaded": len(matched), "skipped": len(own) - len(matched)}
