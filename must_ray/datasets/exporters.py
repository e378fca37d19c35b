"""Export an examples table (typically pseudo labels) back to the formats downstream tools read.

==============  ==============  =============================================================
format          task            output under ``OUT/``
==============  ==============  =============================================================
``coco``        detection       ``coco.json`` (dataset format: images with sizes, categories,
                                annotations with ``bbox`` xywh in pixels *and* ``score``) and
                                ``coco_results.json`` (the results list ``COCOeval.loadRes``
                                takes)
``masks``       segmentation    ``masks/<stem>.png``: palette PNG, VOC convention (value = class
                                index with 0 = background, c + 1 = class c, 255 = ignore), VOC
                                colour map
``depth``       depth           ``depth/<stem>.png``: 16-bit grey PNG, metres / ``depth_scale``,
                                0 = invalid
``normals``     normals         ``normals/<stem>.png``: RGB PNG, ``rgb = (n + 1) * 127.5``
                                (``opengl`` frame, or ``opencv``: y and z negated)
``topk-csv``    classification  ``topk.csv``: ``image_id,rank,class_id,class_name,prob``
==============  ==============  =============================================================

``all`` exports every format whose task the table has; a task of the table that no format exports
(e.g. a plug-in task) is named in the summary's ``not_exported``. Rows without a label for a task (null
presence cell) are left out of that format. Files are named by :func:`file_stem` of the image id;
``files.csv`` maps every exported ``image_id`` to its stem, its COCO image id and the files
written (rows with no label in any exported format are left out). Class names and COCO category
ids come from the table's provenance (``classes``, ``source_class_ids``; ids ``1..C`` when the
table has none, names ``class_<i>`` when it has no vocabulary); ``coco_categories`` (a COCO JSON
or an imported table) maps names to the original COCO ids for tables that lack them, e.g. pseudo
labels of a teacher trained on imported COCO.

COCO JSON and the CSV are assembled in the driver (only the small label columns are read);
the per-image PNG files are written by Ray Data tasks.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from must_ray.datasets.importers.common import (
    DatasetError,
    absolute,
    join,
    read_bytes,
    strip_image_ext,
    write_bytes,
)
from must_ray.datasets.importers.normals import CONVENTIONS, convert_rgb
from must_ray.datasets.importers.voc import voc_palette
from must_ray.images import decode_png, encode_png
from must_ray.table import TableNotFoundError, read_provenance, table_files, tasks_in_schema

EXPORT_FORMATS = ("coco", "masks", "depth", "normals", "topk-csv")
FORMAT_TASK = {"coco": "detection", "masks": "segmentation", "depth": "depth", "normals": "normals",
               "topk-csv": "classification"}
DENSE_FORMATS = ("masks", "depth", "normals")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_STEM = 180


def file_stem(image_id: str) -> str:
    """The file name (without extension, ``/`` = sub-folder) for an image id: a known image
    extension is dropped, every path component keeps ``[A-Za-z0-9._-]`` (others become ``_``),
    empty / ``.`` / ``..`` components go. When anything but the extension had to change (or the
    name is too long) a short hash of the id is appended, so distinct ids never share a stem
    (e.g. ``cat/001.jpg`` -> ``cat/001``, ``s3://b/x y.jpg`` -> ``s3_/b/x_y-1a2b3c4d``)."""
    base = strip_image_ext(image_id)
    parts = [p for p in base.split("/") if p not in ("", ".", "..")]
    safe = [_SAFE.sub("_", p) for p in parts]
    safe = ["_" + p if p.startswith(".") else p for p in safe]
    stem = "/".join(safe) or "_"
    if stem != base or len(stem) > MAX_STEM:
        stem = stem[:MAX_STEM] + "-" + hashlib.sha1(image_id.encode()).hexdigest()[:8]
    return stem


def voc_palette_flat() -> list[int]:

    return voc_palette().reshape(-1).tolist()


# ----------------------------------------------------------------------------- reading the table


def _table_files(table: str) -> tuple[Any, list[str]]:
    """The table's Parquet files (:func:`must_ray.table.table_files`, the one rule); DatasetError
    naming the path when there are none."""
    try:
        fs, files = table_files(table)
    except TableNotFoundError as exc:
        raise DatasetError(str(exc)) from None
    if not files:
        raise DatasetError(f"{table}: no .parquet files")
    return fs, files


def _scan(table: str, columns: Sequence[str], batch_size: int = 2048) -> Iterator[list[dict[str, Any]]]:
    """Batches of row dicts with only ``columns`` (streaming; the image bytes are never read)."""

    fs, files = _table_files(table)
    ds = pads.dataset(files, format="parquet", filesystem=fs)
    for batch in ds.to_batches(columns=list(columns), batch_size=batch_size):
        yield batch.to_pylist()


def _table_info(table: str) -> tuple[list[str], dict[str, Any]]:


    fs, files = _table_files(table)
    with fs.open_input_file(files[0]) as f:
        schema = pq.read_schema(f)
    return tasks_in_schema(schema), read_provenance(schema)


def coco_category_ids(source: str) -> dict[str, int]:
    """Class name -> COCO category id from a COCO annotation file (``categories``) or from an
    imported table's provenance (``classes`` + ``source_class_ids``)."""

    src = absolute(source)
    if src.endswith(".json"):
        try:
            cats = json.loads(read_bytes(src)).get("categories") or []
        except (OSError, ValueError, AttributeError) as exc:
            raise DatasetError(f"--coco-categories {src}: cannot read COCO categories: {exc}") from None
        mapping = {str(c["name"]): int(c["id"]) for c in cats if "name" in c and "id" in c}
    else:
        prov = read_provenance(src)
        names, ids = prov.get("classes") or [], prov.get("source_class_ids") or []
        if len(names) != len(ids):
            raise DatasetError(f"--coco-categories {src}: the table records no source_class_ids for its classes")
        mapping = {str(n): int(i) for n, i in zip(names, ids)}
    if not mapping:
        raise DatasetError(f"--coco-categories {src}: no categories")
    return mapping


def _vocabulary(prov: dict[str, Any], max_id: int,
                category_ids: dict[str, int] | None = None) -> tuple[list[str], list[int]]:
    """(names, COCO category ids) for class ids ``0..max(C, max_id + 1) - 1``: names from the
    provenance (``class_<i>`` beyond it); ids from ``category_ids`` by name, else the provenance's
    ``source_class_ids``, else ``1..``."""
    names = [str(n) for n in prov.get("classes") or []]
    source = [int(i) for i in prov.get("source_class_ids") or []]
    if len(source) != len(names):
        source = []
    while len(names) <= max_id:
        names.append(f"class_{len(names)}")
    if category_ids is not None:
        missing = [n for n in names if n not in category_ids]
        if missing:
            raise DatasetError(f"--coco-categories has no category named {missing[:5]} (the table's classes)")
        return names, [category_ids[n] for n in names]
    ids = list(source) or list(range(1, len(names) + 1))
    while len(ids) < len(names):
        ids.append(max(ids, default=0) + 1)
    return names, ids


# ----------------------------------------------------------------------------- driver-side formats


def export_coco(table: str, out: str, prov: dict[str, Any], coco_ids: dict[str, int],
                category_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """``coco.json`` + ``coco_results.json``; fills ``coco_ids`` (image_id -> COCO image id)."""
    entries = []
    max_cls = -1
    for rows in _scan(table, ["image_id", "height", "width", "det_boxes", "det_classes", "det_scores"]):
        for r in rows:
            if r["det_boxes"] is None:
                continue
            boxes = np.asarray(r["det_boxes"], dtype=np.float64).reshape(-1, 4)
            classes = np.asarray(r["det_classes"] or [], dtype=np.int64)
            scores = np.asarray(r["det_scores"] if r["det_scores"] is not None else np.ones(len(boxes)), np.float64)
            if classes.size:
                max_cls = max(max_cls, int(classes.max()))
            entries.append((r["image_id"], int(r["height"]), int(r["width"]), boxes, classes, scores))
    entries.sort(key=lambda e: e[0])
    names, cat_ids = _vocabulary(prov, max_cls, category_ids)
    images, annotations, results = [], [], []
    for k, (image_id, h, w, boxes, classes, scores) in enumerate(entries, start=1):
        coco_ids[image_id] = k
        images.append({"id": k, "file_name": image_id, "width": w, "height": h})
        for b, c, s in zip(boxes, classes, scores):
            x, y = b[0] * w, b[1] * h
            bw, bh = (b[2] - b[0]) * w, (b[3] - b[1]) * h
            bbox = [round(float(v), 6) for v in (x, y, bw, bh)]
            ann = {"id": len(annotations) + 1, "image_id": k, "category_id": cat_ids[int(c)], "bbox": bbox,
                   "area": round(float(bw * bh), 6), "iscrowd": 0, "score": round(float(s), 6)}
            annotations.append(ann)
            results.append({"image_id": k, "category_id": ann["category_id"], "bbox": bbox, "score": ann["score"]})
    categories = [{"id": i, "name": n, "supercategory": ""} for i, n in zip(cat_ids, names)]
    doc = {"info": {"description": "must-ray export", "source_table": table, "provenance": prov},
           "images": images, "annotations": annotations, "categories": categories}
    write_bytes(join(out, "coco.json"), json.dumps(doc).encode())
    write_bytes(join(out, "coco_results.json"), json.dumps(results).encode())
    return {"coco": join(out, "coco.json"), "coco_images": len(images), "coco_annotations": len(annotations)}


def export_topk(table: str, out: str, prov: dict[str, Any], labelled: set) -> dict[str, Any]:
    """``topk.csv``: one line per (image, rank); adds the exported image ids to ``labelled``."""
    rows_out = []
    max_cls = -1
    for rows in _scan(table, ["image_id", "cls_label", "cls_topk_ids", "cls_topk_probs"]):
        for r in rows:
            if r["cls_label"] is None:
                continue
            ids = list(r["cls_topk_ids"] or [r["cls_label"]])
            probs = list(r["cls_topk_probs"] or [1.0] * len(ids))
            max_cls = max([max_cls, *ids])
            rows_out.append((r["image_id"], ids, probs))
            labelled.add(r["image_id"])
    rows_out.sort(key=lambda e: e[0])
    names, _ = _vocabulary(prov, max_cls)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "rank", "class_id", "class_name", "prob"])
    for image_id, ids, probs in rows_out:
        for rank, (c, p) in enumerate(zip(ids, probs), start=1):
            writer.writerow([image_id, rank, int(c), names[int(c)], format(float(p), ".7g")])
    write_bytes(join(out, "topk.csv"), buf.getvalue().encode())
    return {"topk_csv": join(out, "topk.csv"), "topk_images": len(rows_out)}


