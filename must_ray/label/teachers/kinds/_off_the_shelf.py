"""What the off-the-shelf kinds (timm, torchvision) share: a model by ``model_name`` whose weights
come from an optional file (read, hashed and shipped like a checkpoint) or the hub, adapted to one
task through ``class_map``."""
from __future__ import annotations

from typing import Sequence

from must_ray.config import Config, TeacherConfig
from must_ray.label.teachers.base import TeacherKind, TeacherSpec
from must_ray.label.teachers.weights import WeightsFiles
from must_ray.typed_config import ConfigError, config_to_dict


class OffTheShelfKind(TeacherKind):
    """An off-the-shelf model adapted to the one task in :attr:`labels`."""

    provenance_keys = ("class_map", "num_classes", "input_size", "pretrained")

    def check(self, cfg: Config, task: str, tcfg: TeacherConfig, files: WeightsFiles) -> None:
        if tcfg.path and not files.exists(tcfg.path):
            raise ConfigError(f"label.teachers.{task}: weights file not found: {tcfg.path}")

    def teacher_name(self, tcfg: TeacherConfig) -> str:
        """The teacher's name in logs and provenance: ``<kind>:<model_name>``."""
        return f"{self.name}:{tcfg.model_name}"

    def spec(self, cfg: Config, task: str, tcfg: TeacherConfig, files: WeightsFiles, classes: Sequence[str],
             image_size: int) -> TeacherSpec:
        return TeacherSpec([task], self.name, self.teacher_name(tcfg), path=tcfg.path,
                           model_name=tcfg.model_name, sha256=files.sha256(tcfg.path) if tcfg.path else None,
                           cfg=config_to_dict(tcfg), blob=files.read(tcfg.path) if tcfg.path else None)

__all__ = ["OffTheShelfKind"]
