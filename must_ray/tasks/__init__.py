"""Task registry: one module per task, each registering a :class:`~must_ray.tasks.base.Task`.

Adding a task = adding a module here that defines a ``Task`` subclass decorated with
:func:`register_task`; the module list below is discovered automatically (every module in this
package except ``base``), so nothing else changes.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

from must_ray.tasks.base import Crop, Task

_REGISTRY: dict[str, type[Task]] = {}
_LOADED = False


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} registered twice ({_REGISTRY[cls.name].__name__}, {cls.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


# Canonical order: the order the paper lists the tasks in; new tasks come after, alphabetically.
_CANONICAL = ("classification", "detection", "segmentation", "depth", "normals")


def registered_task_names() -> tuple[str, ...]:
    """All task names, in canonical order."""
    _load_all()
    known = [n for n in _CANONICAL if n in _REGISTRY]
    return tuple(known + sorted(n for n in _REGISTRY if n not in _CANONICAL))


def get_task_class(name: str) -> type[Task]:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(registered_task_names())}")
    return _REGISTRY[name]


def build_task(name: str, num_classes: int, cfg=None) -> Task:
    """Instantiate task ``name`` for a world/dataset with ``num_classes`` object categories."""
    return get_task_class(name)(num_classes, cfg)


def build_tasks(names, num_classes: int, task_cfgs: Optional[dict] = None) -> dict[str, Task]:
    """Instantiate several tasks (``task_cfgs`` maps name -> TaskConfig)."""
    task_cfgs = task_cfgs or {}
    return {n: build_task(n, num_classes, task_cfgs.get(n)) for n in names}


__all__ = ["Crop", "Task", "register_task", "registered_task_names", "get_task_class", "build_task", "build_tasks"]