# ----------------------------------------------------------------------------- dense formats (Ray Data)


def depth_units(png: bytes, row_scale: float, out_scale: float) -> tuple[np.ndarray, int]:
    """Stored depth PNG -> uint16 units at ``out_scale`` (exact copy when the scales match) and
    the number of pixels clipped at 65535."""

    raw = decode_png(png, np.uint16)
    if abs(row_scale - out_scale) <= 1e-6 * out_scale:
        return raw, 0
    metres = raw.astype(np.float64) * row_scale
    units = np.rint(metres / out_scale)
    clipped = int((units > 65535).sum())
    units = np.where(raw > 0, np.clip(units, 1, 65535), 0)
    return units.astype(np.uint16), clipped


def write_dense_batch(batch: pa.Table, *, out: str, formats: Sequence[str], depth_scale: float,
                      normals_convention: str) -> pa.Table:
    """Ray Data batch function: write each row's dense labels as files; returns what was written."""


    palette = voc_palette_flat() if "masks" in formats else None
    res: dict[str, list] = {"image_id": [], "mask": [], "depth": [], "normals": [], "depth_clipped": []}
    for r in batch.to_pylist():
        stem = file_stem(r["image_id"])
        mask_rel = depth_rel = normals_rel = None
        clipped = 0
        if "masks" in formats and r.get("seg_png") is not None:
            img = Image.fromarray(decode_png(r["seg_png"], np.uint8))
            img.putpalette(palette)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            mask_rel = f"masks/{stem}.png"
            write_bytes(join(out, mask_rel), buf.getvalue())
        if "depth" in formats and r.get("depth_png") is not None:
            units, clipped = depth_units(r["depth_png"], float(r["depth_scale"] or 0.001), depth_scale)
            depth_rel = f"depth/{stem}.png"
            write_bytes(join(out, depth_rel), encode_png(units))
        if "normals" in formats and r.get("normals_png") is not None:
            data = r["normals_png"]
            if normals_convention != "opengl":
                data = encode_png(convert_rgb(decode_png(data, np.uint8), normals_convention))
            normals_rel = f"normals/{stem}.png"
            write_bytes(join(out, normals_rel), data)
        for k, v in (("image_id", r["image_id"]), ("mask", mask_rel), ("depth", depth_rel), ("normals", normals_rel),
                     ("depth_clipped", clipped)):
            res[k].append(v)
    return pa.table({k: pa.array(v, type=pa.int64() if k == "depth_clipped" else pa.string()) for k, v in res.items()})


