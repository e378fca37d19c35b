"""Teachers for pseudo-labelling: load any teacher and adapt its raw outputs to task labels.

A *teacher* takes a batch of decoded images — uint8 RGB (B, S, S, 3) at the label resolution,
decoded and resized once for all teachers — and returns, for each task it labels, one label per
image in that task's native form (see ``must_ray/tasks/``), post-processed with the labelling
thresholds of ``cfg.tasks.<task>``. ``Task.encode`` then turns labels into table cells.

``label.teachers.<task>.kind`` names a registered :class:`~must_ray.label.teachers.base.TeacherKind`,
one module each in ``kinds/`` (a new kind is one new module there, plus its name in
``TeacherConfig.kind``):

``checkpoint`` (``kinds/checkpoint.py``)
    a must-ray model file (default :func:`default_teacher_path`, what the trainer exports) through
    :func:`must_ray.models.load_model`; the task's own head and ``Task.predict``. Several tasks
    naming the same file share one forward.
``random`` (``kinds/checkpoint.py``)
    a random-init ``MultiTaskModel`` of the task (``teacher.model`` architecture, ``seed``): for
    tests and dry runs before teachers are trained.
``timm`` (``kinds/timm_classifier.py``)
    a timm classifier by ``model_name``; tempered softmax mapped into our classes, top-k.
``torchvision_detector``, ``torchvision_segmenter`` (``kinds/torchvision_*.py``)
    any ``torchvision.models.detection`` / ``.segmentation`` model by ``model_name``.
``backbone`` (``kinds/backbone.py``)
    a bare backbone (a must-ray model file's, or a timm one by ``model_name``) labels ``features``.

The driver resolves every teacher once (:func:`resolve_teachers`: files read, hashed, the class
vocabulary agreed — ``weights.py``); each actor builds them from the resolved specs
(:class:`TeacherSet`).
"""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from must_ray.config import Config
from must_ray.label.teachers.base import (
    Teacher,
    TeacherKind,
    TeacherSpec,
    default_teacher_path,
    register_teacher_kind,
    teacher_kind,
    teacher_kind_names,
)
from must_ray.label.teachers.weights import WeightsFiles
from must_ray.models.precision import resolve_precision
from must_ray.typed_config import ConfigError
from must_ray.world import CATEGORIES


def _vocabulary(cfg: Config, bound: Sequence[tuple[str, list[str], int]]) -> list[str]:
    """The run's class vocabulary: ``label.classes``, else the checkpoints' (they must agree),
    else the world's; every teacher bound to a vocabulary (``bound``: path, names, count) must match."""
    if cfg.label.classes:
        classes = list(cfg.label.classes)
    else:
        named = [names for _, names, _ in bound if names]
        classes = list(named[0]) if named else list(CATEGORIES)
    for path, names, n in bound:
        if n != len(classes) or (names and names != classes):
            raise ConfigError(
                f"label.teachers: checkpoint {path} predicts {n} classes {names or ''} but the labelling "
                f"vocabulary is {classes}; all teachers must share one vocabulary (set label.classes to "
                f"the right one, or use matching teachers)")
    return classes


def resolve_teachers(cfg: Config, tasks: Sequence[str], image_size: int) -> tuple[list[TeacherSpec], list[str]]:
    """Check every teacher of ``tasks`` exists and agrees on one class vocabulary, read its weights
    and hash them. Returns ``(specs, classes)``. Fails fast (:class:`ConfigError`) with the task and
    path named when a teacher file is missing."""
    files = WeightsFiles()
    kinds: dict[str, TeacherKind] = {}
    for task in tasks:
        tcfg = cfg.label.teachers[task]
        kind = kinds[task] = teacher_kind(tcfg.kind)
        if kind.labels and task not in kind.labels:
            raise ConfigError(f"label.teachers.{task}: kind={kind.name!r} labels {kind.labels[0]}, not {task}")
        kind.check(cfg, task, tcfg, files)
    bound = [v for task, kind in kinds.items() if (v := kind.vocabulary(cfg, task, cfg.label.teachers[task], files))]
    classes = _vocabulary(cfg, bound)
    specs: list[TeacherSpec] = []
    for task, kind in kinds.items():
        spec = kind.spec(cfg, task, cfg.label.teachers[task], files, classes, image_size)
        shared = next((s for s in specs if kind.shares_weights and s.kind == spec.kind and s.path == spec.path), None)
        if shared is None:
            specs.append(spec)
        else:  # one forward for every task of a shared (multi-task) file
            shared.tasks.append(task)
            shared.name = "+".join(shared.tasks)
    return specs, classes


def build_teacher(spec: TeacherSpec, cfg: Config, classes: Sequence[str], image_size: int,
                  device: str | torch.device = "cpu") -> Teacher:
    """Instantiate one resolved teacher on ``device`` (eval mode, thresholds from ``cfg.tasks``)."""
    return teacher_kind(spec.kind).build(spec, cfg, classes, image_size, device)


class TeacherSet:
    """All teachers of a labelling run, built once per actor (or once by the plain loop), at
    ``label.precision`` on their device. :meth:`predict` runs every teacher on the same decoded batch."""

    def __init__(self, specs: Sequence[TeacherSpec], cfg: Config, classes: Sequence[str], image_size: int,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.precision = resolve_precision(cfg.label.precision, self.device)
        self.teachers = [build_teacher(s, cfg, classes, image_size, self.device) for s in specs]
        for teacher in self.teachers:
            teacher.precision = self.precision
        self.tasks = [t for teacher in self.teachers for t in teacher.tasks]

    def predict(self, images: np.ndarray, timings: Optional[dict[str, float]] = None) -> dict[str, list[Any]]:
        """``images`` uint8 (B, S, S, 3) -> ``{task: [label] * B}``; per-teacher seconds are added
        to ``timings`` (keyed by teacher name) when given."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        out: dict[str, list[Any]] = {}
        with torch.inference_mode():
            for teacher in self.teachers:
                t0 = time.perf_counter()
                out.update(teacher.predict(x))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if timings is not None:
                    timings[teacher.name] = timings.get(teacher.name, 0.0) + time.perf_counter() - t0
        return out


__all__ = ["TeacherSpec", "Teacher", "TeacherKind", "TeacherSet", "resolve_teachers", "build_teacher",
           "default_teacher_path", "register_teacher_kind", "teacher_kind", "teacher_kind_names"]
