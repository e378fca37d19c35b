
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

from must_ray.evaluate.compare import compare, comparison_passed, headline, write_metrics
from must_ray.evaluate.curves import plot_curves
from must_ray.evaluate.pictures import collect_grid_rows, render_grid
from must_ray.evaluate.scoring import evaluate_models
from must_ray.io import HISTORY_FILE, MODEL_FILE, strict_json
from must_ray.label.teachers import default_teacher_path
from must_ray.models.export import check_model_file
from must_ray.table import table_classes
from must_ray.tasks import registered_task_names
from must_ray.typed_config import ConfigError


def default_models(cfg) -> tuple[Optional[str], dict[str, str]]:
    """The student and teacher model files of a pipeline run that exist on disk:
    ``<paths.root>/<paths.student>/model.pt`` and ``<paths.root>/<paths.teachers>/<task>/model.pt``."""
    student = os.path.join(cfg.paths.resolve("student"), MODEL_FILE)
    teachers = {t: default_teacher_path(cfg, t) for t in registered_task_names()}
    return (student if os.path.isfile(student) else None), {t: p for t, p in teachers.items() if os.path.isfile(p)}


def teacher_name(task: str) -> str:
    return f"teacher_{task}"


def parse_named_paths(values: Optional[Sequence[str]], flag: str, need_key: bool) -> dict[str, str]:
    """``["NAME=PATH", ...]`` (job flags such as ``--teacher depth=t.pt``) -> ``{NAME: PATH}``; without
    ``need_key`` a bare ``PATH`` is named after its folder. Raises ConfigError on bad or repeated names."""
    out: dict[str, str] = {}
    for v in values or []:
        if "=" in v:
            key, path = v.split("=", 1)
        elif need_key:
            raise ConfigError(f"{flag} {v!r}: expected NAME=PATH")
        else:
            key, path = os.path.basename(os.path.dirname(os.path.abspath(v))) or v, v
        if not key or not path:
            raise ConfigError(f"{flag} {v!r}: expected NAME=PATH")
        if key in out:
            raise ConfigError(f"{flag}: {key!r} given twice")
        out[key] = path
    return out


def models_from_flags(cfg, args) -> tuple[Optional[str], dict[str, str], dict[str, str]]:
    """``(student, {task: teacher}, {name: model})`` from :func:`must_ray.cli.add_model_flags`' flags, or the
    run's own trained models when none is given. Raises ConfigError for unknown tasks, no models
    at all, or missing files (before any work starts)."""
    teachers = parse_named_paths(args.teacher, "--teacher", need_key=True)
    for task in teachers:
        if task not in registered_task_names():
            raise ConfigError(f"--teacher {task}=...: unknown task; known: {', '.join(registered_task_names())}")
    models = parse_named_paths(args.model, "--model", need_key=False)
    student = args.student
    if student is None and not teachers and not models:
        student, teachers = default_models(cfg)
        if student is None and not teachers:
            raise ConfigError(f"no models given and none trained under {cfg.paths.root} "
                              "(use --student/--teacher/--model)")
    for flag, path in [("--student", student)] + [(f"--teacher {t}", p) for t, p in teachers.items()] + \
            [(f"--model {n}", p) for n, p in models.items()]:
        if path is not None:
            check_model_file(path, flag)
    return student, teachers, models


def _schedule(train_cfg) -> str:
    sched = train_cfg.schedule
    return f"{sched.max_steps} steps" if sched.max_steps else f"{sched.epochs} epochs"


def run_description(cfg) -> str:
    """One line naming the run and its schedules, for the report's headline."""
    per_task = sorted(cfg.teacher.per_task)
    own = f" ({', '.join(per_task)}: own recipe)" if per_task else ""
    return (f"Run `{cfg.name}`: student {_schedule(cfg.student)} of {cfg.student.global_batch_size} images, "
            f"teachers {_schedule(cfg.teacher)} of {cfg.teacher.global_batch_size}{own}")


