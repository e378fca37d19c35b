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
import json
import math
import os
import pickle
import time
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa

from must_ray.tasks import Task, registered_task_names
from must_ray.tasks.base import Crop, resize_nearest

DEFAULT_BATCH_SIZE = 64
TRIVIAL_FIT_ROWS = 4096
DEFAULT_TOLERANCE = 0.02
METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"


# ----------------------------------------------------------------------------- strict JSON


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` and numpy scalars/arrays turned into
    Python values, so ``json.dumps(..., allow_nan=False)`` accepts it (depth's ``abs_rel`` is inf
    when nothing was scored; JSON has no inf)."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (see :func:`strict_json`)."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- tables (driver side)


def _as_list(paths: str | Sequence[str]) -> list[str]:
    return [paths] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]


def _dataset(path: str):
    import pyarrow.dataset as pads

    return pads.dataset(str(path), format="parquet")


def _schema(path: str) -> pa.Schema:
    import pyarrow.parquet as pq

    ds = _dataset(path)
    files = sorted(ds.files)
    if not files:
        raise FileNotFoundError(f"no Parquet files in {path}")
    return pq.read_schema(files[0], filesystem=ds.filesystem)


def table_classes(paths: Sequence[str]) -> list[str]:
    """The class vocabulary recorded in the tables' provenance (``[]`` when none records one)."""
    from must_ray.schema import read_provenance

    for p in paths:
        classes = read_provenance(_schema(p)).get("classes")
        if classes:
            return list(classes)
    return []


def labelled_rows(path: str, column: str) -> int:
    """Rows of table ``path`` whose ``column`` is non-null (0 when the table lacks it). Read from
    the Parquet footers' null counts when they are there (no data read)."""
    import pyarrow.parquet as pq

    ds = _dataset(path)
    if column not in ds.schema.names:
        return 0
    total = 0
    for f in sorted(ds.files):
        md = pq.ParquetFile(f, filesystem=ds.filesystem).metadata
        counted: Optional[int] = 0
        for rg in range(md.num_row_groups):
            group = md.row_group(rg)
            # flat columns only: a list column's footer stats describe its leaf elements
            col = next((group.column(j) for j in range(group.num_columns)
                        if group.column(j).path_in_schema == column), None)
            stats = col.statistics if col is not None else None
            if stats is None or not stats.has_null_count:
                counted = None
                break
            counted += group.num_rows - stats.null_count
        if counted is None:
            arr = pq.read_table(f, columns=[column], filesystem=ds.filesystem).column(column)
            counted = len(arr) - arr.null_count
        total += counted
    return int(total)


def iter_table_batches(paths: Sequence[str], columns: Sequence[str], batch_size: int,
                       fields: Optional[Sequence[pa.Field]] = None) -> Iterator[pa.Table]:
    """Batches of exactly ``batch_size`` rows (the last of each file may be shorter) of every file of
    every table, in sorted file order; missing ``fields`` are added as nulls (the local twin of the
    Ray Data read in :func:`evaluate_model`)."""
    import pyarrow.parquet as pq

    for path in paths:
        ds = _dataset(path)
        names = ds.schema.names
        cols = [c for c in columns if c in names]
        for f in sorted(ds.files):
            pending: list[pa.RecordBatch] = []
            n = 0
            for rb in pq.ParquetFile(f, filesystem=ds.filesystem).iter_batches(batch_size=batch_size, columns=cols):
                pending.append(rb)
                n += rb.num_rows
                while n >= batch_size:
                    table = pa.Table.from_batches(pending)
                    yield _with_fields(table.slice(0, batch_size), fields)
                    rest = table.slice(batch_size)
                    pending, n = rest.to_batches(), rest.num_rows
            if n:
                yield _with_fields(pa.Table.from_batches(pending), fields)


def _with_fields(table: pa.Table, fields: Optional[Sequence[pa.Field]]) -> pa.Table:
    """``table`` with every field of ``fields`` (cast to its type; missing ones all-null)."""
    table = table.combine_chunks()
    if not fields:
        return table
    names, arrays = [], []
    for c in table.column_names:
        if c not in {f.name for f in fields}:
            names.append(c)
            arrays.append(table.column(c))
    for f in fields:
        names.append(f.name)
        if f.name in table.column_names:
            col = table.column(f.name)
            arrays.append(col if col.type.equals(f.type) else col.cast(f.type))
        else:
            arrays.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, names=names)


class _AddFields:
    """Ray Data batch function: add missing task columns as nulls (same schema for every table)."""

    def __init__(self, fields: Sequence[pa.Field]):
        self.fields = list(fields)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _with_fields(batch, self.fields).replace_schema_metadata(None)


def decode_column(task: Task, batch: pa.Table) -> list[Any]:
    """The task's labels for every row of ``batch`` (``None`` where the presence cell is null or the
    batch lacks the task's columns)."""
    cols = [f.name for f in task.columns()]
    n = batch.num_rows
    if cols[0] not in batch.column_names or batch.column(cols[0]).null_count == n:
        return [None] * n
    cells = {c: (batch.column(c).to_pylist() if c in batch.column_names else [None] * n) for c in cols}
    return [None if cells[cols[0]][i] is None else task.decode({c: cells[c][i] for c in cols}) for i in range(n)]


def read_labels(paths: Sequence[str], task: Task, limit: Optional[int] = None) -> list[Any]:
    """The first ``limit`` labels of ``task`` found in the tables (rows without a label skipped)."""
    import pyarrow.dataset as pads

    out: list[Any] = []
    cols = [f.name for f in task.columns()]
    for path in paths:
        ds = _dataset(path)
        present = [c for c in cols if c in ds.schema.names]
        if cols[0] not in present:
            continue
        for rb in ds.to_batches(columns=present, filter=pads.field(cols[0]).is_valid()):
            out.extend(lab for lab in decode_column(task, pa.Table.from_batches([rb])) if lab is not None)
            if limit is not None and len(out) >= limit:
                return out[:limit]
    return out


# ----------------------------------------------------------------------------- scoring (shared)


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
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def predict_labels(model, tasks: Mapping[str, Task], images: Sequence[np.ndarray], input_size: Optional[int] = None,
                   device: str = "cpu") -> dict[str, list[Any]]:
    """Labels predicted by ``model`` for uint8 RGB ``images`` (any sizes): each image is resized
    (bilinear) to ``input_size`` (square; ``None`` = the first image's size), the model runs once on
    the batch, and every task's ``predict`` post-processes its outputs back at each image's own size
    (so dense predictions align with that image's ground truth)."""
    import torch

    from must_ray.images import resize_rgb
    from must_ray.models import images_to_tensor

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
        import torch

        from must_ray.models import load_model

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
        from must_ray.images import BadImageError, decode_image

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


def _model_info(model_path: str) -> dict[str, Any]:
    """The model file's header (tasks, classes, sizes) without building the network."""
    import torch

    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"model file not found: {model_path}")
    payload = torch.load(model_path, map_location="cpu", weights_only=True)
    from must_ray.models.export import FORMAT

    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{model_path} is not a must-ray model file (expected format {FORMAT!r})")
    return {k: v for k, v in payload.items() if k != "state_dict"}


def _default_actors(num_cpus: float, num_gpus: float) -> tuple[int, int]:
    import ray

    res = ray.cluster_resources()
    if num_gpus > 0:
        most = int(res.get("GPU", 0) // num_gpus)
    else:
        # keep a little CPU for the read tasks
        most = int(max(0.0, res.get("CPU", 1) - 0.5) // max(num_cpus, 1e-3))
    return 1, max(1, most)


def evaluate_models(models: Mapping[str, str], table_paths: str | Sequence[str],
                    tasks: Optional[Sequence[str]] = None, batch_size: int = DEFAULT_BATCH_SIZE, use_ray: bool = True,
                    *, actors: Optional[Sequence[int]] = None, num_cpus_per_actor: float = 1.0,
                    num_gpus_per_actor: float = 0.0, read_cpus: float = 0.25, device: str = "auto",
                    trivial_fit_rows: int = TRIVIAL_FIT_ROWS, scorer: type = None) -> dict[str, dict[str, Any]]:
    """Score several model files (``{name: path}``) on the examples tables in **one** pass (each
    image is read and decoded once, every model runs on it); returns ``{name: result}`` with the
    same result as :func:`evaluate_model`. ``scorer``: the :class:`BatchScorer` class to use (a
    subclass must be importable on the workers)."""
    from must_ray.models import file_sha256
    from must_ray.schema import task_fields
    from must_ray.tasks import build_task

    start = time.time()
    scorer = scorer or BatchScorer
    paths = _as_list(table_paths)
    if not paths:
        raise ValueError("no evaluation tables given")
    if not models:
        raise ValueError("no models to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tasks is not None:
        unknown = [t for t in tasks if t not in registered_task_names()]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {', '.join(registered_task_names())}")
    classes = table_classes(paths)
    infos = {name: _model_info(str(path)) for name, path in models.items()}
    num_classes = None
    for name, info in infos.items():
        if classes and info.get("classes") and list(info["classes"]) != classes:
            raise ValueError(f"{name} ({models[name]}) was trained on classes {info['classes']} but the tables "
                             f"have {classes}")
        if classes and len(classes) != int(info["num_classes"]):
            raise ValueError(f"{name} ({models[name]}) has {info['num_classes']} classes, the tables {len(classes)}")
        if num_classes is not None and int(info["num_classes"]) != num_classes:
            raise ValueError(f"the models disagree on the number of classes ({num_classes} vs {info['num_classes']})")
        num_classes = int(info["num_classes"])

    wanted = [t for t in registered_task_names() if tasks is None or t in tasks]
    task_objs = {t: build_task(t, int(num_classes)) for t in wanted}
    counts = {t: sum(labelled_rows(p, task_objs[t].presence_column()) for p in paths) for t in wanted}
    plan: dict[str, tuple[str, list[str]]] = {}
    skipped: dict[str, dict[str, str]] = {}
    for name, info in infos.items():
        heads = list(info["tasks"])
        skipped[name] = {}
        scored = []
        for t in wanted:
            if t not in heads and counts[t]:
                skipped[name][t] = "no head for this task in the model"
            elif t in heads and not counts[t]:
                skipped[name][t] = "no labels for this task in the tables"
            elif t in heads:
                scored.append(t)
        if not scored:
            raise ValueError(f"nothing to evaluate for {name}: the model has heads {heads}, the tables {paths} "
                             f"have labels for {[t for t, n in counts.items() if n]}")
        plan[name] = (str(models[name]), scored)
    union = [t for t in wanted if any(t in s for _, s in plan.values())]
    trivial = {t: TrivialBaseline(task_objs[t], read_labels(paths, task_objs[t], trivial_fit_rows)) for t in union}
    fields = task_fields(union)
    columns = ["image_id", "image"] + [f.name for f in fields]

    results: list[tuple[str, dict]] = []
    rows = bad = 0
    if use_ray:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("evaluation with use_ray=True needs ray.init() first (jobs call must_ray.cli.init_ray)")
        lo, hi = actors if actors else _default_actors(num_cpus_per_actor, num_gpus_per_actor)
        parts = []
        for p in paths:
            present = [c for c in columns if c in _schema(p).names]
            ds = ray.data.read_parquet(p, columns=present, num_cpus=read_cpus)
            parts.append(ds.map_batches(_AddFields(fields), batch_format="pyarrow", batch_size=None, num_cpus=read_cpus))
        ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
        threads = max(1, int(num_cpus_per_actor)) if num_gpus_per_actor <= 0 else None
        ds = ds.map_batches(
            scorer, fn_constructor_args=(plan, trivial, device, threads),
            batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=int(lo), max_size=int(hi)),
            num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor or None,
        )
        for row in ds.iter_rows():
            results.append((row["key"], pickle.loads(row["states"])))
            rows += int(row["rows"])
            bad += int(row["bad_images"])
    else:
        local = scorer(plan, trivial, device=device)
        for batch in iter_table_batches(paths, columns, batch_size, fields):
            key, n, b, states = local.score(batch)
            results.append((key, states))
            rows += n
            bad += b

    union_objs = {t: task_objs[t] for t in union}
    trivial_metrics = compute_metrics(union_objs, merge_states(union_objs, [(k, s["trivial"]) for k, s in results]))
    wall = time.time() - start
    out: dict[str, dict[str, Any]] = {}
    for name, (path, scored) in plan.items():
        objs = {t: task_objs[t] for t in scored}
        metrics = compute_metrics(objs, merge_states(objs, [(k, s["models"][name]) for k, s in results]))
        per_task = {}
        for t in scored:
            task = task_objs[t]
            value = metrics[t][task.primary_metric]
            base = trivial_metrics[t][task.primary_metric]
            per_task[t] = {
                "primary_metric": task.primary_metric,
                "higher_is_better": bool(task.higher_is_better),
                "value": value,
                "trivial_value": base,
                "beats_trivial": beats(value, base, task.higher_is_better),
                "labelled_rows": counts[t],
                "metrics": metrics[t],
                "trivial": trivial_metrics[t],
            }
        out[name] = {
            "model": path,
            "name": name,
            "sha256": file_sha256(path),
            "backbone": infos[name].get("backbone"),
            "model_tasks": list(infos[name]["tasks"]),
            "tables": paths,
            "rows": rows,
            "bad_images": bad,
            "tasks": per_task,
            "skipped": skipped[name],
            "trivial_fit": {t: {"rows": trivial[t].fit_rows, "mode": trivial[t].mode} for t in scored},
            "batch_size": int(batch_size),
            "use_ray": bool(use_ray),
            "models_in_pass": len(plan),
            "wall_s": round(wall, 3),
            "images_per_s": round(rows / wall, 2) if wall > 0 else None,
        }
    return out


def evaluate_model(model_path: str, table_paths: str | Sequence[str], tasks: Optional[Sequence[str]] = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, use_ray: bool = True, *, name: Optional[str] = None,
                   **kwargs: Any) -> dict[str, Any]:
    """Score the model file ``model_path`` on the examples tables ``table_paths``.

    Tasks scored: those the model has a head for, the tables have labels for, and (if given) are in
    ``tasks``; the others are listed under ``skipped`` with the reason. ``use_ray``: a Ray Data
    pipeline with an actor pool (``actors`` = [min, max], default 1..what the cluster holds) that
    ships only per-batch metric states to the driver; ``False``: the same scorer in this process.
    The trivial baseline is fitted on the first ``trivial_fit_rows`` labelled rows per task (the
    whole table when it is smaller) and scored on every row. Other keyword arguments:
    ``actors``, ``num_cpus_per_actor``, ``num_gpus_per_actor``, ``read_cpus``, ``device``,
    ``trivial_fit_rows`` (see :func:`evaluate_models`).

    Returns ``{"model", "name", "sha256", "backbone", "model_tasks", "tables", "rows",
    "bad_images", "tasks": {task: {"primary_metric", "higher_is_better", "value",
    "trivial_value", "beats_trivial", "labelled_rows", "metrics", "trivial"}}, "skipped",
    "trivial_fit", "batch_size", "use_ray", "wall_s", "images_per_s"}``."""
    name = name or os.path.splitext(os.path.basename(str(model_path)))[0]
    return evaluate_models({name: model_path}, table_paths, tasks, batch_size, use_ray, **kwargs)[name]


def beats(value: float, baseline: float, higher_is_better: bool) -> bool:
    """Strictly better than ``baseline`` in the metric's direction (NaN never beats anything)."""
    if value is None or baseline is None or math.isnan(value) or math.isnan(baseline):
        return False
    return value > baseline if higher_is_better else value < baseline


# ----------------------------------------------------------------------------- comparison


def _task_entry(result: Mapping[str, Any], task: str) -> Optional[Mapping[str, Any]]:
    tasks = result.get("tasks", result) if isinstance(result, Mapping) else {}
    entry = tasks.get(task) if isinstance(tasks, Mapping) else None
    return entry if isinstance(entry, Mapping) else None


def _num(v: Any) -> float:
    """A metric value as a float (``None`` -- a non-finite value after strict JSON -- is NaN)."""
    return float("nan") if v is None else float(v)


def passes(student: float, teacher: float, higher_is_better: bool, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """MuST's criterion: ``student >= (1 - tol) * teacher`` (higher is better) or
    ``student <= (1 + tol) * teacher`` (lower is better). NaN fails; an infinite student error
    fails; an infinite teacher error is beaten by any finite student error."""
    if math.isnan(student) or math.isnan(teacher):
        return False
    if higher_is_better:
        return student >= (1.0 - tolerance) * teacher
    if math.isinf(student) and student > 0:
        return False  # an infinite error (nothing scored) never passes
    return student <= (1.0 + tolerance) * teacher


def compare(student_metrics: Mapping[str, Any], teacher_metrics: Mapping[str, Mapping[str, Any]],
            tolerance: float = DEFAULT_TOLERANCE) -> list[dict[str, Any]]:
    """Student vs teachers, one row per task in ``teacher_metrics`` (``{task: that task's teacher's
    evaluate_model result}``; bare ``{task: entry}`` maps work too). Each row: ``task``, ``metric``,
    ``higher_is_better``, ``direction`` (``higher``/``lower``), ``student``, ``teacher``, ``ratio``
    (student / teacher; ``None`` when undefined), ``criterion`` (text), ``trivial`` (the student
    table's trivial baseline), ``student_beats_trivial``, ``pass`` (bool). A task the student or
    teacher was not scored on fails with a ``note``."""
    rows = []
    for task in [t for t in registered_task_names() if t in teacher_metrics] + \
            sorted(t for t in teacher_metrics if t not in registered_task_names()):
        s, t = _task_entry(student_metrics, task), _task_entry(teacher_metrics[task], task)
        ref = s or t or {}
        hib = bool(ref.get("higher_is_better", True))
        factor = (1.0 - tolerance) if hib else (1.0 + tolerance)
        row: dict[str, Any] = {
            "task": task, "metric": ref.get("primary_metric"), "higher_is_better": hib,
            "direction": "higher" if hib else "lower",
            "criterion": f"{'>=' if hib else '<='} {factor:.2f} x teacher",
            "student": None, "teacher": None, "ratio": None, "trivial": None, "student_beats_trivial": None,
            "pass": False,
        }
        if s is None or t is None:
            row["note"] = f"{'student' if s is None else 'teacher'} was not scored on {task}"
            rows.append(row)
            continue
        sv, tv = _num(s["value"]), _num(t["value"])
        row.update(student=sv, teacher=tv, trivial=_num(s.get("trivial_value")),
                   student_beats_trivial=bool(s.get("beats_trivial")),
                   ratio=(sv / tv if tv != 0 and math.isfinite(tv) and math.isfinite(sv) else None),
                   **{"pass": passes(sv, tv, hib, tolerance)})
        rows.append(row)
    return rows


def comparison_passed(rows: Sequence[Mapping[str, Any]]) -> bool:
    """True when every compared task passes (and there is at least one)."""
    return bool(rows) and all(r["pass"] for r in rows)


# ----------------------------------------------------------------------------- reports


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells formatted with 4 decimals)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in r) + " |")
    return "\n".join(lines)


def metrics_markdown(results: Mapping[str, Mapping[str, Any]],
                     comparison: Optional[Sequence[Mapping[str, Any]]] = None) -> str:
    """Markdown: the student-vs-teachers table (if any), then one table per model (every metric of
    every scored task, with the trivial baseline's primary metric)."""
    out = ["# Evaluation", ""]
    if comparison:
        verdict = "PASS" if comparison_passed(comparison) else "FAIL"
        out += [f"## Student vs teachers ({verdict})", "",
                md_table(["task", "metric", "better", "student", "teacher", "ratio", "criterion", "trivial", "pass"],
                         [[r["task"], str(r["metric"]), r["direction"], r["student"], r["teacher"], r["ratio"],
                           r["criterion"], r["trivial"], "PASS" if r["pass"] else "FAIL"] for r in comparison]), ""]
    for name, res in results.items():
        tables = ", ".join(f"`{p}`" for p in res.get("tables", []))
        out += [f"## {name}", "", f"`{res.get('model')}` on {tables}: {res.get('rows')} images", ""]
        rows = []
        for task, e in res.get("tasks", {}).items():
            rows.append([task, f"**{e['primary_metric']}**", e["value"], e["trivial_value"],
                         "yes" if e["beats_trivial"] else "no", e["labelled_rows"],
                         ", ".join(f"{k} {_fmt(v)}" for k, v in e["metrics"].items() if k != e["primary_metric"])])
        out += [md_table(["task", "metric", "value", "trivial", "beats trivial", "n", "other metrics"], rows), ""]
        for task, why in res.get("skipped", {}).items():
            out.append(f"- {task}: skipped ({why})")
        if res.get("skipped"):
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_metrics(out_dir: str, results: Mapping[str, Mapping[str, Any]],
                  comparison: Optional[Sequence[Mapping[str, Any]]] = None,
                  extra: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
    """Write ``<out_dir>/metrics.json`` (strict JSON: ``{"models": results, "comparison": rows,
    "passed": bool|null, ...extra}``) and ``<out_dir>/metrics.md``; returns both paths."""
    payload: dict[str, Any] = {"models": dict(results)}
    if comparison is not None:
        payload["comparison"] = list(comparison)
        payload["passed"] = comparison_passed(comparison)
    payload.update(extra or {})
    json_path = os.path.join(out_dir, METRICS_JSON)
    md_path = os.path.join(out_dir, METRICS_MD)
    _write_text(json_path, dumps_strict(payload, indent=2, sort_keys=True) + "\n")
    _write_text(md_path, metrics_markdown(results, comparison))
    return {"metrics_json": json_path, "metrics_md": md_path}


def headline(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Optional[float]]]:
    """``{model name: {task: primary metric value}}`` (strict-JSON-safe), for job summaries."""
    return {name: {t: strict_json(e["value"]) for t, e in res.get("tasks", {}).items()} for name, res in results.items()}


# ----------------------------------------------------------------------------- the evaluate step

MODEL_FILE = "model.pt"  # what must_ray.training exports into each run's out_dir
HISTORY_FILE = "metrics.jsonl"  # the run's training history next to it


def default_models(cfg) -> tuple[Optional[str], dict[str, str]]:
    """The student and teacher model files of a pipeline run that exist on disk:
    ``<paths.root>/<paths.student>/model.pt`` and ``<paths.root>/<paths.teachers>/<task>/model.pt``."""
    student = os.path.join(cfg.paths.resolve("student"), MODEL_FILE)
    teachers = {t: os.path.join(cfg.paths.resolve("teachers"), t, MODEL_FILE) for t in registered_task_names()}
    return (student if os.path.isfile(student) else None), {t: p for t, p in teachers.items() if os.path.isfile(p)}


def teacher_name(task: str) -> str:
    return f"teacher_{task}"


def parse_named_paths(values: Optional[Sequence[str]], flag: str, need_key: bool) -> dict[str, str]:
    """``["NAME=PATH", ...]`` (job flags such as ``--teacher depth=t.pt``) -> ``{NAME: PATH}``; without
    ``need_key`` a bare ``PATH`` is named after its folder. Raises ConfigError on bad or repeated names."""
    from must_ray.config import ConfigError

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


def add_model_flags(parser) -> None:
    """``--student``/``--teacher TASK=PATH``/``--model [NAME=]PATH``: how every job that scores
    or probes models is told which ones."""
    parser.add_argument("--student", metavar="PATH", help="the student's model file")
    parser.add_argument("--teacher", action="append", metavar="TASK=PATH", help="a teacher's model file (repeatable)")
    parser.add_argument("--model", action="append", metavar="[NAME=]PATH",
                        help="any other model file (repeatable; NAME defaults to its folder name)")


def models_from_flags(cfg, args) -> tuple[Optional[str], dict[str, str], dict[str, str]]:
    """``(student, {task: teacher}, {name: model})`` from :func:`add_model_flags`' flags, or the
    run's own trained models when none is given. Raises ConfigError for unknown tasks, no models
    at all, or missing files (before any work starts)."""
    from must_ray.config import ConfigError

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
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{flag}: model file not found: {path}")
    return student, teachers, models


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
    kwargs = dict(tasks=ec.tasks or None, batch_size=ec.batch_size, use_ray=ec.use_ray, actors=ec.actors,
                  num_cpus_per_actor=ec.num_cpus_per_actor, num_gpus_per_actor=ec.num_gpus_per_actor,
                  read_cpus=ec.read_cpus, trivial_fit_rows=ec.trivial_fit_rows)
    results = evaluate_models(named, tables, **kwargs)
    comparison = None
    if student and teachers:
        comparison = compare(results["student"], {t: results[teacher_name(t)] for t in teachers}, ec.tolerance)
    files = write_metrics(out_dir, results, comparison, extra={"data": tables})
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
    from must_ray.report import collect_grid_rows, plot_curves, render_grid

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
    classes = table_classes([table])
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


__all__ = [
    "BatchScorer", "TrivialBaseline", "beats", "compare", "comparison_passed", "compute_metrics", "decode_column",
    "default_models", "dumps_strict", "evaluate_model", "evaluate_models", "headline", "iter_table_batches",
    "labelled_rows", "md_table", "merge_states", "metrics_markdown", "parse_named_paths", "passes", "predict_labels",
    "read_labels",
    "render_pictures", "run_evaluation", "score_batch", "strict_json", "write_metrics",
]
