"""The tasks: one module per task, each registering a :class:`~must_ray.tasks.base.Task` subclass.

Adding a task = adding a module that defines a ``Task`` subclass (with its own ``config_class``)
decorated with :func:`register_task`. The modules of this package (except ``base`` and ``_...``)
are discovered automatically; a module elsewhere is listed in the config's ``task_modules``
(``docs/tasks.md``). The registry itself lives in :mod:`must_ray.task_registry`, a light module
that :mod:`must_ray.config` reads without importing any task.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from must_ray.task_registry import (
    TaskConfig,
    default_task_names,
    get_task_class,
    probe_task_names,
    register_task,
    registered_task_names,
)
from must_ray.tasks.base import Crop, Task


def build_task(name: str, num_classes: int, cfg: Any = None) -> Task:
    """Instantiate task ``name`` for a world/dataset with ``num_classes`` object categories;
    ``cfg`` is the task's config object, a mapping of its knobs, or ``None`` (its defaults)."""
    return get_task_class(name)(num_classes, cfg)


def build_tasks(names: Iterable[str], num_classes: int, task_cfgs: Optional[Mapping[str, Any]] = None) -> dict[str, Task]:
    """Instantiate several tasks (``task_cfgs`` maps name -> config, e.g. a config's ``tasks``)."""
    task_cfgs = task_cfgs or {}
    return {n: build_task(n, num_classes, task_cfgs.get(n)) for n in names}


__all__ = ["Crop", "Task", "TaskConfig", "build_task", "build_tasks", "default_task_names", "get_task_class",
           "probe_task_names", "register_task", "registered_task_names"]