def _export_dense(table: str, out: str, formats: Sequence[str], depth_scale: float, normals_convention: str,
                  batch_size: int) -> list[dict[str, Any]]:
    import ray

    cols = ["image_id"]
    if "masks" in formats:
        cols.append("seg_png")
    if "depth" in formats:
        cols += ["depth_png", "depth_scale"]
    if "normals" in formats:
        cols.append("normals_png")
    fs, files = _table_files(table)
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(cols)
    ds = ds.map_batches(write_dense_batch, batch_size=batch_size, batch_format="pyarrow",
                        fn_kwargs={"out": out, "formats": list(formats), "depth_scale": float(depth_scale),
                                   "normals_convention": normals_convention})
    return ds.take_all()


# ----------------------------------------------------------------------------- entry point


def tasks_without_format(tasks: Sequence[str]) -> list[str]:
    """The tasks among ``tasks`` that no export format writes."""
    return [t for t in tasks if t not in FORMAT_TASK.values()]


def resolve_formats(requested: Sequence[str], tasks: Sequence[str], table: str) -> list[str]:
    """``all`` -> every format the table's tasks allow; an explicit format needs its task."""
    out: list[str] = []
    for fmt in requested:
        if fmt == "all":
            out += [f for f in EXPORT_FORMATS if FORMAT_TASK[f] in tasks and f not in out]
            continue
        if fmt not in EXPORT_FORMATS:
            raise DatasetError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}, all")
        if FORMAT_TASK[fmt] not in tasks:
            raise DatasetError(f"--format {fmt} needs {FORMAT_TASK[fmt]} columns, but {table} has "
                               f"{', '.join(tasks) or 'no task columns'}")
        if fmt not in out:
            out.append(fmt)
    if not out:
        unexported = tasks_without_format(tasks)
        why = f"no export format for {', '.join(unexported)}" if unexported else "it has no task columns"
        raise DatasetError(f"{table}: nothing to export ({why}; formats: "
                           f"{', '.join(f'{f} ({t})' for f, t in FORMAT_TASK.items())})")
    return out


