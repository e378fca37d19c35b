"""The task registry: which tasks exist, their classes and their own config classes.

Shaped after timm's ``timm/models/_registry.py``: a light module that holds name -> class maps and
imports no task (so :mod:`must_ray.config` can ask it what tasks exist without importing torch);
task modules import it and register themselves with :func:`register_task`. The built-in tasks
(every public module of the :mod:`must_ray.tasks` package) are imported the first time a name is
looked up; a task that lives outside must_ray is registered by importing its module, which a
config does for every module named in its top-level ``task_modules`` list
(:func:`load_task_modules`).

Dependency direction (no cycle)::

    typed_config  <-  task_registry  <-  config
                            ^
                            +------  tasks/base.py  <-  tasks/<task>.py, your_pkg/your_task.py

Each task owns its knobs: ``Task.config_class`` is a dataclass subclassing :class:`TaskConfig`
(which every task shares: ``loss_weight``), built and validated here, so the ``tasks:`` section of
a config (:class:`TaskConfigs`) holds one object of the task's own class per task.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Iterable

from must_ray.typed_config import ConfigError, build_dataclass

BUILTIN_PACKAGE = "must_ray.tasks"
#: the order the paper lists the tasks in; tasks registered later come after, alphabetically
CANONICAL_ORDER = ("classification", "detection", "segmentation", "depth", "normals")

_REGISTRY: dict[str, type] = {}
_builtins_loaded = False


@dataclass
class TaskConfig:
    """The knobs every task has; a task's own config class subclasses it (e.g.
    ``ClassificationConfig(loss_weight, topk, temperature)``)."""

    loss_weight: float = 1.0  # this task's weight in the multi-task loss (train.loss_weights overrides)
    # Knobs only a teacher's post-processing reads (labelling, scoring), never training: changing
    # one relabels and retrains the student but keeps the teachers (must_ray.pipeline.task_knobs).
    postprocess_knobs = ()

    def validate(self, key: str) -> None:
        if self.loss_weight < 0:
            raise ConfigError(f"{key}.loss_weight must be >= 0, got {self.loss_weight}")


def register_task(cls: type) -> type:
    """Class decorator: make the Task subclass ``cls`` available under ``cls.name``."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} has no name")
    config_class = getattr(cls, "config_class", None)
    if not (isinstance(config_class, type) and issubclass(config_class, TaskConfig)
            and dataclasses.is_dataclass(config_class)):
        raise ValueError(f"{cls.__name__}.config_class must be a dataclass subclassing TaskConfig, "
                         f"got {config_class!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} registered twice ({_REGISTRY[cls.name].__name__}, {cls.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    package = importlib.import_module(BUILTIN_PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
    _builtins_loaded = True


def load_task_modules(modules: Iterable[str], key: str = "task_modules") -> None:
    """Import the modules that define (and register) tasks living outside must_ray. Every process
    that builds tasks needs them: configs call this when they are loaded (also in Ray workers,
    which rebuild their config), and unpickling a :class:`TaskConfigs` imports its tasks' modules."""
    for i, module in enumerate(modules):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"{key}[{i}]: cannot import task module {module!r} ({exc}); it must be "
                              "importable in every Ray process (installed, or shipped with the job's "
                              "working_dir / py_modules)") from None


def registered_task_names() -> tuple[str, ...]:
    """All task names: the built-in ones in canonical order, then the others alphabetically."""
    _load_builtins()
    known = [n for n in CANONICAL_ORDER if n in _REGISTRY]
    return tuple(known + sorted(n for n in _REGISTRY if n not in CANONICAL_ORDER))


def default_task_names() -> tuple[str, ...]:
    """The registered tasks a config gets without naming them (a teacher split, a trained teacher
    and a test column each): every task but the opt-in ones (``Task.opt_in``, e.g. ``features``,
    whose labels only come from a teacher the config names)."""
    return tuple(n for n in registered_task_names() if not getattr(get_task_class(n), "opt_in", False))


def get_task_class(name: str) -> type:
    """The registered Task subclass called ``name``."""
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(registered_task_names())} (a task defined "
                       "outside must_ray is registered by listing its module in the config's task_modules)")
    return _REGISTRY[name]


def probe_task_names() -> tuple[str, ...]:
    """The registered tasks that have a light transfer probe (``Task.probe`` set)."""
    return tuple(n for n in registered_task_names() if getattr(get_task_class(n), "probe", None))


def make_task_config(config_class: type, value: Any = None, key: str = "tasks") -> TaskConfig:
    """A validated ``config_class`` object from ``value``: ``None`` (the defaults), a mapping of
    knobs (unknown ones raise :class:`ConfigError` naming ``key``) or a ``config_class`` object."""
    if value is None:
        cfg = config_class()
    elif isinstance(value, config_class):
        cfg = value
    elif isinstance(value, dict):
        cfg = build_dataclass(config_class, value, key)
    else:
        raise ConfigError(f"{key}: expected a mapping of {config_class.__name__} knobs, got "
                          f"{type(value).__name__} {value!r}")
    cfg.validate(key)
    return cfg


def task_config(name: str, value: Any = None) -> TaskConfig:
    """Task ``name``'s config object from ``value`` (see :func:`make_task_config`)."""
    return make_task_config(get_task_class(name).config_class, value, f"tasks.{name}")


class TaskConfigs(dict):
    """The ``tasks`` section of a config: task name -> that task's own config object."""

    @classmethod
    def coerce_config(cls, value: Any, key: str) -> "TaskConfigs":
        """Build every task's config class from a mapping ``{task: {knob: value}}``; an unknown
        task or knob raises :class:`ConfigError` naming the dotted key."""
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of task name -> knobs, got {type(value).__name__} {value!r}")
        known = registered_task_names()
        out = cls()
        for name, knobs in value.items():
            if name not in known:
                raise ConfigError(f"{key}.{name}: unknown task; known: {', '.join(known)}")
            config_class = get_task_class(name).config_class
            if isinstance(knobs, config_class):
                out[name] = knobs
            elif isinstance(knobs, dict):
                out[name] = build_dataclass(config_class, knobs, f"{key}.{name}")
            else:
                raise ConfigError(f"{key}.{name}: expected a mapping for {config_class.__name__}, got "
                                  f"{type(knobs).__name__} {knobs!r}")
        return out

    def __reduce__(self):
        modules = sorted({_REGISTRY[n].__module__ for n in self if n in _REGISTRY})
        return _restore_task_configs, (modules, dict(self))


def _restore_task_configs(modules: list[str], items: dict) -> TaskConfigs:
    load_task_modules(modules)
    return TaskConfigs(items)


def default_task_configs() -> TaskConfigs:
    """Every registered task's default config."""
    return TaskConfigs({n: get_task_class(n).config_class() for n in registered_task_names()})


__all__ = [
    "CANONICAL_ORDER", "TaskConfig", "TaskConfigs", "default_task_configs", "get_task_class", "load_task_modules",
    "make_task_config", "probe_task_names", "register_task", "registered_task_names", "task_config",
]
