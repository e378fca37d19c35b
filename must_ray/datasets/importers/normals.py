"""Surface-normal importer: an image folder + a folder of RGB PNG normal maps.

A normal map stores ``rgb = (n + 1) * 127.5`` per pixel, i.e. ``n = rgb / 127.5 - 1``. Our frame
is the camera frame with x right, y up, z towards the viewer (``--normals-convention opengl``,
the default). ``opencv`` maps (x right, y down, z forward, i.e. into the scene) have y and z
negated, which on the 8-bit values is exactly ``255 - v`` for G and B. Invalid pixels: a decoded
vector shorter than 0.5 (grey 128) — stored as (128, 128, 128); with ``--normals-black-invalid``
pure black (0, 0, 0) is invalid too (some datasets mark holes that way). Valid pixels are stored
unchanged (exact round trip). An alpha channel is dropped.

A normal map whose size differs from its image, that is not RGB(A), or that is missing is
quarantined.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from must_ray.datasets.importers.common import (
    Cells,
    DatasetError,
    ImportPlan,
    Quarantine,
    check_label_size,
    open_label_image,
    pair_records,
)
from must_ray.images import encode_png

CONVENTIONS = ("opengl", "opencv")


def invalid_pixels(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose decoded vector is (near) zero: our 'invalid' (grey 128)."""
    n = rgb.astype(np.float32) / 127.5 - 1.0
    return np.linalg.norm(n, axis=-1) <= 0.5


def convert_rgb(rgb: np.ndarray, convention: str, black_invalid: bool = False) -> np.ndarray:
    """Normal-map RGB in ``convention`` <-> ours (the flip is its own inverse)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"normals convention must be one of {CONVENTIONS}, got {convention!r}")
    out = np.array(rgb[..., :3], dtype=np.uint8, copy=True)
    invalid = invalid_pixels(out)
    if black_invalid:
        invalid |= np.all(out == 0, axis=-1)
    if convention == "opencv":
        out[..., 1:] = 255 - out[..., 1:]
    out[invalid] = 128
    return out


def build_label(record: dict, height: int, width: int, options: dict) -> Any:
    path = record["label_path"]
    img = open_label_image(path, record["image_id"])
    check_label_size((height, width), (img.height, img.width), path)
    if img.mode not in ("RGB", "RGBA"):
        raise Quarantine("bad_label", f"normal map {path} has PIL mode {img.mode}; expected an RGB PNG", path)
    rgb = convert_rgb(np.asarray(img), options["convention"], options["black_invalid"])
    # Already in the column's 8-bit encoding: store the values as they are (NormalsTask.encode
    # takes float vectors and would re-normalise and re-round the quantised ones).

    return Cells({"normals_png": encode_png(rgb)})


def plan_normals(images: Optional[str], labels: Optional[str], convention: str = "opengl", black_invalid: bool = False,
                 split_file: Optional[str] = None, pairs: Optional[str] = None, id_prefix: str = "") -> ImportPlan:
    if convention not in CONVENTIONS:
        raise DatasetError(f"normals: --normals-convention must be one of {CONVENTIONS}, got {convention!r}")
    records, counts, prov = pair_records("normals", images, labels, split_file, pairs, id_prefix)
    prov["source_normals_convention"] = convention
    return ImportPlan(format="normals", task="normals", records=records, build_label=build_label, classes=[],
                      options={"convention": convention, "black_invalid": bool(black_invalid)},
                      provenance=prov, counts=counts)