def run_evaluation(cfg, *, student: Optional[str] = None, teachers: Optional[Mapping[str, str]] = None,
                   models: Optional[Mapping[str, str]] = None, data: Optional[Sequence[str]] = None,
                   out_dir: Optional[str] = None, pictures: bool = True, discover: bool = True) -> dict[str, Any]:
    """The pipeline's evaluate step (``jobs/evaluate.py`` is a thin wrapper around it).

    Scores the ``student``, each ``teachers[task]`` and any other ``models`` (``{name: file}``) on
    ``data`` (default ``cfg.evaluate.data`` or ``<paths.root>/<paths.world>/test``) with
    :func:`evaluate_model`, compares the student with the teachers (:func:`compare`, tolerance
    ``cfg.evaluate.tolerance``), and writes into ``out_dir`` (default
    ``<paths.root>/<paths.reports>``): ``metrics.json``, ``metrics.md`` and, with ``pictures``,
    ``grid.png`` (ground truth | teachers | student on the first ``cfg.evaluate.grid_images`` test
    images) and ``curves.png`` (the ``metrics.jsonl`` next to each model file, when present).
    With nothing given and ``discover``, the run's own student and teachers are used
    (:func:`default_models`). Returns the job summary."""
    ec = cfg.evaluate
    if discover and student is None and not teachers and not models:
        student, teachers = default_models(cfg)
    teachers = dict(teachers or {})
    named: dict[str, str] = {}
    if student:
        named["student"] = str(student)
    for task, path in teachers.items():
        named[teacher_name(task)] = str(path)
    for name, path in (models or {}).items():
        if name in named:
            raise ValueError(f"model name {name!r} given twice")
        named[name] = str(path)
    if not named:
        raise ValueError("nothing to evaluate: give a student, teachers or models (no trained models found under "
                         f"{cfg.paths.root})")
    for name, path in named.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: model file not found: {path}")
    tables = [str(p) for p in (data or ec.data or [os.path.join(cfg.paths.resolve("world"), "test")])]
    out_dir = out_dir or cfg.paths.resolve("reports")
    results = evaluate_models(named, tables, ec)
    comparison = None
    if student and teachers:
        comparison = compare(results["student"], {t: results[teacher_name(t)] for t in teachers}, ec.tolerance)
    classes = table_classes(tables, required=False)
    files = write_metrics(out_dir, results, comparison, extra={"data": tables},
                          num_classes=len(classes) if classes else None, run=run_description(cfg))
    if pictures:
        files.update(render_pictures(out_dir, tables[0], student=student, teachers=teachers, models=models,
                                     grid_images=ec.grid_images, scale=ec.grid_scale))
    summary: dict[str, Any] = {
        "job": "evaluate", "out_dir": out_dir, "data": tables, "models": named, **files,
        "headline": headline(results),
        "beats_trivial": {name: {t: e["beats_trivial"] for t, e in r["tasks"].items()} for name, r in results.items()},
    }
    if comparison is not None:
        summary["comparison"] = {r["task"]: {"student": strict_json(r["student"]), "teacher": strict_json(r["teacher"]),
                                             "ratio": strict_json(r["ratio"]), "pass": r["pass"]} for r in comparison}
        summary["passed"] = comparison_passed(comparison)
    return summary


def render_pictures(out_dir: str, table: str, *, student: Optional[str] = None,
                    teachers: Optional[Mapping[str, str]] = None, models: Optional[Mapping[str, str]] = None,
                    grid_images: int = 6, scale: int = 3) -> dict[str, str]:
    """``grid.png`` (ground truth, the teachers' labels, the student's and other models' predictions
    on the first ``grid_images`` rows of ``table``) and ``curves.png`` (training curves from the
    ``metrics.jsonl`` beside each model file) in ``out_dir``; returns the paths written."""
    sources: dict[str, Any] = {}
    if teachers:
        sources["teachers"] = [teachers[t] for t in registered_task_names() if t in teachers] + \
            [p for t, p in teachers.items() if t not in registered_task_names()]
    if student:
        sources["student"] = student
    for name, path in (models or {}).items():
        sources[name] = path
    out: dict[str, str] = {}
    rows = collect_grid_rows(table, grid_images, models=sources)
    classes = table_classes([table], required=False)
    grid = render_grid(rows, os.path.join(out_dir, "grid.png"), class_names=classes, scale=scale,
                       title=f"{os.path.basename(os.path.normpath(table))}: ground truth | teachers | student")
    out["grid_png"] = grid["path"]
    runs = {}
    for task, path in (teachers or {}).items():
        runs[teacher_name(task)] = os.path.join(os.path.dirname(os.path.abspath(path)), HISTORY_FILE)
    if student:
        runs["student"] = os.path.join(os.path.dirname(os.path.abspath(student)), HISTORY_FILE)
    for name, path in (models or {}).items():
        runs[name] = os.path.join(os.path.dirname(os.path.abspath(path)), HISTORY_FILE)
    runs = {n: p for n, p in runs.items() if os.path.isfile(p)}
    if runs:
        out["curves_png"] = plot_curves(runs, os.path.join(out_dir, "curves.png"), title="training loss")["path"]
    return out