def export_labels(table: str, out: str, formats: Sequence[str] = ("all",), *, depth_scale: float = 0.001,
                  normals_convention: str = "opengl", batch_size: int = 64,
                  coco_categories: str | None = None) -> dict[str, Any]:
    """Export ``table`` to ``out`` in ``formats`` (see the module docstring). ``coco_categories``:
    a COCO JSON or an imported table whose category ids (matched by class name) the COCO export
    uses, for tables without ``source_class_ids`` (e.g. pseudo labels). Returns a summary."""

    if depth_scale <= 0:
        raise DatasetError(f"--depth-scale must be > 0, got {depth_scale}")
    if normals_convention not in CONVENTIONS:
        raise DatasetError(f"--normals-convention must be one of {CONVENTIONS}, got {normals_convention!r}")
    table = absolute(table)
    out = absolute(out)
    tasks, prov = _table_info(table)
    fmts = resolve_formats(formats, tasks, table)

    # every exported row's stem, checked for collisions before any file is written
    stems: dict[str, str] = {}
    by_stem: dict[str, str] = {}
    for rows in _scan(table, ["image_id"]):
        for r in rows:
            iid = r["image_id"]
            if iid in stems:
                raise DatasetError(f"{table}: image id {iid!r} appears twice")
            s = file_stem(iid)
            if s in by_stem:
                raise DatasetError(f"{table}: image ids {by_stem[s]!r} and {iid!r} both map to the file name {s!r}")
            stems[iid], by_stem[s] = s, iid

    summary: dict[str, Any] = {"table": table, "out": out, "formats": fmts, "rows": len(stems),
                               "not_exported": {t: "no export format for this task"
                                                for t in tasks_without_format(tasks)}}
    coco_ids: dict[str, int] = {}
    classified: set = set()
    category_ids = coco_category_ids(coco_categories) if coco_categories else None
    if "coco" in fmts:
        summary.update(export_coco(table, out, prov, coco_ids, category_ids))
    if "topk-csv" in fmts:
        summary.update(export_topk(table, out, prov, classified))
    written: dict[str, dict[str, Any]] = {}
    dense = [f for f in fmts if f in DENSE_FORMATS]
    if dense:
        for r in _export_dense(table, out, dense, depth_scale, normals_convention, batch_size):
            written[r["image_id"]] = r
        for f, col in (("masks", "mask"), ("depth", "depth"), ("normals", "normals")):
            if f in dense:
                summary[f"{f}_files"] = sum(1 for r in written.values() if r[col])
        if "depth" in dense:
            summary["depth_scale"] = depth_scale
            summary["depth_pixels_clipped"] = sum(int(r["depth_clipped"]) for r in written.values())

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "file_stem", "coco_image_id", "mask", "depth", "normals"])
    n_mapped = 0
    for iid in sorted(stems):
        w = written.get(iid, {})
        files = [w.get("mask") or "", w.get("depth") or "", w.get("normals") or ""]
        if iid not in coco_ids and iid not in classified and not any(files):
            continue  # no label in any exported format
        writer.writerow([iid, stems[iid], coco_ids.get(iid, ""), *files])
        n_mapped += 1
    write_bytes(join(out, "files.csv"), buf.getvalue().encode())
    summary["files_csv"] = join(out, "files.csv")
    summary["images_exported"] = n_mapped
    return summary


__all__ = ["EXPORT_FORMATS", "FORMAT_TASK", "export_labels", "file_stem", "depth_units", "resolve_formats",
           "tasks_without_format"]
