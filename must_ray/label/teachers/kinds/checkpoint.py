"""Our own models as teachers: ``checkpoint`` (a must-ray model file) and ``random`` (a random-init
model of the same architecture, for dry runs and tests). Both label through the task's own head
and ``Task.predict``; several tasks naming the same checkpoint file share one forward pass."""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Optional, Sequence

import torch

from must_ray.config import Config, TeacherConfig
from must_ray.label.teachers.base import (
    Teacher,
    TeacherKind,
    TeacherSpec,
    default_teacher_path,
    register_teacher_kind,
)
from must_ray.label.teachers.pixels import resample
from must_ray.label.teachers.weights import WeightsFiles, materialised
from must_ray.models import MultiTaskModel, images_to_tensor, load_model, save_model
from must_ray.models.export import ModelFileError, model_payload
from must_ray.task_registry import task_config
from must_ray.tasks import Task, build_task, registered_task_names
from must_ray.typed_config import ConfigError, config_to_dict


class MustTeacher(Teacher):
    """One of our own models (``checkpoint`` / ``random``): shared forward, each task's ``predict``.

    ``channels_last`` (default): weights and inputs in NHWC memory format, which oneDNN's CPU
    convolutions (and cuDNN's) run faster; measured 40 % less CPU time per image for the five demo
    teachers at 64 px (``jobs/benchmark.py flops``, docs/benchmarks.md). Same results up to float
    rounding."""

    def __init__(self, name: str, model: MultiTaskModel, tasks: dict[str, Task], input_size: Optional[int] = None,
                 channels_last: bool = True):
        self.name = name
        self.channels_last = channels_last
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.task_objs = tasks
        self.tasks = list(tasks)
        self.input_size = input_size

    def predict(self, images: torch.Tensor) -> dict[str, list[Any]]:
        size = tuple(images.shape[1:3])
        x = resample(images_to_tensor(images, images.device), self.input_size)  # the training preprocessing
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.forward(self.model, x, images.device, tasks=self.tasks)
        return {t: self.task_objs[t].predict(out[t], size) for t in self.tasks}


def model_header(data: bytes) -> dict:
    """A must-ray model file's payload without its weights (:class:`ModelFileError` for another file);
    the one parse every kind hands to ``WeightsFiles.parsed``, so a file two kinds read is parsed once."""
    return {k: v for k, v in model_payload(data).items() if k != "state_dict"}


def random_teacher_bytes(cfg: Config, task: str, tcfg: TeacherConfig, num_classes: int,
                         classes: Sequence[str], image_size: int) -> bytes:
    """A random-init one-task teacher (``cfg.teacher.model`` architecture, seeded) as the bytes of a
    must-ray model file — the same file format a trained teacher has."""
    seed = int(tcfg.seed) * 1000 + registered_task_names().index(task)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = MultiTaskModel(cfg.teacher.model.backbone, {task: build_task(task, num_classes, cfg.tasks.get(task))},
                               fpn_channels=cfg.teacher.model.fpn_channels)
    finally:
        torch.random.set_rng_state(state)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(os.path.join(tmp, "model.pt"), model.eval(), num_classes=num_classes,
                          task_cfgs={task: task_config(task, cfg.tasks.get(task))}, classes=list(classes),
                          image_size=image_size, fpn_channels=cfg.teacher.model.fpn_channels,
                          extra={"random_init_seed": seed})
        with open(path, "rb") as f:
            return f.read()


@register_teacher_kind
class CheckpointKind(TeacherKind):
    """``checkpoint``: a must-ray model file (``path``, default the pipeline's trained teacher
    :func:`default_teacher_path`), through :func:`must_ray.models.load_model`."""

    name = "checkpoint"
    shares_weights = True

    @staticmethod
    def path(cfg: Config, task: str, tcfg: TeacherConfig) -> str:
        return tcfg.path or default_teacher_path(cfg, task)

    def check(self, cfg: Config, task: str, tcfg: TeacherConfig, files: WeightsFiles) -> None:
        path = self.path(cfg, task, tcfg)
        if not files.exists(path):
            raise ConfigError(
                f"label.teachers.{task}: teacher checkpoint not found: {path} (kind=checkpoint). Train it first "
                f"(jobs/train_teacher.py --task {task}), point --set label.teachers.{task}.path=FILE at a model "
                f"file, or do a dry run with a random-init teacher: --set label.teachers.{task}.kind=random")
        try:
            info = files.parsed(path, model_header)
        except ModelFileError as exc:
            raise ModelFileError(f"label.teachers.{task}: {path} {exc}") from None
        if task not in info["tasks"]:
            raise ConfigError(f"label.teachers.{task}: checkpoint {path} has no {task} head (it has {info['tasks']})")

    def vocabulary(self, cfg: Config, task: str, tcfg: TeacherConfig,
                   files: WeightsFiles) -> Optional[tuple[str, list[str], int]]:
        path = self.path(cfg, task, tcfg)
        info = files.parsed(path, model_header)
        return path, list(info.get("classes") or []), int(info["num_classes"])

    def spec(self, cfg: Config, task: str, tcfg: TeacherConfig, files: WeightsFiles, classes: Sequence[str],
             image_size: int) -> TeacherSpec:
        path = self.path(cfg, task, tcfg)
        info = files.parsed(path, model_header)
        return TeacherSpec([task], self.name, task, path=path, sha256=files.sha256(path), cfg=config_to_dict(tcfg),
                           classes=list(info.get("classes") or []), blob=files.read(path))

    def build(self, spec: TeacherSpec, cfg: Config, classes: Sequence[str], image_size: int,
              device: str | torch.device) -> Teacher:
        overrides = {t: task_config(t, cfg.tasks.get(t)) for t in spec.tasks}
        with materialised(spec.blob, ".pt") as path:
            model, info = load_model(path or spec.path, map_location="cpu", task_overrides=overrides)
        return MustTeacher(spec.name, model.to(device).eval(), {t: info["tasks"][t] for t in spec.tasks},
                           spec.cfg.get("input_size"))


@register_teacher_kind
class RandomKind(CheckpointKind):
    """``random``: a random-init ``MultiTaskModel`` of the task (``teacher.model`` architecture,
    ``seed``). The driver builds it once and ships the bytes, so every actor labels with the same
    weights and the provenance hash is the hash of those weights."""

    name = "random"
    shares_weights = False
    provenance_keys = ("seed",)

    def check(self, cfg: Config, task: str, tcfg: TeacherConfig, files: WeightsFiles) -> None:
        pass

    def vocabulary(self, cfg: Config, task: str, tcfg: TeacherConfig,
                   files: WeightsFiles) -> Optional[tuple[str, list[str], int]]:
        return None

    def spec(self, cfg: Config, task: str, tcfg: TeacherConfig, files: WeightsFiles, classes: Sequence[str],
             image_size: int) -> TeacherSpec:
        data = random_teacher_bytes(cfg, task, tcfg, len(classes), classes, image_size)
        return TeacherSpec([task], self.name, f"random-{task}", sha256=hashlib.sha256(data).hexdigest(),
                           cfg=config_to_dict(tcfg), classes=list(classes), blob=data)


__all__ = ["CheckpointKind", "RandomKind", "MustTeacher", "model_header", "random_teacher_bytes"]
