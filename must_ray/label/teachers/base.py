"""The teacher contract and the registry of teacher kinds.

A :class:`TeacherKind` is one value of ``label.teachers.<task>.kind``: how the driver checks and
resolves a task's teacher into a :class:`TeacherSpec` (plain, picklable, with the weights as bytes)
and how an actor builds the runtime :class:`Teacher` from that spec. Kinds live one module each in
``must_ray/label/teachers/kinds/`` and register themselves with :func:`register_teacher_kind`;
the modules there are discovered on first use, so a new kind is one new module.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Sequence

from must_ray.config import Config, TeacherConfig
from must_ray.io import MODEL_FILE
from must_ray.label.teachers.weights import WeightsFiles
from must_ray.typed_config import ConfigError

if TYPE_CHECKING:
    import torch


def default_teacher_path(cfg: Config, task: str) -> str:
    """Where a pipeline run's trained teacher of ``task`` lives (what the trainer exports and
    ``kind=checkpoint`` reads by default): ``<paths.root>/<paths.teachers>/<task>/model.pt``."""
    return os.path.join(cfg.paths.resolve("teachers"), task, MODEL_FILE)


@dataclass
class TeacherSpec:
    """A resolved teacher: everything an actor needs to build it (plain and picklable), plus what
    the provenance records. ``tasks`` has several entries when checkpoint teachers share a file."""

    tasks: list[str]
    kind: str
    name: str
    path: Optional[str] = None
    model_name: Optional[str] = None
    sha256: Optional[str] = None
    cfg: dict = field(default_factory=dict)  # TeacherConfig as a dict (class_map, num_classes, input_size ...)
    classes: list[str] = field(default_factory=list)  # the checkpoint's own vocabulary (checkpoint kinds)
    blob: Any = None  # the weights: bytes, or a Ray ObjectRef to them (None = hub weights)

    def provenance(self) -> dict[str, Any]:
        """What the examples table's provenance records of this teacher (and a resume compares)."""
        out = {"tasks": list(self.tasks), "name": self.name, "kind": self.kind, "path": self.path,
               "sha256": self.sha256}
        if self.model_name:
            out["model_name"] = self.model_name
        out.update({k: self.cfg.get(k) for k in teacher_kind(self.kind).provenance_keys})
        return out


class Teacher:
    """Runtime teacher: ``predict(images uint8 (B, S, S, 3) tensor on the device)`` -> ``{task: labels}``.
    A kind calls its network through :meth:`forward`, so ``label.precision`` applies to every kind."""

    name: str = ""
    tasks: list[str] = []
    precision: str = "fp32"  # the resolved label.precision (fp32 | bf16); TeacherSet sets it

    def predict(self, images: torch.Tensor) -> dict[str, list[Any]]:
        raise NotImplementedError

    def forward(self, model: Callable[..., Any], x: Any, device: torch.device, **kwargs: Any) -> Any:
        """``model(x, **kwargs)`` at this teacher's precision (bf16 autocast or fp32), floating
        outputs in fp32 so that post-processing (thresholds, NMS, arg-max) is the same code."""
        from must_ray.models.precision import autocast, to_float32

        with autocast(self.precision, device):
            return to_float32(model(x, **kwargs))


class TeacherKind:
    """One kind of teacher. Driver side, in order: :meth:`check` every task's teacher (fail fast,
    before any work), :meth:`vocabulary` (the classes its weights predict, if fixed), then
    :meth:`spec` once the run's class vocabulary is known. Actor side: :meth:`build`."""

    name: ClassVar[str] = ""
    #: the tasks this kind can label (``()``: any task, through the task's own head)
    labels: ClassVar[tuple[str, ...]] = ()
    #: ``TeacherConfig`` fields the provenance records besides path, model name and hash
    provenance_keys: ClassVar[tuple[str, ...]] = ()
    #: tasks whose teachers name the same weights file share one spec (one forward pass)
    shares_weights: ClassVar[bool] = False

    def check(self, cfg: Config, task: str, tcfg: TeacherConfig, files: WeightsFiles) -> None:
        """Raise :class:`ConfigError` naming ``label.teachers.<task>`` when the teacher cannot be
        used (missing or unreadable weights); reading files through ``files`` reads each once."""

    def vocabulary(self, cfg: Config, task: str, tcfg: TeacherConfig,
                   files: WeightsFiles) -> Optional[tuple[str, list[str], int]]:
        """``(path, class names, number of classes)`` its weights are bound to, or None when the
        teacher adapts to the run's vocabulary."""
        return None

    def spec(self, cfg: Config, task: str, tcfg: TeacherConfig, files: WeightsFiles, classes: Sequence[str],
             image_size: int) -> TeacherSpec:
        """The resolved teacher of ``task`` for the run's vocabulary ``classes``."""
        raise NotImplementedError

    def build(self, spec: TeacherSpec, cfg: Config, classes: Sequence[str], image_size: int,
              device: str | torch.device) -> Teacher:
        """The runtime teacher of ``spec`` on ``device``, in eval mode, thresholds from ``cfg.tasks``."""
        raise NotImplementedError


_KINDS: dict[str, TeacherKind] = {}
_LOADED = False


def register_teacher_kind(cls: type[TeacherKind]) -> type[TeacherKind]:
    """Class decorator: make teacher kind ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _KINDS and type(_KINDS[cls.name]) is not cls:
        raise ValueError(f"teacher kind {cls.name!r} registered twice ({type(_KINDS[cls.name]).__name__}, "
                         f"{cls.__name__})")
    _KINDS[cls.name] = cls()
    return cls


def _load_kinds() -> None:
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module("must_ray.label.teachers.kinds")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    _LOADED = True


def teacher_kind_names() -> tuple[str, ...]:
    """Every registered teacher kind, sorted."""
    _load_kinds()
    return tuple(sorted(_KINDS))


def teacher_kind(name: str) -> TeacherKind:
    """The registered kind ``name``; :class:`ConfigError` listing the known ones otherwise."""
    _load_kinds()
    if name not in _KINDS:
        raise ConfigError(f"unknown teacher kind {name!r}; known: {', '.join(teacher_kind_names())}")
    return _KINDS[name]


__all__ = ["TeacherSpec", "Teacher", "TeacherKind", "register_teacher_kind", "teacher_kind", "teacher_kind_names",
           "default_teacher_path"]
