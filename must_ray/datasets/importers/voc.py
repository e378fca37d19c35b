"""VOC-style segmentation importer: an image folder + a folder of PNG class-index masks.

Mask convention (PASCAL VOC): pixel value ``k`` = class ``k`` of a list whose entry 0 is
``background``; 255 = ignore ("void", object borders). Masks may be palette PNGs (the value is the
palette index, as VOC ships them), 8-bit grey, or RGB images painted with the VOC colour map (each
colour is mapped back to its index; an unknown colour quarantines the mask).

Our segmentation convention is 0 = background, ``c + 1`` = object class ``c``, 255 = ignore — so
VOC index ``k >= 1`` is our object class ``k - 1`` and the pixel values are stored unchanged. The
object classes (``classes`` in the provenance, no background) come from ``--classes`` (a file or
comma list; a leading ``background``/``_background_`` entry is dropped) or default to the 20 VOC
classes.

A mask whose size differs from its image, with a value outside ``0..C`` and 255, or that cannot be
decoded is quarantined (``label_size_mismatch`` / ``bad_label``), as is a key whose image or mask
file is missing (``missing_image`` / ``missing_label``).
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
    parse_classes,
)

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
IGNORE = 255


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map, (256, 3) uint8 (index 255 = (224, 224, 192))."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def read_mask(img, path: str) -> np.ndarray:
    """A decoded mask image -> uint8 (H, W) class indices (palette index / grey value / VOC colour)."""
    if img.mode in ("P", "L"):
        return np.asarray(img, dtype=np.uint8)
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise Quarantine("bad_label", f"mask {path} has values outside 0..255 (16-bit mask)", path)
        return arr.astype(np.uint8)
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB")).astype(np.int32)
        pal = voc_palette().astype(np.int32)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        pcode = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
        lut = {int(c): i for i, c in reversed(list(enumerate(pcode)))}  # first index wins (0 before others)
        uniq, inv = np.unique(code, return_inverse=True)
        unknown = [f"#{int(u):06x}" for u in uniq if int(u) not in lut]
        if unknown:
            raise Quarantine("bad_label", f"RGB mask {path} has colours not in the VOC colour map: {unknown[:5]}", path)
        return np.array([lut[int(u)] for u in uniq], dtype=np.uint8)[inv].reshape(code.shape)
    raise Quarantine("bad_label", f"mask {path} has PIL mode {img.mode}; expected a palette, grey or RGB PNG", path)


def build_label(record: dict, height: int, width: int, options: dict) -> Any:
    path = record["label_path"]
    img = open_label_image(path, record["image_id"])
    check_label_size((height, width), (img.height, img.width), path)
    mask = read_mask(img, path)
    num_classes = int(options["num_classes"])
    bad = np.unique(mask[(mask > num_classes) & (mask != IGNORE)])
    if bad.size:
        raise Quarantine("bad_label", f"mask {path} has values {bad[:10].tolist()} outside 0..{num_classes} "
                         f"(background + {num_classes} classes) and 255 (ignore)", path)
    return mask


def plan_voc(images: Optional[str], labels: Optional[str], classes: Optional[str] = None,
             split_file: Optional[str] = None, pairs: Optional[str] = None, id_prefix: str = "") -> ImportPlan:
    names = parse_classes(classes)
    if names is None:
        names = list(VOC_CLASSES)
    elif names[0].lower() in ("background", "_background_", "__background__"):
        names = names[1:]
    if not names:
        raise DatasetError("voc: --classes must name at least one object class")
    if len(names) > 254:
        raise DatasetError(f"voc: {len(names)} classes do not fit a uint8 mask (max 254 + background + ignore)")
    records, counts, prov = pair_records("voc", images, labels, split_file, pairs, id_prefix)
    return ImportPlan(format="voc", task="segmentation", records=records, build_label=build_label, classes=names,
                      options={"num_classes": len(names)}, provenance=prov, counts=counts)
