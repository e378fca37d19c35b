"""Depth importer: an image folder + a folder of 16-bit PNG depth maps (NYU / KITTI style).

A depth PNG holds integer units; metres = value x ``--depth-scale`` (NYU: 0.001 = millimetres,
KITTI: 1/256); 0 = invalid (no measurement). 8-bit grey PNGs are accepted too (same rule).

Stored with the depth task's encoding at the task's ``depth_scale`` (``tasks.depth.depth_scale``
in the config, default 0.001, per row in the ``depth_scale`` column): when it equals the input
scale the units are copied exactly; otherwise they are re-quantised (within one unit of the
table's scale), and a depth that does not fit uint16 at the table's scale (65535 units) quarantines
the map (``depth_out_of_range``; raise ``--set tasks.depth.depth_scale=...``) instead of being
clipped. A depth map whose size differs from its image, that is not a grey PNG, or that is
missing is quarantined.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from must_ray.datasets.importers.common import (
    DatasetError,
    ImportPlan,
    Quarantine,
    check_label_size,
    open_label_image,
    pair_records,
)


def read_depth_units(img, path: str) -> np.ndarray:
    """A decoded depth PNG -> integer units (H, W) int64."""
    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "L"):
        raise Quarantine("bad_label", f"depth map {path} has PIL mode {img.mode}; expected a 16-bit grey PNG", path)
    arr = np.asarray(img).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise Quarantine("bad_label", f"depth map {path} has values outside 0..65535", path)
    return arr


def build_label(record: dict, height: int, width: int, options: dict) -> Any:
    path = record["label_path"]
    img = open_label_image(path, record["image_id"])
    check_label_size((height, width), (img.height, img.width), path)
    units = read_depth_units(img, path)
    in_scale, table_scale = float(options["depth_scale"]), float(options["table_scale"])
    metres = units.astype(np.float64) * in_scale
    if units.size and units.max() > 0:
        top = float(metres.max()) / table_scale
        if round(top) > 65535:
            raise Quarantine("depth_out_of_range",
                             f"depth map {path} reaches {metres.max():.3f} m, beyond the {65535 * table_scale:.3f} m "
                             f"a uint16 holds at the table's depth_scale {table_scale:g}; "
                             f"raise --set tasks.depth.depth_scale", path)
    return metres.astype(np.float32)


def plan_depth(images: Optional[str], labels: Optional[str], depth_scale: float, table_scale: float,
               split_file: Optional[str] = None, pairs: Optional[str] = None, id_prefix: str = "") -> ImportPlan:
    if not depth_scale or depth_scale <= 0:
        raise DatasetError(f"depth: --depth-scale must be > 0 (metres per PNG unit), got {depth_scale}")
    records, counts, prov = pair_records("depth", images, labels, split_file, pairs, id_prefix)
    prov["source_depth_scale"] = float(depth_scale)
    return ImportPlan(format="depth", task="depth", records=records, build_label=build_label, classes=[],
                      options={"depth_scale": float(depth_scale), "table_scale": float(table_scale)},
                      provenance=prov, counts=counts)
