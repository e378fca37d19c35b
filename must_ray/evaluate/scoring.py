"""Evaluation: score exported models on labelled examples tables, and the student-vs-teachers report.

* :func:`evaluate_model` (one model) and :func:`evaluate_models` (several in one pass: each image
  is read and decoded once) score any model file (:func:`must_ray.models.save_model`: a teacher or
  the student) on one or more examples tables with the metric of every task the model has a head
  for *and* the tables have labels for. With ``use_ray=True`` it runs as a Ray Data pipeline:
  ``read_parquet`` -> ``map_batches(BatchScorer, compute=ActorPoolStrategy)``, where each actor
  loads the model once and returns, per batch, only the *metric states* of its rows (pickled into a
  binary column). The driver merges the states with ``Task.metric_merge``; predictions never leave
  the actors, so the driver's memory does not grow with the table (except for what a task's own
  state keeps, e.g. detection keeps boxes for AP).
* The same pass scores the task's **trivial baseline** (``Task.trivial_prediction``: majority
  class, mean depth, mean normal, no boxes ...) on the same ground truth, so "beats trivial" is
  checkable from one ``metrics.json``.
* :func:`score_batch` is the one scoring step (fresh states updated with one batch of
  predictions and ground truth) used by the actors, the local path and the tests alike;
  :func:`merge_states` merges per-batch states in a canonical order (by each batch's first
  ``image_id``), so the Ray and the local path give identical numbers when their batches coincide.
* :func:`compare` is MuST's headline check: per task, the student's primary metric against that
  task's teacher (pass: >= (1 - tolerance) x teacher when higher is better, <= (1 + tolerance) x
  teacher when lower is better; tolerance 0.02).
* :func:`write_metrics` writes ``metrics.json`` (strict JSON: inf/nan -> null) and
  ``metrics.md`` (Markdown tables).

The reference for every output is ``docs/evaluation.md``.
"""
from __future__ import annotations

import copy
import os
import pickle
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from must_ray.config import EvalConfig
from must_ray.evaluate.compare import beats
from must_ray.images import BadImageError, decode_image, resize_rgb
from must_ray.models import images_to_tensor, load_model
from must_ray.models.export import file_sha256, read_model_header
from must_ray.table import (
    Conform,
    decode_column,
    iter_table_batches,
    labelled_rows,
    read_labels,
    table_classes,
    table_schema,
    task_fields,
)
from must_ray.tasks import Task, build_task, registered_task_names
from must_ray.tasks.base import Crop, resize_nearest

# ----------------------------------------------------------------------------- tables (driver side)


def _as_list(paths: str | Sequence[str]) -> list[str]:
    return [paths] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]


