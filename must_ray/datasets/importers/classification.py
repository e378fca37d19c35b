"""Classification importers: an ImageFolder tree, or a CSV / JSON list of (path, label).

* ``imagefolder``: ``ROOT/<class_name>/.../<image>`` (torchvision's layout). Classes are the
  class folder names, sorted (or ``--classes`` to fix the order; every folder must be in it).
  Files directly under ``ROOT`` and non-image files are ignored and counted.
* ``csv``: a CSV file with a header; ``--path-column`` (default ``path``) and ``--label-column``
  (default ``label``). ``json``: a JSON array of objects (or JSON Lines, one object per line)
  with the same keys. Paths are relative to ``--images`` (default: the list file's folder) unless
  absolute. Labels are class names or integer ids (not mixed). Names: the vocabulary is
  ``--classes`` if given, else the sorted distinct names. Ids: ``--classes`` names them (an id
  must be < its length), else the names are ``"0" .. "max id"``.

The label is ground truth: ``cls_label`` = the class id, top-k = ``[id]`` with probability 1.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Optional

from must_ray.datasets.importers.common import (
    IMAGE_EXTENSIONS,
    DatasetError,
    ImportPlan,
    absolute,
    is_dir,
    join,
    list_files,
    parse_classes,
    read_bytes,
)


def build_label(record: dict, height: int, width: int, options: dict) -> Any:
    return {"label": int(record["ann"])}


def plan_imagefolder(images: str, classes: Optional[str] = None, id_prefix: str = "") -> ImportPlan:
    """``images``: the ImageFolder root."""
    if not images:
        raise DatasetError("imagefolder: --images ROOT is required")
    root = absolute(images)
    if not is_dir(root):
        raise DatasetError(f"imagefolder: {root} is not a directory")
    files = list_files(root)
    folders = sorted({f.split("/", 1)[0] for f in files if "/" in f})
    names = parse_classes(classes)
    if names is None:
        names = folders
    else:
        extra = [f for f in folders if f not in names]
        if extra:
            raise DatasetError(f"imagefolder {root}: class folders {extra} are not in --classes")
    if not names:
        raise DatasetError(f"imagefolder {root}: no class folders (expected ROOT/<class_name>/<image>)")
    index = {n: i for i, n in enumerate(names)}
    records, ignored = [], 0
    per_class = {n: 0 for n in names}
    for rel in files:
        if "/" not in rel or os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            ignored += 1
            continue
        cls = rel.split("/", 1)[0]
        per_class[cls] += 1
        records.append({"image_id": id_prefix + rel, "path": join(root, rel), "ann": str(index[cls])})
    if not records:
        raise DatasetError(f"imagefolder {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in class folders")
    empty = [n for n, c in per_class.items() if c == 0]
    return ImportPlan(
        format="imagefolder", task="classification", records=records, build_label=build_label, classes=list(names),
        provenance={"source": root}, counts={"files_ignored": ignored, "empty_classes": len(empty)},
    )


def _read_list(path: str, fmt: str, path_column: str, label_column: str) -> list[tuple[int, str, Any]]:
    """(line/entry number, path, label) from a CSV or JSON list; DatasetError names the file."""
    try:
        text = read_bytes(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{fmt}: annotation file not found: {path}") from None
    entries: list[tuple[int, str, Any]] = []
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        cols = reader.fieldnames or []
        for col in (path_column, label_column):
            if col not in cols:
                raise DatasetError(f"{path}: no column {col!r} in the header {cols} "
                                   f"(set --path-column / --label-column)")
        for row in reader:
            line = reader.line_num
            entries.append((line, (row[path_column] or "").strip(), (row[label_column] or "").strip()))
    else:
        stripped = text.lstrip()
        try:
            if stripped.startswith("["):
                items = list(enumerate(json.loads(text), start=1))
            else:  # JSON Lines
                items = [(i, json.loads(ln)) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: not valid JSON / JSON Lines: {exc}") from None
        for i, item in items:
            if not isinstance(item, dict) or path_column not in item or label_column not in item:
                raise DatasetError(f"{path}: entry {i} must be an object with keys {path_column!r} and "
                                   f"{label_column!r}, got {str(item)[:100]}")
            entries.append((i, str(item[path_column]).strip(), item[label_column]))
    for i, p, lab in entries:
        if not p:
            raise DatasetError(f"{path}: entry {i} has an empty path")
        if lab is None or lab == "":
            raise DatasetError(f"{path}: entry {i} ({p}) has an empty label")
    if not entries:
        raise DatasetError(f"{path}: no entries")
    return entries


def _as_int(label: Any) -> Optional[int]:
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label)
    return None


def plan_list(annotations: str, fmt: str = "csv", images: Optional[str] = None, classes: Optional[str] = None,
              path_column: str = "path", label_column: str = "label", id_prefix: str = "") -> ImportPlan:
    """``annotations``: the CSV / JSON list file; ``images``: root of relative paths."""
    if not annotations:
        raise DatasetError(f"{fmt}: --annotations LIST_FILE is required")
    ann = absolute(annotations)
    root = absolute(images) if images else os.path.dirname(ann)
    if not is_dir(root):
        raise DatasetError(f"{fmt}: image folder {root} is not a directory (set --images)")
    entries = _read_list(ann, fmt, path_column, label_column)
    names = parse_classes(classes)
    ints = [_as_int(lab) for _, _, lab in entries]
    if all(v is not None for v in ints):
        top = max(ints)
        if names is None:
            names = [str(i) for i in range(top + 1)]
        for (line, p, _), v in zip(entries, ints):
            if not 0 <= v < len(names):
                raise DatasetError(f"{ann}: entry {line} ({p}) has class id {v}, outside [0, {len(names)})")
        ids = ints
    else:
        labels = [str(lab) for _, _, lab in entries]
        if names is None:
            names = sorted(set(labels))
        index = {n: i for i, n in enumerate(names)}
        ids = []
        for (line, p, _), lab in zip(entries, labels):
            if lab not in index:
                raise DatasetError(f"{ann}: entry {line} ({p}) has class {lab!r}, not in the class list "
                                   f"({len(names)} classes)")
            ids.append(index[lab])
    records = [{"image_id": id_prefix + p, "path": join(root, p), "ann": str(i)} for (_, p, _), i in zip(entries, ids)]
    records.sort(key=lambda r: r["image_id"])
    return ImportPlan(format=fmt, task="classification", records=records, build_label=build_label,
                      classes=list(names), provenance={"source": ann, "image_root": root})
