"""One image's predictions as JSON: every task's label in the form a client reads.

The labels are what a teacher writes (``Task.predict``, through the labeller's own teacher), so a
served prediction is exactly a pseudo label. Classification becomes top-k class names with
probabilities, detection boxes with class names and scores (normalised ``[x0, y0, x1, y1]`` and in
the request image's pixels). A dense map is resampled to the requested size by the task itself
(``Task.augment``: nearest neighbour, values never blended across object borders) and encoded by
the task itself (``Task.encode``: the table's PNG cells, base64), so ``Task.decode`` of the
decoded cells gives the map back (docs/schema.md describes each PNG).
"""
from __future__ import annotations

import base64
import math
from typing import Any, Optional, Sequence

import numpy as np

from must_ray.serve.parse import BadRequest
from must_ray.tasks import Task
from must_ray.tasks.base import Crop


def map_size(image_hw: tuple[int, int], requested: Optional[tuple[int, int]], max_pixels: int) -> tuple[int, int]:
    """The (H, W) of the dense maps in a response: the requested size, else the image's, shrunk
    (aspect kept) to at most ``max_pixels``; a requested size over the limit is a 400."""
    if requested is not None:
        if requested[0] * requested[1] > max_pixels:
            raise BadRequest(400, f"size {requested[0]}x{requested[1]} is over the limit of {max_pixels} pixels")
        return requested
    h, w = image_hw
    scale = min(1.0, math.sqrt(max_pixels / float(h * w)))
    return max(1, int(h * scale)), max(1, int(w * scale))


def encode_prediction(task: Task, label: Any, classes: Sequence[str], image_hw: tuple[int, int],
                      size: tuple[int, int], topk: Optional[int] = None) -> dict[str, Any]:
    """The JSON form of one task's ``label`` for an image of ``image_hw`` (see the module docstring)."""
    if task.dense:
        cells = task.encode(task.augment(label, Crop(), size))
        return {"size": list(size), "encoding": "base64 of the task's table cells (docs/schema.md)",
                **{k: _json_cell(v) for k, v in cells.items()}}
    if isinstance(label, dict) and "topk_ids" in label:
        ids = np.asarray(label["topk_ids"]).reshape(-1)[:topk]
        probs = np.asarray(label["topk_probs"]).reshape(-1)[:topk]
        return {"class_id": int(label["label"]), "name": _name(classes, label["label"]),
                "topk": [{"class_id": int(i), "name": _name(classes, i), "prob": float(p)} for i, p in zip(ids, probs)]}
    if isinstance(label, dict) and "boxes" in label:
        h, w = image_hw
        boxes = np.asarray(label["boxes"], dtype=np.float64).reshape(-1, 4)
        return {"boxes": [{"box": [round(float(v), 6) for v in b],
                           "box_px": [round(float(v), 2) for v in b * np.array([w, h, w, h])],
                           "class_id": int(c), "name": _name(classes, c), "score": float(s)}
                          for b, c, s in zip(boxes, label["classes"], label["scores"])]}
    return {k: _json_cell(v) for k, v in task.encode(label).items()}


def _name(classes: Sequence[str], class_id: Any) -> Optional[str]:
    i = int(class_id)
    return classes[i] if 0 <= i < len(classes) else None


def _json_cell(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


__all__ = ["map_size", "encode_prediction"]