def score_batch(tasks: Mapping[str, Task], preds: Mapping[str, Sequence[Any]],
                gts: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Fresh metric states of ``tasks`` updated with one batch: ``preds[t]`` and ``gts[t]`` are
    aligned lists of labels (a ``None`` ground truth is skipped, a ``None`` prediction is a miss).
    The one scoring step of the Ray actors, the local path and the tests."""
    return {name: task.metric_update(task.metric_state(), preds[name], gts[name]) for name, task in tasks.items()}


def merge_states(tasks: Mapping[str, Task], batches: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Merge per-batch states ``(key, {task: state})`` with ``Task.metric_merge`` in sorted key
    order (keys: each batch's first ``image_id``), so the result does not depend on which worker
    finished first."""
    merged = {name: task.metric_state() for name, task in tasks.items()}
    for _, states in sorted(batches, key=lambda kv: kv[0]):
        for name, task in tasks.items():
            merged[name] = task.metric_merge(merged[name], states[name])
    return merged


def compute_metrics(tasks: Mapping[str, Task], states: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``Task.metric_compute`` of every task (floats; inf/nan kept, :func:`strict_json` maps them)."""
    return {name: {k: float(v) for k, v in task.metric_compute(states[name]).items()} for name, task in tasks.items()}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    return a == b


class TrivialBaseline:
    """``Task.trivial_prediction`` fitted once on a set of ground-truth labels and then applied to any
    batch. All built-in tasks predict one constant label (majority class, mean depth ...): it is
    kept as a template (dense templates are nearest-resized to each ground truth's size). A task whose
    trivial prediction is not constant falls back to ``trivial_prediction(batch)`` (per batch)."""
    def __init__(self, task: Task, fit_gts: Sequence[Any]):
        self.task = task
        gts = [g for g in fit_gts if g is not None]
        self.fit_rows = len(gts)
        preds = task.trivial_prediction(gts) if gts else []
        self.template = preds[0] if preds else None
        self.constant = self.template is not None and all(_same(self._like(g), p) for p, g in zip(preds, gts))

    def _like(self, gt: Any) -> Any:
        if self.task.dense:
            t = np.asarray(self.template)
            shape = np.asarray(gt).shape[:2]
            return t.copy() if t.shape[:2] == shape else resize_nearest(t, Crop(), shape)
        return copy.deepcopy(self.template)

    @property
    def mode(self) -> str:
        return "constant" if self.constant else "per_batch"

    def predict(self, gts: Sequence[Any]) -> list[Any]:
        if not self.constant:
            return self.task.trivial_prediction(gts)
        return [None if g is None else self._like(g) for g in gts]


# ----------------------------------------------------------------------------- prediction


def resolve_device(device: str = "auto") -> str:

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def predict_labels(model, tasks: Mapping[str, Task], images: Sequence[np.ndarray], input_size: Optional[int] = None,
                   device: str = "cpu") -> dict[str, list[Any]]:
    """Labels predicted by ``model`` for uint8 RGB ``images`` (any sizes): each image is resized
    (bilinear) to ``input_size`` (square; ``None`` = the first image's size), the model runs once on
    the batch, and every task's ``predict`` post-processes its outputs back at each image's own size
    (so dense predictions align with that image's ground truth)."""


    if not len(images):
        return {name: [] for name in tasks}
    size = int(input_size or images[0].shape[0])
    batch = np.stack([resize_rgb(np.asarray(im), size) for im in images])
    with torch.no_grad():
        outputs = model(images_to_tensor(batch, device=device), tasks=list(tasks))
    sizes = [tuple(int(s) for s in np.asarray(im).shape[:2]) for im in images]
    out: dict[str, list[Any]] = {name: [None] * len(images) for name in tasks}
    for hw in sorted(set(sizes)):
        idx = [i for i, s in enumerate(sizes) if s == hw]
        sel = torch.tensor(idx, device=device)
        for name, task in tasks.items():
            raw = outputs[name]
            sub = {k: v.index_select(0, sel) for k, v in raw.items()} if isinstance(raw, dict) else raw.index_select(0, sel)
            for i, lab in zip(idx, task.predict(sub, hw)):
                out[name][i] = lab
    return out


class BatchScorer:
    """Ray Data ``map_batches`` callable class (one per actor): loads every model once, then for
    each Arrow batch decodes the images and ground truth once, runs each model on them, and returns
    one row ``{key, rows, bad_images, states}`` where ``states`` is the pickle of
    ``{"models": {name: {task: state}}, "trivial": {task: state}}`` for the batch. Also used
    directly (no Ray) by the local path.

    ``models``: ``{name: (model file, [tasks to score])}``; ``trivial``: ``{task: TrivialBaseline}``
    for the union of those tasks."""
    def __init__(self, models: Mapping[str, tuple[str, Sequence[str]]], trivial: Mapping[str, TrivialBaseline],
                 device: str = "cpu", num_threads: Optional[int] = None):


        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.device = resolve_device(device)
        self.models: dict[str, tuple[Any, Optional[int], dict[str, Task]]] = {}
        for name, (path, task_names) in models.items():
            model, info = load_model(path, map_location=self.device)
            size = int(info.get("image_size") or 0) or None
            self.models[name] = (model, size, {t: info["tasks"][t] for t in task_names})
        self.trivial = dict(trivial)
        self.tasks = {t: b.task for t, b in self.trivial.items()}

    def score(self, batch: pa.Table) -> tuple[str, int, int, dict[str, Any]]:

        ids = batch.column("image_id").to_pylist()
        images, keep = [], []
        for i, data in enumerate(batch.column("image").to_pylist()):
            try:
                images.append(decode_image(data))
                keep.append(i)
            except BadImageError:
                continue
        if len(keep) != batch.num_rows:
            batch = batch.take(pa.array(keep, type=pa.int64()))
        gts = {name: decode_column(task, batch) for name, task in self.tasks.items()}
        states: dict[str, Any] = {"models": {}}
        for name, (_, _, tasks) in self.models.items():
            preds = self.predict(name, images, gts)
            states["models"][name] = score_batch(tasks, preds, {t: gts[t] for t in tasks})
        trivial = {t: self.trivial[t].predict(gts[t]) for t in self.tasks}
        states["trivial"] = score_batch(self.tasks, trivial, gts)
        return (min(ids) if ids else ""), len(keep), len(ids) - len(keep), states

    def predict(self, name: str, images: Sequence[np.ndarray], gts: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        """Model ``name``'s labels for the batch's images. ``gts`` is unused here; it is passed so a
        subclass can be an oracle (the perfect-prediction test scores ground truth this way)."""
        model, size, tasks = self.models[name]
        return predict_labels(model, tasks, images, size, self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        key, rows, bad, states = self.score(batch)
        return pa.table({"key": [key], "rows": pa.array([rows], pa.int64()), "bad_images": pa.array([bad], pa.int64()),
                         "states": pa.array([pickle.dumps(states, protocol=5)], pa.binary())})


def _default_actors(num_cpus: float, num_gpus: float) -> tuple[int, int]:
    import ray

    res = ray.cluster_resources()
    if num_gpus > 0:
        most = int(res.get("GPU", 0) // num_gpus)
    else:
        # keep a little CPU for the read tasks
        most = int(max(0.0, res.get("CPU", 1) - 0.5) // max(num_cpus, 1e-3))
    return 1, max(1, most)


def evaluate_models(models: Mapping[str, str], table_paths: str | Sequence[str], ec: Optional[EvalConfig] = None,
                    *, device: str = "auto", scorer: Optional[type] = None) -> dict[str, dict[str, Any]]:
    """Score several model files (``{name: path}``) on the examples tables in **one** pass (each
    image is read and decoded once, every model runs on it); returns ``{name: result}`` with the
    same result as :func:`evaluate_model`. ``ec``: tasks, batch size, Ray or local, actor pool and
    trivial-baseline settings (default ``EvalConfig()``); ``scorer``: the :class:`BatchScorer`
    class to use (a subclass must be importable on the workers)."""
    start = time.time()
    ec = ec or EvalConfig()
    paths = _as_list(table_paths)
    _check_request(models, paths, ec)
    infos = {name: read_model_header(str(path)) for name, path in models.items()}
    num_classes = _shared_num_classes(models, infos, table_classes(paths, required=False))
    wanted = [t for t in registered_task_names() if not ec.tasks or t in ec.tasks]
    task_objs = {t: build_task(t, num_classes) for t in wanted}
    counts = {t: sum(labelled_rows(p, task_objs[t].presence_column()) for p in paths) for t in wanted}
    plan, skipped = _plan(models, infos, paths, counts)
    union = [t for t in wanted if any(t in s for _, s in plan.values())]
    trivial = {t: TrivialBaseline(task_objs[t], read_labels(paths, task_objs[t], ec.trivial_fit_rows)) for t in union}
    fields = task_fields(union)
    columns = ["image_id", "image"] + [f.name for f in fields]
    run = _score_with_ray if ec.use_ray else _score_locally
    results, rows, bad = run(scorer or BatchScorer, plan, trivial, paths, columns, fields, ec, device)

    union_objs = {t: task_objs[t] for t in union}
    trivial_metrics = compute_metrics(union_objs, merge_states(union_objs, [(k, s["trivial"]) for k, s in results]))
    wall = time.time() - start
    out: dict[str, dict[str, Any]] = {}
    for name, (path, scored) in plan.items():
        objs = {t: task_objs[t] for t in scored}
        metrics = compute_metrics(objs, merge_states(objs, [(k, s["models"][name]) for k, s in results]))
        out[name] = {
            "model": path,
            "name": name,
            "sha256": file_sha256(path),
            "backbone": infos[name].get("backbone"),
            "model_tasks": list(infos[name]["tasks"]),
            "tables": paths,
            "rows": rows,
            "bad_images": bad,
            "tasks": {t: _task_result(task_objs[t], metrics[t], trivial_metrics[t], counts[t]) for t in scored},
            "skipped": skipped[name],
            "trivial_fit": {t: {"rows": trivial[t].fit_rows, "mode": trivial[t].mode} for t in scored},
            "batch_size": int(ec.batch_size),
            "use_ray": bool(ec.use_ray),
            "models_in_pass": len(plan),
            "wall_s": round(wall, 3),
            "images_per_s": round(rows / wall, 2) if wall > 0 else None,
        }
    return out


def _check_request(models: Mapping[str, str], paths: Sequence[str], ec: EvalConfig) -> None:
    if not paths:
        raise ValueError("no evaluation tables given")
    if not models:
        raise ValueError("no models to evaluate")
    if ec.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {ec.batch_size}")
    unknown = [t for t in ec.tasks if t not in registered_task_names()]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {', '.join(registered_task_names())}")


def _shared_num_classes(models: Mapping[str, str], infos: Mapping[str, dict], classes: Sequence[str]) -> int:
    """The number of classes every model was trained on, checked against the tables' vocabulary."""
    num_classes = None
    for name, info in infos.items():
        if classes and info.get("classes") and list(info["classes"]) != list(classes):
            raise ValueError(f"{name} ({models[name]}) was trained on classes {info['classes']} but the tables "
                             f"have {list(classes)}")
        if classes and len(classes) != int(info["num_classes"]):
            raise ValueError(f"{name} ({models[name]}) has {info['num_classes']} classes, the tables {len(classes)}")
        if num_classes is not None and int(info["num_classes"]) != num_classes:
            raise ValueError(f"the models disagree on the number of classes ({num_classes} vs {info['num_classes']})")
        num_classes = int(info["num_classes"])
    return int(num_classes)


def _plan(models: Mapping[str, str], infos: Mapping[str, dict], paths: Sequence[str],
          counts: Mapping[str, int]) -> tuple[dict[str, tuple[str, list[str]]], dict[str, dict[str, str]]]:
    """``({name: (path, tasks scored)}, {name: {task: why it is skipped}})``: a task is scored when
    the model has a head for it and the tables have labels for it."""
    plan: dict[str, tuple[str, list[str]]] = {}
    skipped: dict[str, dict[str, str]] = {}
    for name, info in infos.items():
        heads = list(info["tasks"])
        skipped[name] = {}
        scored = []
        for t, n in counts.items():
            if t not in heads and n:
                skipped[name][t] = "no head for this task in the model"
            elif t in heads and not n:
                skipped[name][t] = "no labels for this task in the tables"
            elif t in heads:
                scored.append(t)
        if not scored:
            raise ValueError(f"nothing to evaluate for {name}: the model has heads {heads}, the tables {list(paths)} "
                             f"have labels for {[t for t, n in counts.items() if n]}")
        plan[name] = (str(models[name]), scored)
    return plan, skipped


def _score_with_ray(scorer: type, plan, trivial, paths, columns, fields, ec: EvalConfig, device: str):
    """Per-batch metric states from a Ray Data pipeline: read -> conform -> scorer actor pool."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("evaluation with use_ray=True needs ray.init() first (jobs call must_ray.cli.init_ray)")
    lo, hi = ec.actors if ec.actors else _default_actors(ec.num_cpus_per_actor, ec.num_gpus_per_actor)
    parts = []
    for p in paths:
        present = [c for c in columns if c in table_schema(p).names]
        ds = ray.data.read_parquet(p, num_cpus=ec.read_cpus).select_columns(present)
        parts.append(ds.map_batches(Conform(fields=fields), batch_format="pyarrow", batch_size=None,
                                    num_cpus=ec.read_cpus))
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    threads = max(1, int(ec.num_cpus_per_actor)) if ec.num_gpus_per_actor <= 0 else None
    ds = ds.map_batches(
        scorer, fn_constructor_args=(plan, trivial, device, threads),
        batch_size=ec.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=int(lo), max_size=int(hi)),
        num_cpus=ec.num_cpus_per_actor, num_gpus=ec.num_gpus_per_actor or None,
    )
    results, rows, bad = [], 0, 0
    for row in ds.iter_rows():
        results.append((row["key"], pickle.loads(row["states"])))
        rows += int(row["rows"])
        bad += int(row["bad_images"])
    return results, rows, bad


def _score_locally(scorer: type, plan, trivial, paths, columns, fields, ec: EvalConfig, device: str):
    """The same per-batch metric states, computed in this process (small tables, debugging)."""
    local = scorer(plan, trivial, device=device)
    results, rows, bad = [], 0, 0
    for batch in iter_table_batches(paths, columns, ec.batch_size, fields):
        key, n, b, states = local.score(batch)
        results.append((key, states))
        rows += n
        bad += b
    return results, rows, bad


def _task_result(task: Task, metrics: Mapping[str, float], trivial: Mapping[str, float], labelled: int) -> dict:
    value = metrics[task.primary_metric]
    base = trivial[task.primary_metric]
    return {
        "primary_metric": task.primary_metric,
        "higher_is_better": bool(task.higher_is_better),
        "value": value,
        "trivial_value": base,
        "beats_trivial": beats(value, base, task.higher_is_better),
        "labelled_rows": labelled,
        "metrics": dict(metrics),
        "trivial": dict(trivial),
    }


def evaluate_model(model_path: str, table_paths: str | Sequence[str], ec: Optional[EvalConfig] = None, *,
                   name: Optional[str] = None, device: str = "auto", scorer: Optional[type] = None) -> dict[str, Any]:
    """Score the model file ``model_path`` on the examples tables ``table_paths``.

    Tasks scored: those the model has a head for, the tables have labels for, and (if given) are in
    ``ec.tasks``; the others are listed under ``skipped`` with the reason. ``ec.use_ray``: a Ray
    Data pipeline with an actor pool (``ec.actors`` = [min, max], default 1..what the cluster
    holds) that ships only per-batch metric states to the driver; ``False``: the same scorer in
    this process. The trivial baseline is fitted on the first ``ec.trivial_fit_rows`` labelled rows
    per task (the whole table when it is smaller) and scored on every row.

    Returns ``{"model", "name", "sha256", "backbone", "model_tasks", "tables", "rows",
    "bad_images", "tasks": {task: {"primary_metric", "higher_is_better", "value",
    "trivial_value", "beats_trivial", "labelled_rows", "metrics", "trivial"}}, "skipped",
    "trivial_fit", "batch_size", "use_ray", "wall_s", "images_per_s"}``."""
    name = name or os.path.splitext(os.path.basename(str(model_path)))[0]
    return evaluate_models({name: model_path}, table_paths, ec, device=device, scorer=scorer)[name]
