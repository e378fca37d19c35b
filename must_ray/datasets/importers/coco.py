"""COCO detection importer (``instances_*.json``).

The annotation file is parsed once, in the driver, into one record per image. Conventions:

* **Classes**: COCO category ids are arbitrary (1..90 with gaps); they map to our contiguous ids
  ``0..C-1`` in ascending COCO id order. The provenance stores ``classes`` (names in our id order)
  and ``source_class_ids`` (the COCO id of each), so an export gives the original ids back.
* **Boxes**: COCO ``bbox`` is ``[x, y, w, h]`` in absolute pixels; stored as normalised
  ``x0, y0, x1, y1`` (divided by the image's width/height), clipped to [0, 1].
* **Crowd** annotations (``iscrowd: 1``) are *dropped* from the targets (our detection label has
  no "ignore region"); the summary counts them (``crowd_boxes_dropped``).
* **Degenerate** boxes (width or height <= 0 after clipping to the image) are dropped and
  counted (``degenerate_boxes_dropped``).
* An image with no (non-crowd) annotation gets an empty detection label, not a null one.

Malformed inputs: an annotation whose ``image_id`` or ``category_id`` is not in the file,
duplicate image ids / file names, or a missing key raise :class:`DatasetError` naming the file and
the entry. A listed image whose file is missing or undecodable, or whose decoded size differs from
the ``width``/``height`` in the JSON (e.g. an EXIF rotation), is quarantined.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from must_ray.datasets.importers.common import (
    DatasetError,
    ImportPlan,
    Quarantine,
    absolute,
    is_dir,
    join,
    read_bytes,
    records_json,
)
from must_ray.tasks.detection import make_label


def build_label(record: dict, height: int, width: int, options: dict) -> Any:

    ann = json.loads(record["ann"])
    jw, jh = ann["w"], ann["h"]
    if jw is not None and jh is not None and (int(jw), int(jh)) != (width, height):
        raise Quarantine("image_size_mismatch",
                         f"{record['path']} decodes to {width}x{height} (WxH) but the annotation file says {jw}x{jh}",
                         record["path"])
    boxes = np.asarray(ann["boxes"], dtype=np.float64).reshape(-1, 4)  # absolute xyxy, already clipped
    norm = boxes / np.array([width, height, width, height], dtype=np.float64)
    return make_label(np.clip(norm, 0.0, 1.0), ann["classes"])


def _require(obj: dict, key: str, where: str, path: str) -> Any:
    if key not in obj:
        raise DatasetError(f"{path}: {where} has no {key!r}")
    return obj[key]


def plan_coco(annotations: str, images: Optional[str] = None, id_prefix: str = "") -> ImportPlan:
    """``annotations``: the COCO JSON; ``images``: the folder its ``file_name``s are relative to
    (default: the JSON's folder)."""
    if not annotations:
        raise DatasetError("coco: --annotations instances_xxx.json is required")
    path = absolute(annotations)
    root = absolute(images) if images else os.path.dirname(path)
    if not is_dir(root):
        raise DatasetError(f"coco: image folder {root} is not a directory (set --images)")
    data = _read_coco(path)
    anns = data.get("annotations", [])
    source_ids, classes = _categories(_require(data, "categories", "the file", path), path)
    by_id = _images(_require(data, "images", "the file", path), path)
    crowd, degenerate = _add_boxes(by_id, anns, {cid: i for i, cid in enumerate(source_ids)}, path)
    records = []
    empty = 0
    for iid, e in by_id.items():
        empty += not e["boxes"]
        records.append({
            "image_id": id_prefix + e["file_name"], "path": join(root, e["file_name"]),
            "ann": records_json({"coco_id": iid, "w": e["w"], "h": e["h"], "boxes": e["boxes"], "classes": e["classes"]}),
        })
    if not records:
        raise DatasetError(f"{path}: no images")
    records.sort(key=lambda r: r["image_id"])
    return ImportPlan(
        format="coco", task="detection", records=records, build_label=build_label, classes=classes,
        provenance={"source": path, "image_root": root, "source_class_ids": source_ids},
        counts={"annotations": len(anns), "crowd_boxes_dropped": crowd, "degenerate_boxes_dropped": degenerate,
                "images_without_boxes": empty},
    )


def _read_coco(path: str) -> dict:
    try:
        data = json.loads(read_bytes(path))
    except FileNotFoundError:
        raise DatasetError(f"coco: annotation file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a COCO object with images/annotations/categories")
    return data


def _categories(cats: list, path: str) -> tuple[list, list[str]]:
    """``(COCO category ids ascending, their names)``: our contiguous class ids follow that order."""
    names_by_id = {}
    for i, c in enumerate(cats):
        cid = _require(c, "id", f"categories[{i}]", path)
        if cid in names_by_id:
            raise DatasetError(f"{path}: duplicate category id {cid}")
        names_by_id[cid] = str(_require(c, "name", f"categories[{i}] (id {cid})", path))
    if not names_by_id:
        raise DatasetError(f"{path}: no categories")
    source_ids = sorted(names_by_id)
    return source_ids, [names_by_id[cid] for cid in source_ids]


def _images(imgs: list, path: str) -> dict[Any, dict]:
    """``{COCO image id: {file_name, w, h, boxes: [], classes: []}}``; ids and file names unique."""
    by_id: dict[Any, dict] = {}
    seen_files: dict[str, Any] = {}
    for i, im in enumerate(imgs):
        iid = _require(im, "id", f"images[{i}]", path)
        fname = str(_require(im, "file_name", f"images[{i}] (id {iid})", path))
        if iid in by_id:
            raise DatasetError(f"{path}: duplicate image id {iid}")
        if fname in seen_files:
            raise DatasetError(f"{path}: images {seen_files[fname]} and {iid} share file_name {fname!r}")
        seen_files[fname] = iid
        by_id[iid] = {"file_name": fname, "w": im.get("width"), "h": im.get("height"), "boxes": [], "classes": []}
    return by_id


def _add_boxes(by_id: dict[Any, dict], anns: list, contiguous: dict, path: str) -> tuple[int, int]:
    """Add every annotation's box (xyxy, clipped to the image) and class to its image; crowd
    annotations and boxes with no area are dropped. Returns ``(crowd, degenerate)`` counts."""
    crowd = degenerate = 0
    for i, a in enumerate(anns):
        aid = a.get("id", f"#{i}")
        iid = _require(a, "image_id", f"annotation {aid}", path)
        if iid not in by_id:
            raise DatasetError(f"{path}: annotation {aid} points at image id {iid}, which is not in 'images'")
        cid = _require(a, "category_id", f"annotation {aid}", path)
        if cid not in contiguous:
            raise DatasetError(f"{path}: annotation {aid} (image {by_id[iid]['file_name']}) has category id {cid}, "
                               f"which is not in 'categories' (known: {sorted(contiguous)})")
        if a.get("iscrowd", 0):
            crowd += 1
            continue
        bbox = _require(a, "bbox", f"annotation {aid}", path)
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and np.isfinite(v) for v in bbox)):
            raise DatasetError(f"{path}: annotation {aid} has bbox {bbox!r}; expected [x, y, width, height]")
        x, y, w, h = (float(v) for v in bbox)
        entry = by_id[iid]
        x0, y0, x1, y1 = x, y, x + w, y + h
        if entry["w"] is not None and entry["h"] is not None:
            x0, x1 = min(max(x0, 0.0), entry["w"]), min(max(x1, 0.0), entry["w"])
            y0, y1 = min(max(y0, 0.0), entry["h"]), min(max(y1, 0.0), entry["h"])
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            degenerate += 1
            continue
        entry["boxes"].append([x0, y0, x1, y1])
        entry["classes"].append(contiguous[cid])
    return crowd, degenerate
