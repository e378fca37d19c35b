"""Bring your own data: import labelled datasets in their usual formats into examples tables.

One module per format family, all running through the same Ray Data driver
(:mod:`must_ray.datasets.importers.common`):

============== ============== =========================================================
format         task           input
============== ============== =========================================================
``imagefolder`` classification ``--images ROOT`` with ``ROOT/<class>/<image>``
``csv``         classification ``--annotations list.csv`` (header ``path,label``)
``json``        classification ``--annotations list.json`` (array or JSON Lines of {path, label})
``coco``        detection      ``--annotations instances_x.json --images DIR``
``voc``         segmentation   ``--images JPEGImages --labels SegmentationClass [--split-file]``
``depth``       depth          ``--images DIR --labels DIR --depth-scale S`` (16-bit PNG)
``normals``     normals        ``--images DIR --labels DIR [--normals-convention]`` (RGB PNG)
============== ============== =========================================================

:func:`import_dataset` is what ``jobs/import_dataset.py`` calls. Details, conventions and the
malformed-input policy per case: ``docs/formats.md``.
"""
from __future__ import annotations

from typing import Any, Optional

from must_ray.datasets.importers.common import DatasetError, ImportPlan, Quarantine, quarantine_path, run_import
from must_ray.task_registry import task_config

FORMATS = ("imagefolder", "csv", "json", "coco", "voc", "depth", "normals")
FORMAT_TASK = {"imagefolder": "classification", "csv": "classification", "json": "classification",
               "coco": "detection", "voc": "segmentation", "depth": "depth", "normals": "normals"}


def plan_import(fmt: str, *, images: Optional[str] = None, annotations: Optional[str] = None,
                labels: Optional[str] = None, split_file: Optional[str] = None, classes: Optional[str] = None,
                id_prefix: str = "", path_column: str = "path", label_column: str = "label",
                depth_scale: Optional[float] = None, table_depth_scale: float = 0.001,
                normals_convention: str = "opengl", normals_black_invalid: bool = False) -> ImportPlan:
    """Read the dataset's index (driver side) into an :class:`ImportPlan`.
    Raises :class:`DatasetError` naming the file for dataset-level problems."""
    from must_ray.datasets.importers import classification, coco, depth, normals, voc

    if fmt == "imagefolder":
        return classification.plan_imagefolder(images, classes, id_prefix)
    if fmt in ("csv", "json"):
        return classification.plan_list(annotations, fmt, images, classes, path_column, label_column, id_prefix)
    if fmt == "coco":
        return coco.plan_coco(annotations, images, id_prefix)
    if fmt == "voc":
        return voc.plan_voc(images, labels, classes, split_file, annotations, id_prefix)
    if fmt == "depth":
        if depth_scale is None:
            raise DatasetError("depth: --depth-scale is required (metres per PNG unit: NYU 0.001, KITTI 1/256)")
        return depth.plan_depth(images, labels, depth_scale, table_depth_scale, split_file, annotations, id_prefix)
    if fmt == "normals":
        return normals.plan_normals(images, labels, normals_convention, normals_black_invalid, split_file,
                                    annotations, id_prefix)
    raise DatasetError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def prepare_import(fmt: str, task_cfgs: Optional[dict] = None, **options: Any) -> tuple[ImportPlan, Any]:
    """The plan of importing ``fmt`` (driver side, no Ray) and the task config to encode with.
    ``task_cfgs``: the config's ``tasks`` section (the depth table scale comes from it)."""
    task = FORMAT_TASK.get(fmt)
    if task is None:
        raise DatasetError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)} (tasks without an "
                           "importer are imported as examples tables written by your own code)")
    cfg = task_config(task, (task_cfgs or {}).get(task))
    if fmt == "depth":
        options["table_depth_scale"] = cfg.depth_scale
    return plan_import(fmt, **options), cfg


def import_dataset(fmt: str, out: str, *, task_cfgs: Optional[dict] = None, rows_per_file: int = 256,
                   batch_size: int = 32, max_pixels: int = 50_000_000, **options: Any) -> dict[str, Any]:
    """Import dataset ``fmt`` (options as :func:`plan_import`) into the examples table ``out``.
    Returns the summary (rows, quarantined by reason, counts)."""
    plan, cfg = prepare_import(fmt, task_cfgs, **options)
    return run_import(plan, out, task_cfg=cfg, rows_per_file=rows_per_file, batch_size=batch_size,
                      max_pixels=max_pixels)


__all__ = ["FORMATS", "FORMAT_TASK", "DatasetError", "ImportPlan", "Quarantine", "import_dataset", "plan_import",
           "prepare_import",
           "quarantine_path", "run_import"]
