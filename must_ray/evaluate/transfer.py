"""Transfer evaluation: how good is a *frozen* representation on data it was not trained on?

MuST's claim is about representations, not only pseudo-label fidelity. Here each backbone (the
student's, each teacher's, and a random initialisation of the same architecture) is frozen, its
features are extracted **once** for a small labelled *train* split and a *test* split of a task or
domain it was not trained on (by default the world's ``cluttered`` domain, which no model sees in
training), and a light probe is fitted on the cached features:

* an **image probe** (``Task.probe == "image"``, e.g. classification): every pyramid level
  global-average-pooled and concatenated -> a linear ridge to the task's per-image targets
  (classification: one-hot classes, the scores read as "logits");
* a **pixel probe** (``"pixel"``, e.g. segmentation, depth, normals): all levels bilinearly resized
  to the finest level's grid (stride 4) and concatenated per pixel -> a 1x1-conv probe (= per-pixel
  linear ridge) to the task's per-cell targets (one-hot classes / log-depth / normal vectors),
  fitted on ``pixels_per_image`` random valid pixels per image;
* a task without a light probe (``None``: detection, whose box decoder is not a linear read-out)
  is left out.

What a probe regresses is the task's own business (``Task.probe_target``, in the space of its
head's raw outputs), so a plug-in task with a probe takes part with no change here.

The ridge is closed form (float64 normal equations on standardised features), its strength picked
from a small grid on a held-out quarter of the train images (by image), then refitted on all train
images: deterministic, seeded, seconds on a CPU. Probe outputs go through the task's own
``predict`` (bilinear resize to the image, argmax / exp / normalisation) and metric — the same
scoring code as :mod:`must_ray.evaluate.scoring`. The result is a table: rows = backbones, columns =
the transfer tasks' primary metric.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from must_ray import __version__
from must_ray.config import SplitConfig, TransferConfig
from must_ray.evaluate.compare import beats
from must_ray.evaluate.scoring import compute_metrics, score_batch
from must_ray.images import decode_image, resize_rgb
from must_ray.io import dumps_strict, fmt_number, md_table, write_atomic
from must_ray.models import images_to_tensor, load_model
from must_ray.models.export import file_sha256, read_model_header
from must_ray.models.multitask import FPN, build_backbone
from must_ray.progress import ProgressLine, current_tag
from must_ray.table import decode_column, open_table, table_classes, table_files
from must_ray.tasks import Task, build_task, get_task_class, probe_task_names
from must_ray.tasks.base import Crop
from must_ray.typed_config import config_to_dict
from must_ray.world.splits import write_split

DEFAULT_RIDGE = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
RANDOM = "random"
TEST_OFFSET = 50_000  # the transfer test split starts this many scenes after the train split


# ----------------------------------------------------------------------------- data


def load_examples(path: str, tasks: Sequence[str], limit: Optional[int] = None,
                  num_classes: int = 1) -> tuple[list[str], list[np.ndarray], dict[str, list[Any]]]:
    """``(image_ids, uint8 RGB images, {task: labels})`` of an examples table in ``image_id`` order
    (the first ``limit`` ids with a limit; labels ``None`` where a row has none). The order of the
    rows in the files never reaches a probe, so a probe's result depends on the table's content only."""
    ds = open_table(str(path))
    objs = {t: build_task(t, num_classes) for t in tasks}
    cols = ["image_id", "image"] + [f.name for t in tasks for f in objs[t].columns() if f.name in ds.schema.names]
    wanted = None
    if limit:
        ids = ds.to_table(columns=["image_id"]).column("image_id")
        wanted = pc.field("image_id").isin(ids.take(pc.sort_indices(ids)[:limit]))
    table = ds.to_table(columns=cols, filter=wanted).sort_by("image_id")
    images = [decode_image(b) for b in table.column("image").to_pylist()]
    labels = {t: decode_column(objs[t], table) for t in tasks}
    return table.column("image_id").to_pylist(), images, labels


# ----------------------------------------------------------------------------- encoders


class Encoder(torch.nn.Module):
    """A frozen feature extractor: a timm ``features_only`` backbone, optionally with its FPN neck."""

    def __init__(self, backbone: torch.nn.Module, neck: Optional[torch.nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone(x)
        return self.neck(feats) if self.neck is not None else list(feats)


def load_encoder(spec: Optional[str], *, features: str = "backbone", reference: Optional[str] = None,
                 seed: int = 0) -> tuple[Encoder, dict[str, Any]]:
    """A frozen :class:`Encoder` and a description of it.

    ``spec``: a model file (its backbone, plus its FPN with ``features="fpn"``); ``"random"`` /
    ``None``: a random initialisation (seeded) of ``reference``'s architecture (a model file) or of
    ``"random:<timm name>"``."""
    if features not in ("backbone", "fpn"):
        raise ValueError(f"features must be 'backbone' or 'fpn', got {features!r}")
    if spec is None or spec == RANDOM or str(spec).startswith(RANDOM + ":"):
        arch, fpn_channels = None, 64
        if spec and ":" in str(spec):
            arch = str(spec).split(":", 1)[1]
        elif reference:
            ref = read_model_header(reference)
            arch, fpn_channels = ref["backbone"], int(ref.get("fpn_channels", 64))
        if not arch:
            raise ValueError("a random backbone needs an architecture: 'random:<timm name>' or a reference model")
        torch.manual_seed(seed)
        backbone = build_backbone(arch, pretrained=False)
        neck = FPN(backbone.feature_info.channels(), fpn_channels) if features == "fpn" else None
        enc = Encoder(backbone, neck).eval()
        return enc, {"source": f"{RANDOM}:{arch}", "arch": arch, "image_size": None, "sha256": None}
    model, info = load_model(str(spec))
    enc = Encoder(model.backbone, model.neck if features == "fpn" else None).eval()
    return enc, {"source": str(spec), "arch": info["backbone"], "image_size": info.get("image_size"),
                 "sha256": info.get("sha256"), "trained_tasks": list(info["tasks"])}


def extract_features(encoder: Encoder, images: Sequence[np.ndarray], batch_size: int = 64,
                     input_size: Optional[int] = None) -> list[np.ndarray]:
    """Frozen features, one float32 array (N, C, h, w) per pyramid level; images are resized
    (bilinear) to ``input_size`` (default: the first image's size) and normalised as in training."""
    size = int(input_size or np.asarray(images[0]).shape[0])
    levels: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = np.stack([resize_rgb(np.asarray(im), size) for im in images[i:i + batch_size]])
            feats = encoder(images_to_tensor(batch))
            if not levels:
                levels = [[] for _ in feats]
            for lv, f in zip(levels, feats):
                lv.append(f.float().numpy())
    return [np.concatenate(lv) for lv in levels]


def pooled_features(levels: Sequence[np.ndarray]) -> np.ndarray:
    """(N, sum C): every level global-average-pooled and concatenated."""
    return np.concatenate([lv.mean(axis=(2, 3)) for lv in levels], axis=1)


def dense_features(levels: Sequence[np.ndarray]) -> np.ndarray:
    """(N, h0, w0, sum C): every level bilinearly resized to the finest level's grid, concatenated."""
    h0, w0 = levels[0].shape[-2:]
    maps = []
    for lv in levels:
        t = torch.from_numpy(lv)
        if tuple(t.shape[-2:]) != (h0, w0):
            t = F.interpolate(t, size=(h0, w0), mode="bilinear", align_corners=False)
        maps.append(t)
    return torch.cat(maps, dim=1).permute(0, 2, 3, 1).contiguous().numpy()


# ----------------------------------------------------------------------------- ridge probe


class RidgeProbe:
    """Closed-form multi-output ridge regression on standardised features (float64)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, weight: np.ndarray, bias: np.ndarray, lam: float):
        self.mean, self.std, self.weight, self.bias, self.lam = mean, std, weight, bias, lam

    def predict(self, x: np.ndarray) -> np.ndarray:
        shape = x.shape[:-1]
        z = (x.reshape(-1, x.shape[-1]).astype(np.float64) - self.mean) / self.std
        return (z @ self.weight + self.bias).reshape(*shape, -1)


def _normal_eq(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return z.T @ z, z.T @ y


def fit_ridge(x: np.ndarray, y: np.ndarray, groups: np.ndarray, lambdas: Sequence[float] = DEFAULT_RIDGE,
              val_fraction: float = 0.25, seed: int = 0) -> RidgeProbe:
    """Ridge ``y ~ x`` (rows = samples). ``lambdas`` are relative to the number of fit rows (the
    standardised features have unit diagonal Gram / row). The strength is chosen by mean squared
    error on a held-out ``val_fraction`` of the ``groups`` (image ids of the rows), then the probe
    is refitted on every row."""
    x = x.astype(np.float64)
    y = y.astype(np.float64).reshape(len(y), -1)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    z = (x - mean) / std
    lam_best = float(lambdas[0])
    uniq = np.unique(groups)
    if len(lambdas) > 1 and len(uniq) >= 4 and 0 < val_fraction < 1:
        rng = np.random.default_rng(seed)
        val_groups = rng.choice(uniq, size=max(1, int(round(len(uniq) * val_fraction))), replace=False)
        val = np.isin(groups, val_groups)
        zf, yf = z[~val], y[~val]
        ym = yf.mean(axis=0)
        gram, zty = _normal_eq(zf - zf.mean(axis=0), yf - ym)
        s, v = np.linalg.eigh(gram)
        s = np.clip(s, 0, None)
        a = (z[val] - zf.mean(axis=0)) @ v
        b = v.T @ zty
        errs = []
        for lam in lambdas:
            pred = (a / (s + lam * len(zf))) @ b + ym
            errs.append(float(((pred - y[val]) ** 2).mean()))
        lam_best = float(lambdas[int(np.argmin(errs))])
    zm, ym = z.mean(axis=0), y.mean(axis=0)
    gram, zty = _normal_eq(z - zm, y - ym)
    weight = np.linalg.solve(gram + lam_best * len(z) * np.eye(gram.shape[0]), zty)
    bias = ym - zm @ weight
    return RidgeProbe(mean, std, weight, bias, lam_best)


# ----------------------------------------------------------------------------- per-task probes


def _no_probe(name: str) -> ValueError:
    return ValueError(f"no light probe for task {name!r}; probe tasks: {', '.join(probe_task_names())}")


def _fit_image_probe(task: Task, train_levels: Sequence[np.ndarray], train_labels: Sequence[Any],
                     lambdas: Sequence[float], val_fraction: float, seed: int) -> tuple[RidgeProbe, int]:
    feats = pooled_features(train_levels)
    rows, ys = [], []
    for i, lab in enumerate(train_labels):
        if lab is None:
            continue
        target, valid = task.probe_target(lab)
        if bool(valid):
            rows.append(i)
            ys.append(target)
    if not rows:
        raise ValueError(f"no labelled images for {task.name} in the transfer train split")
    return fit_ridge(feats[rows], np.stack(ys), np.asarray(rows), lambdas, val_fraction, seed), len(rows)


def _fit_pixel_probe(task: Task, train_levels: Sequence[np.ndarray], train_labels: Sequence[Any],
                     pixels_per_image: int, lambdas: Sequence[float], val_fraction: float,
                     seed: int) -> tuple[RidgeProbe, int]:
    rng = np.random.default_rng(seed)
    feats = dense_features(train_levels)
    grid = feats.shape[1:3]
    xs, ys, gs = [], [], []
    for i, lab in enumerate(train_labels):
        if lab is None:
            continue
        target, valid = task.probe_target(task.augment(lab, Crop(), grid))
        cells = np.flatnonzero(valid.reshape(-1))
        if not len(cells):
            continue
        take = cells if len(cells) <= pixels_per_image else rng.choice(cells, pixels_per_image, replace=False)
        xs.append(feats[i].reshape(-1, feats.shape[-1])[take])
        ys.append(target.reshape(len(valid.reshape(-1)), -1)[take])
        gs.append(np.full(len(take), i))
    if not xs:
        raise ValueError(f"no labelled pixels for {task.name} in the transfer train split")
    probe = fit_ridge(np.concatenate(xs), np.concatenate(ys), np.concatenate(gs), lambdas, val_fraction, seed)
    return probe, int(sum(len(x) for x in xs))


def _pixel_predictions(task: Task, probe: RidgeProbe, test_levels: Sequence[np.ndarray],
                       test_sizes: Sequence[tuple[int, int]]) -> list[Any]:
    out = probe.predict(dense_features(test_levels))  # (N, h, w, K)
    raw = torch.from_numpy(out.astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    preds: list[Any] = [None] * len(test_sizes)
    for hw in sorted(set(test_sizes)):
        idx = [i for i, s in enumerate(test_sizes) if s == hw]
        for i, p in zip(idx, task.predict(raw[idx], hw)):
            preds[i] = p
    return preds


def probe_task(task: Task, train_levels: Sequence[np.ndarray], train_labels: Sequence[Any],
               test_levels: Sequence[np.ndarray], test_labels: Sequence[Any], test_sizes: Sequence[tuple[int, int]],
               *, pixels_per_image: int = 64, lambdas: Sequence[float] = DEFAULT_RIDGE, val_fraction: float = 0.25,
               seed: int = 0) -> dict[str, Any]:
    """Fit ``task``'s probe (``task.probe``: image or pixel, regressing ``task.probe_target``) on
    the train features/labels, turn its outputs into labels with ``task.predict`` and score them
    on the test split with the task's metric. Returns ``{"metrics", "value", "lambda", "train_samples"}``."""
    if task.probe == "image":
        probe, samples = _fit_image_probe(task, train_levels, train_labels, lambdas, val_fraction, seed)
        logits = torch.from_numpy(probe.predict(pooled_features(test_levels)).astype(np.float32))
        preds = task.predict(logits, test_sizes[0]) if len(logits) else []
    elif task.probe == "pixel":
        probe, samples = _fit_pixel_probe(task, train_levels, train_labels, pixels_per_image, lambdas,
                                          val_fraction, seed)
        preds = _pixel_predictions(task, probe, test_levels, test_sizes)
    else:
        raise _no_probe(task.name)
    tasks = {task.name: task}
    metrics = compute_metrics(tasks, score_batch(tasks, {task.name: preds}, {task.name: list(test_labels)}))[task.name]
    return {"metrics": metrics, "value": metrics[task.primary_metric], "lambda": probe.lam, "train_samples": samples}


# ----------------------------------------------------------------------------- the table


def transfer_evaluate(backbones: Mapping[str, Optional[str]], train_table: str, test_table: str,
                      tc: Optional[TransferConfig] = None, *, domain: Optional[str] = None,
                      max_train: Optional[int] = None, max_test: Optional[int] = None,
                      num_classes: Optional[int] = None) -> dict[str, Any]:
    """The transfer table: for each backbone (``{row name: model file or "random" /
    "random:<timm name>"}``; a bare ``"random"`` copies the architecture of the first model file),
    fit each task's probe on ``train_table`` and score it on ``test_table``.

    ``tc``: the probe settings (``tasks``, ``features``, ``pixels_per_image``, ``ridge``,
    ``val_fraction``, ``seed``, ``batch_size``; default ``TransferConfig()``; with ``cache_dir``, a
    row already probed for the same backbone file, settings and table bytes is read from there);
    its ``tasks`` default to every registered task with a light probe (``Task.probe``), and only
    tasks with labels in both tables are probed. ``domain`` is recorded in the result. Returns
    ``{"tasks", "columns": {task: primary metric}, "higher_is_better": {task: bool}, "rows": [{
    "backbone", "source", "values": {task: primary}, "metrics": {task: {...}}, "lambda",
    "extract_s"}], "best": {task: row name}, "train_table", "test_table", "train_rows",
    "test_rows", "probe": {...}, "wall_s"}``."""
    start = time.time()
    tc = tc or TransferConfig()
    if not backbones:
        raise ValueError("transfer_evaluate needs at least one backbone")
    classes = table_classes([train_table, test_table], required=False)
    if num_classes is None:
        if not classes:
            raise ValueError("the transfer tables record no class vocabulary; pass num_classes")
        num_classes = len(classes)
    wanted = list(tc.tasks) or list(probe_task_names())
    for t in wanted:
        if not get_task_class(t).probe:
            raise _no_probe(t)
    _, train_images, train_labels = load_examples(train_table, wanted, max_train, num_classes)
    _, test_images, test_labels = load_examples(test_table, wanted, max_test, num_classes)
    probed = [t for t in wanted if any(lab is not None for lab in train_labels[t])
              and any(lab is not None for lab in test_labels[t])]
    if not probed:
        raise ValueError(f"no task of {wanted} has labels in both {train_table} and {test_table}")
    task_objs = {t: build_task(t, num_classes) for t in probed}
    train = (train_images, {t: train_labels[t] for t in probed})
    test = (test_images, {t: test_labels[t] for t in probed})
    reference = next((s for s in backbones.values() if s and not str(s).startswith(RANDOM)), None)
    line = ProgressLine(current_tag("transfer"), len(backbones), "backbones", every_s=0.0)
    inputs = {"tables": [_table_digest(train_table), _table_digest(test_table)], "tasks": probed,
              "num_classes": num_classes, "max": [max_train, max_test]}
    rows = []
    for name, spec in backbones.items():
        key = _row_key(spec, reference, tc, inputs) if tc.cache_dir else None
        row = _cached_row(tc.cache_dir, key) if key else None
        cached = row is not None
        if row is None:
            row = _probe_backbone(name, spec, reference, task_objs, train, test, tc)
            if key:
                os.makedirs(tc.cache_dir, exist_ok=True)
                write_atomic(os.path.join(tc.cache_dir, f"{key}.json"), dumps_strict(row))
        rows.append({**row, "backbone": name, "cached": cached})
        line.update(len(rows), extra=f" ({name} {'from the cache' if cached else 'probed'})")
    return {
        "tasks": probed,
        "columns": {t: task_objs[t].primary_metric for t in probed},
        "higher_is_better": {t: bool(task_objs[t].higher_is_better) for t in probed},
        "rows": rows,
        "best": _best_rows(rows, task_objs),
        "train_table": str(train_table), "test_table": str(test_table), "domain": domain,
        "train_rows": len(train_images), "test_rows": len(test_images),
        "probe": {"features": tc.features, "kind": "ridge", "pixels_per_image": tc.pixels_per_image,
                  "lambdas": list(tc.ridge), "val_fraction": tc.val_fraction, "seed": tc.seed},
        "wall_s": round(time.time() - start, 3),
    }


def _table_digest(path: str) -> str:
    """A hash of a local table's bytes (its Parquet files in order); a URI table by its name."""
    if "://" in str(path):
        return str(path)
    _, files = table_files(str(path))
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def _row_key(spec: Optional[str], reference: Optional[str], tc: TransferConfig, inputs: Mapping[str, Any]) -> str:
    """What a transfer row is a function of: the backbone (its file's bytes; a random one by its
    architecture source and seed), the probe settings and the tables' bytes."""
    random = spec is None or spec == RANDOM or str(spec).startswith(RANDOM + ":")
    if not random:
        backbone: dict[str, Any] = {"file": file_sha256(str(spec))}
    else:
        ref = read_model_header(reference) if reference and ":" not in str(spec or "") else {}
        backbone = {"random": str(spec), "arch": ref.get("backbone"), "fpn_channels": ref.get("fpn_channels")}
    settings = {k: v for k, v in config_to_dict(tc).items() if k != "cache_dir"}
    payload = {"backbone": backbone, "settings": settings, "inputs": inputs, "version": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _cached_row(cache_dir: str, key: str) -> Optional[dict[str, Any]]:
    path = os.path.join(cache_dir, f"{key}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _probe_backbone(name: str, spec: Optional[str], reference: Optional[str], task_objs: Mapping[str, Task],
                    train: tuple, test: tuple, tc: TransferConfig) -> dict[str, Any]:
    """One row of the transfer table: ``spec``'s frozen features of both splits, every task's probe."""
    t0 = time.time()
    (train_images, train_labels), (test_images, test_labels) = train, test
    enc, desc = load_encoder(spec, features=tc.features, reference=reference, seed=tc.seed)
    size = desc.get("image_size")
    train_levels = extract_features(enc, train_images, tc.batch_size, size)
    test_levels = extract_features(enc, test_images, tc.batch_size, size)
    extract_s = time.time() - t0
    test_sizes = [tuple(int(s) for s in im.shape[:2]) for im in test_images]
    row: dict[str, Any] = {"backbone": name, **desc, "values": {}, "metrics": {}, "lambda": {},
                           "extract_s": round(extract_s, 3)}
    for t, task in task_objs.items():
        res = probe_task(copy.deepcopy(task), train_levels, train_labels[t], test_levels, test_labels[t],
                         test_sizes, pixels_per_image=tc.pixels_per_image, lambdas=tc.ridge,
                         val_fraction=tc.val_fraction, seed=tc.seed)
        row["values"][t] = res["value"]
        row["metrics"][t] = res["metrics"]
        row["lambda"][t] = res["lambda"]
    row["fit_s"] = round(time.time() - t0 - extract_s, 3)
    return row


def _best_rows(rows: Sequence[Mapping[str, Any]], task_objs: Mapping[str, Task]) -> dict[str, str]:
    """``{task: the backbone with the best probe}`` (the first of any ties; NaN values never win)."""
    best = {}
    for t, task in task_objs.items():
        vals = [r["values"][t] for r in rows if not math.isnan(r["values"][t])]
        if vals:
            top = max(vals) if task.higher_is_better else min(vals)
            best[t] = next(r["backbone"] for r in rows if r["values"][t] == top)
    return best


def beats_all(result: Mapping[str, Any], name: str, against: Optional[Sequence[str]] = None) -> dict[str, bool]:
    """Per task: does row ``name`` strictly beat every row in ``against`` (default: every other row)?"""
    rows = {r["backbone"]: r for r in result["rows"]}
    if name not in rows:
        raise KeyError(f"no transfer row named {name!r}; rows: {list(rows)}")
    others = [n for n in (against if against is not None else rows) if n != name and n in rows]
    out = {}
    for t in result["tasks"]:
        hib = result["higher_is_better"][t]
        out[t] = all(beats(rows[name]["values"][t], rows[o]["values"][t], hib) for o in others)
    return out


def student_vs_teachers(result: Mapping[str, Any]) -> Optional[dict[str, bool]]:
    """Per task: does the ``student`` backbone strictly beat every ``teacher_*`` backbone? MuST's
    representation claim, read off the transfer table; ``None`` without a student or teacher row."""
    names = [r["backbone"] for r in result["rows"]]
    teachers = [n for n in names if n.startswith("teacher_")]
    return beats_all(result, "student", teachers) if "student" in names and teachers else None


def transfer_markdown(result: Mapping[str, Any]) -> str:
    """The transfer table as Markdown (rows = backbones, columns = each task's primary metric, the
    best value per column in bold)."""
    tasks = result["tasks"]
    header = ["backbone"] + [f"{t} {result['columns'][t]} {'↑' if result['higher_is_better'][t] else '↓'}"
                             for t in tasks]
    rows = {r["backbone"]: r for r in result["rows"]}
    top = {t: rows[b]["values"][t] for t, b in result["best"].items()}
    body = []
    for r in result["rows"]:
        cells = [r["backbone"]]
        for t in tasks:
            v = fmt_number(r["values"][t])
            cells.append(f"**{v}**" if t in top and r["values"][t] == top[t] else v)  # ties all bold
        body.append(cells)
    where = f" (domain `{result['domain']}`)" if result.get("domain") else ""
    probe = result["probe"]
    verdict = student_vs_teachers(result)
    tail = ""
    if verdict is not None:
        won, lost = [t for t, v in verdict.items() if v], [t for t, v in verdict.items() if not v]
        tail = (f"\nStudent backbone vs every teacher backbone: beats them all on "
                f"{', '.join(won) or 'no task'}" + (f"; not on {', '.join(lost)}" if lost else "") + ".\n")
    return (f"# Transfer{where}\n\nFrozen {probe['features']} features, {probe['kind']} probes fitted on "
            f"`{result['train_table']}` ({result['train_rows']} images), scored on `{result['test_table']}` "
            f"({result['test_rows']} images).\n\n" + md_table(header, body) + "\n" + tail)


def write_transfer(out_dir: str, result: Mapping[str, Any]) -> dict[str, str]:
    """Write ``<out_dir>/transfer.json`` (strict JSON) and ``<out_dir>/transfer.md``."""
    json_path = os.path.join(out_dir, "transfer.json")
    md_path = os.path.join(out_dir, "transfer.md")
    payload = dict(result, student_beats_teachers=student_vs_teachers(result))
    write_atomic(json_path, dumps_strict(payload, indent=2, sort_keys=True) + "\n")
    write_atomic(md_path, transfer_markdown(result))
    return {"transfer_json": json_path, "transfer_md": md_path}


# ----------------------------------------------------------------------------- world splits


def transfer_splits(cfg) -> dict[str, Any]:
    """The two world splits of ``cfg.transfer`` (``transfer_train``, ``transfer_test``) as
    :class:`~must_ray.config.SplitConfig`: the configured domain, disjoint seed offsets, ground truth
    of the probed tasks. A split of that name in ``cfg.world.splits`` wins."""
    tc = cfg.transfer
    out = {}
    for name, num, offset in (("transfer_train", tc.train_num, tc.seed_offset),
                              ("transfer_test", tc.test_num, tc.seed_offset + TEST_OFFSET)):
        out[name] = cfg.world.splits.get(name) or SplitConfig(num=num, seed_offset=offset, tasks=list(tc.tasks),
                                                              domain=tc.domain)
    return out


def make_transfer_tables(cfg, out_dir: Optional[str] = None) -> dict[str, str]:
    """Render the transfer splits (:func:`transfer_splits`) as examples tables under ``out_dir``
    (default ``<paths.root>/<paths.world>``) with Ray Data; returns ``{"train": path, "test": path}``."""

    out_dir = out_dir or cfg.paths.resolve("world")
    c = copy.deepcopy(cfg)
    splits = transfer_splits(cfg)
    c.world.splits.update(splits)
    paths = {}
    for key, name in (("train", "transfer_train"), ("test", "transfer_test")):
        path = os.path.join(out_dir, name)
        write_split(c, name, path)
        paths[key] = path
    return paths


def run_transfer(cfg, backbones: Mapping[str, Optional[str]], train_table: Optional[str] = None,
                 test_table: Optional[str] = None) -> dict[str, Any]:
    """:func:`transfer_evaluate` with the knobs of ``cfg.transfer`` (tables default to
    ``cfg.transfer.train_data``/``test_data``, else the rendered transfer splits)."""
    tc = cfg.transfer
    train_table = train_table or tc.train_data
    test_table = test_table or tc.test_data
    if not train_table or not test_table:
        made = make_transfer_tables(cfg)
        train_table, test_table = train_table or made["train"], test_table or made["test"]
    if tc.random_backbone and not any(str(s).startswith(RANDOM) or s is None for s in backbones.values()):
        backbones = {**backbones, RANDOM: RANDOM}
    return transfer_evaluate(backbones, train_table, test_table, tc, domain=None if tc.train_data else tc.domain)


__all__ = [
    "Encoder", "RidgeProbe", "beats_all", "dense_features", "extract_features", "fit_ridge",
    "load_encoder", "load_examples", "make_transfer_tables", "pooled_features", "probe_task", "run_transfer",
    "transfer_evaluate", "transfer_markdown", "transfer_splits", "write_transfer",
]
