"""What every importer shares: file access, the Ray Data driver, quarantine, class lists.

An importer (one module per format family) only *plans*: it reads the dataset's index in the
driver (a folder listing, a COCO JSON, a CSV) and returns an :class:`ImportPlan` — one small
record per image (its id, the image path, the label path or the annotation as a JSON string) and
a module-level ``build_label(record, height, width, options)`` that turns one record into the
task's label. :func:`run_import` does the rest with Ray Data::

    ray.data.from_items(records) -> map_batches(read image, decode_image, build_label, task.encode)
                                 -> write_parquet(examples_schema([task], provenance))

so the heavy work (reading and validating every image and label file) runs in parallel tasks on
the cluster, never in the driver.

Problems are handled by one of two policies, per case (see ``docs/formats.md``):

* :class:`DatasetError` — the dataset *as a whole* is inconsistent (an annotation references an
  image or a category that does not exist, duplicate ids, an unknown class name, a bad option).
  Raised in the driver before any image is read; the message names the file (and entry).
* :class:`Quarantine` — *one image* cannot be used (its file is missing or undecodable, its label
  file is missing, malformed or of another size). The row goes to the quarantine table
  ``<out>_quarantine`` (``image_id``, ``path``, ``reason``, ``detail``) instead of the examples
  table, and the summary counts it. Nothing is skipped silently: every record ends up either as a
  row or as a quarantine row (checked at the end).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image
from ray.data.datasource import FilenameProvider

from must_ray import __version__
from must_ray.images import BadImageError, decode_image, encode_png
from must_ray.io import is_uri, write_atomic
from must_ray.storage import check_shared_storage
from must_ray.table import examples_schema, non_table_files, open_table, rows_to_table
from must_ray.tasks import build_task

#: file extensions treated as images when listing folders (lower case)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")

class TableFilenames(FilenameProvider):
    """Deterministic Parquet file names (``<prefix>-<write task>-<i>.parquet``) so that a rerun
    overwrites instead of adding files."""

    def __init__(self, prefix: str):
        super().__init__(file_format="parquet")
        self.prefix = prefix

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.prefix}-{task_index:05d}.parquet"


QUARANTINE_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("path", pa.string()),  # the file at fault (the image or its label file)
    pa.field("reason", pa.string()),  # short tag, e.g. missing_image, bad_image, label_size_mismatch
    pa.field("detail", pa.string()),  # human-readable explanation naming the file
])


class DatasetError(ValueError):
    """The dataset as a whole cannot be imported as given; the message names the file (and the
    entry) at fault. Raised in the driver, before any image is read."""


class Cells(dict):
    """What a ``build_label`` returns instead of a label when it already has the task's row cells
    in their final encoding (stored verbatim, bypassing ``Task.encode``)."""


class Quarantine(Exception):
    """One image cannot be imported: its row goes to the quarantine table."""

    def __init__(self, reason: str, detail: str, path: Optional[str] = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.path = path


# ----------------------------------------------------------------------------- files (local or URI)


def _fs_and_path(path: str):

    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def absolute(path: str) -> str:
    """A location usable from any worker: URIs unchanged, local paths made absolute."""
    return str(path) if is_uri(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(root: str, rel: str) -> str:
    """``rel`` under ``root`` (``rel`` may use ``/``); an absolute ``rel`` or URI wins."""
    if is_uri(rel) or os.path.isabs(rel):
        return rel
    if is_uri(root):
        return root.rstrip("/") + "/" + rel.lstrip("/")
    return os.path.normpath(os.path.join(root, rel))


def read_bytes(path: str) -> bytes:
    """The bytes of a local file or a URI (s3://, gs://, hdfs:// via pyarrow.fs)."""
    if not is_uri(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs_and_path(path)
    with fs.open_input_stream(p) as f:
        return f.readall()


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (parents created); atomic for local files."""
    if not is_uri(path):
        write_atomic(path, data)
        return
    fs, p = _fs_and_path(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def is_dir(path: str) -> bool:

    fs, p = _fs_and_path(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def is_file(path: str) -> bool:

    fs, p = _fs_and_path(path)
    return fs.get_file_info(p).type == pafs.FileType.File


def remove_dir(path: str) -> None:
    """Delete a directory tree if it exists."""

    fs, p = _fs_and_path(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def list_files(root: str, extensions: Optional[Sequence[str]] = None) -> list[str]:
    """Paths (relative to ``root``, ``/``-separated, sorted) of the files under ``root``,
    recursively; hidden files and folders (``.xxx``) are left out; ``extensions`` filters by
    lower-case suffix."""

    fs, p = _fs_and_path(root)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        raise DatasetError(f"{root}: not a directory")
    base = p.rstrip("/")
    out = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base) + 1:].replace(os.sep, "/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if extensions is None or os.path.splitext(rel)[1].lower() in extensions:
            out.append(rel)
    return sorted(out)


def strip_image_ext(rel: str) -> str:
    """``a/b.jpg`` -> ``a/b`` (only known image extensions are stripped)."""
    stem, ext = os.path.splitext(rel)
    return stem if ext.lower() in IMAGE_EXTENSIONS else rel


def check_shared_locations(locations: Sequence[tuple[str, Optional[str]]]) -> None:
    """On a multi-node cluster, every ``(flag, location)`` that Ray tasks read or write must be
    storage all nodes see (a URI or a shared mount); raises ConfigError naming the flag otherwise
    (:func:`must_ray.storage.check_shared_storage`: the same probe and switches as every job)."""
    check_shared_storage([(key, absolute(location)) for key, location in locations if location])


# ----------------------------------------------------------------------------- class lists


def parse_classes(value: Optional[str | Sequence[str]]) -> Optional[list[str]]:
    """``--classes``: a text file with one name per line (``#`` comments allowed), or a
    comma-separated list, or already a list. ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        names = [str(v).strip() for v in value]
    elif os.path.isfile(value) or is_uri(value):
        text = read_bytes(value).decode("utf-8")
        names = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    else:
        names = [v.strip() for v in str(value).split(",")]
    if not names or any(not n for n in names):
        raise DatasetError(f"--classes {value!r}: empty class name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DatasetError(f"--classes {value!r}: duplicate class names {dup}")
    return names


# ----------------------------------------------------------------------------- images


def stored_image_bytes(data: bytes, rgb: np.ndarray) -> tuple[bytes, bool]:
    """The bytes to store in the ``image`` cell and whether they were re-encoded.

    The original bytes are kept when every reader decodes them to the same pixels
    (:func:`must_ray.images.decode_image` and :func:`must_ray.table.decode_image_rgb` alike): a
    PNG or JPEG in RGB or grey without an EXIF rotation. Anything else (EXIF-rotated, alpha,
    palette, 16-bit, CMYK, other formats) is stored as a PNG of the decoded RGB pixels, so the
    table's ``height``/``width`` always describe what a reader sees."""

    try:
        with Image.open(io.BytesIO(data)) as img:
            keep = (img.format in ("PNG", "JPEG") and img.mode in ("RGB", "L")
                    and img.getexif().get(0x0112, 1) in (0, 1))
    except Exception:  # decode_image accepted it; be conservative
        keep = False
    if keep:
        return data, False
    return encode_png(rgb), True


def open_label_image(path: str, image_id: str) -> Image.Image:
    """Open a label file (mask / depth / normals PNG) fully loaded; problems become
    :class:`Quarantine` (``missing_label`` / ``bad_label``) naming the file."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise Quarantine("missing_label", f"label file not found: {path}", path) from None
    except OSError as exc:
        raise Quarantine("missing_label", f"cannot read label file {path}: {exc}", path) from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad label file
        raise Quarantine("bad_label", f"cannot decode label file {path}: {str(exc)[:200]}", path) from None
    return img


def check_label_size(img_hw: tuple[int, int], label_hw: tuple[int, int], path: str) -> None:
    if tuple(img_hw) != tuple(label_hw):
        raise Quarantine("label_size_mismatch",
                         f"label {path} is {label_hw[1]}x{label_hw[0]} (WxH) but its image is "
                         f"{img_hw[1]}x{img_hw[0]}", path)


# ----------------------------------------------------------------------------- the plan


@dataclass
class ImportPlan:
    """What an importer hands to :func:`run_import`.

    ``records``: one dict per image with ``image_id``, ``path`` (image file, absolute or URI) and
    optionally ``label_path``, ``ann`` (a JSON string the builder reads) and ``error`` (a
    ``[reason, detail]`` JSON string: the driver already knows this image must be quarantined,
    e.g. a label without an image). ``build_label``: a
    module-level function ``(record, height, width, options) -> label`` that may raise
    :class:`Quarantine`. ``counts``: driver-side numbers for the summary (e.g. crowd boxes)."""

    format: str
    task: str
    records: list[dict[str, Any]]
    build_label: Callable[[dict, int, int, dict], Any]
    classes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        ids = [r["image_id"] for r in self.records]
        if len(set(ids)) != len(ids):
            seen, dup = set(), []
            for i in ids:
                if i in seen:
                    dup.append(i)
                seen.add(i)
            raise DatasetError(f"{self.format}: duplicate image ids {dup[:5]} (each image may appear once)")
        for r in self.records:
            r.setdefault("label_path", None)
            r.setdefault("ann", None)
            r.setdefault("error", None)


def quarantine_path(out: str) -> str:
    """Where :func:`run_import` puts the rows it could not import."""
    return out.rstrip("/") + "_quarantine"


def work_path(out: str) -> str:
    """Where :func:`run_import` keeps files being written (beside the tables, never in them, so
    every Parquet reader sees the tables as they are; removed at the end)."""
    return out.rstrip("/") + "_tmp"


def build_rows(batch: pa.Table, *, task_name: str, num_classes: int, task_cfg: Any,
               build_label: Callable, options: dict, parts_dir: str, max_pixels: int) -> pa.Table:
    """Ray Data batch function: records -> examples-table rows; unusable records are written to a
    quarantine part file (deterministic name, so a retried task overwrites its own part)."""

    task = build_task(task_name, num_classes, task_cfg)
    rows, bad = [], []
    for rec in batch.to_pylist():
        path = rec["path"]
        try:
            if rec.get("error"):
                reason, detail = json.loads(rec["error"])
                raise Quarantine(reason, detail, path)
            try:
                data = read_bytes(path)
            except FileNotFoundError:
                raise Quarantine("missing_image", f"image file not found: {path}", path) from None
            except OSError as exc:
                raise Quarantine("missing_image", f"cannot read image file {path}: {exc}", path) from None
            try:
                rgb = decode_image(data, max_pixels=max_pixels)
            except BadImageError as exc:
                raise Quarantine("bad_image", f"cannot decode image {path}: {exc}", path) from None
            h, w = rgb.shape[:2]
            label = build_label(rec, h, w, options)
            cells = dict(label) if isinstance(label, Cells) else task.encode(label)
            image_bytes, _ = stored_image_bytes(data, rgb)
            rows.append({"image_id": rec["image_id"], "image": image_bytes, "source": path,
                         "height": h, "width": w, **cells})
        except Quarantine as q:
            bad.append({"image_id": rec["image_id"], "path": q.path or path, "reason": q.reason, "detail": q.detail})
    if bad:
        key = hashlib.sha1("\n".join(r["image_id"] for r in bad).encode()).hexdigest()[:16]
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA), sink)
        write_bytes(join(parts_dir, f"part-{key}.parquet"), sink.getvalue())
    return rows_to_table(rows, [task_name])


def _count_rows(out: str) -> int:
    return int(open_table(out).count_rows()) if is_dir(out) else 0


def _collect_quarantine(qdir: str, work: str) -> pa.Table:
    """Merge the part files the workers wrote under ``work`` into one sorted ``qdir/quarantine.parquet``
    (moved there complete, so the quarantine folder only ever holds the finished table)."""
    parts_dir = join(work, "quarantine-parts")
    tables = ([pq.read_table(io.BytesIO(read_bytes(join(parts_dir, f)))) for f in list_files(parts_dir, (".parquet",))]
              if is_dir(parts_dir) else [])
    table = pa.concat_tables(tables) if tables else QUARANTINE_SCHEMA.empty_table()
    table = table.sort_by("image_id")
    if table.num_rows:
        sink = io.BytesIO()
        pq.write_table(table, sink)
        if is_uri(qdir):
            write_bytes(join(qdir, "quarantine.parquet"), sink.getvalue())
        else:
            staged = join(work, "quarantine.parquet")
            write_bytes(staged, sink.getvalue())
            os.makedirs(qdir, exist_ok=True)
            os.replace(staged, join(qdir, "quarantine.parquet"))
    remove_dir(work)
    return table


def run_import(plan: ImportPlan, out: str, *, task_cfg: Any = None, rows_per_file: int = 256,
               batch_size: int = 32, max_pixels: int = 50_000_000) -> dict[str, Any]:
    """Execute ``plan`` with Ray Data into the examples table ``out`` (a directory of Parquet
    files, replaced if present) and ``<out>_quarantine`` (only when some rows were quarantined).
    Returns the summary: rows written, rows quarantined (by reason), classes, plan counts."""
    import ray
    from ray.data import DataContext, SaveMode


    if rows_per_file < 1 or batch_size < 1:
        raise DatasetError("--rows-per-file and --batch-size must be >= 1")
    n = len(plan.records)
    if n == 0:
        raise DatasetError(f"{plan.format}: no images to import")
    out = absolute(out)
    qdir, work = quarantine_path(out), work_path(out)
    for d in (out, qdir):  # replaced below: make sure that is all they hold
        if is_file(d):
            raise DatasetError(f"--out: {d} is a file; expected a directory for the table")
        others = non_table_files(d)
        if others:
            raise DatasetError(f"--out: {d} exists and holds files that are not part of a table ({others[:3]}); "
                               "refusing to replace it")
    remove_dir(qdir)  # a previous run's quarantine must not be mistaken for this one's
    remove_dir(work)  # nor a crashed run's quarantine parts
    remove_dir(out)  # a rerun replaces the table, even when it writes no rows
    provenance = {"kind": "import", "format": plan.format, "tasks": [plan.task], "classes": list(plan.classes),
                  **plan.provenance, "code_version": __version__}
    schema = examples_schema([plan.task], provenance)

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows in record order: reproducible files
    ds = ray.data.from_items(plan.records, override_num_blocks=max(1, math.ceil(n / batch_size)))
    ds = ds.map_batches(
        build_rows, batch_size=batch_size, batch_format="pyarrow",
        fn_kwargs={"task_name": plan.task, "num_classes": max(1, len(plan.classes)), "task_cfg": task_cfg,
                   "build_label": plan.build_label, "options": plan.options,
                   "parts_dir": join(work, "quarantine-parts"), "max_pixels": int(max_pixels)},
    )
    ds.write_parquet(out, schema=schema, filename_provider=TableFilenames(plan.format), mode=SaveMode.OVERWRITE,
                     min_rows_per_file=min(rows_per_file, n), max_rows_per_file=rows_per_file)

    quarantine = _collect_quarantine(qdir, work)
    rows = _count_rows(out)
    reasons: dict[str, int] = {}
    for r in quarantine.column("reason").to_pylist():
        reasons[r] = reasons.get(r, 0) + 1
    if rows + quarantine.num_rows != n:
        raise RuntimeError(f"import lost rows: {n} records but {rows} rows written + {quarantine.num_rows} quarantined")
    summary = {"format": plan.format, "task": plan.task, "out": out, "records": n, "rows": rows,
               "quarantined": quarantine.num_rows, "quarantine_reasons": reasons,
               "quarantine": qdir if quarantine.num_rows else None,
               "classes": len(plan.classes), **plan.counts}
    if rows == 0:
        first = quarantine.column("detail")[0].as_py()
        raise DatasetError(f"no rows imported: all {n} images were quarantined (reasons {reasons}; first: {first}); "
                           f"see {qdir}")
    return summary


def records_json(obj: Any) -> str:
    """Compact JSON for a record's ``ann`` cell."""
    return json.dumps(obj, separators=(",", ":"))


# ----------------------------------------------------------------------------- paired folders


def _read_pairs_csv(path: str, images_root: str, labels_root: str) -> list[tuple[str, str, str]]:
    import csv

    try:
        text = read_bytes(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"pairs file not found: {path}") from None
    reader = csv.DictReader(io.StringIO(text))
    cols = reader.fieldnames or []
    if "image" not in cols or "label" not in cols:
        raise DatasetError(f"{path}: a pairs CSV needs the header columns 'image' and 'label', got {cols}")
    out = []
    for row in reader:
        img, lab = (row["image"] or "").strip(), (row["label"] or "").strip()
        if not img or not lab:
            raise DatasetError(f"{path}: line {reader.line_num} has an empty image or label path")
        out.append((img, join(images_root, img), join(labels_root, lab)))
    if not out:
        raise DatasetError(f"{path}: no entries")
    return out


def pair_records(fmt: str, images: Optional[str], labels: Optional[str], split_file: Optional[str] = None,
                 pairs: Optional[str] = None, id_prefix: str = "",
                 label_extensions: Sequence[str] = (".png",)) -> tuple[list[dict[str, Any]], dict[str, int], dict]:
    """Records for "image folder + label folder" formats (VOC masks, depth, normals).

    * ``pairs``: a CSV with columns ``image,label`` (relative to ``images`` / ``labels``, default
      the CSV's folder), for layouts where the two trees differ (e.g. KITTI).
    * otherwise images and labels pair by their path relative to ``images`` / ``labels`` without
      extension (``JPEGImages/2007_000032.jpg`` <-> ``SegmentationClass/2007_000032.png``).
      ``split_file`` (VOC ``ImageSets``: one key per line, first token) selects the keys, and each
      must have both files; without it every label file is a key, and images without a label file
      are not imported (counted as ``images_without_label``).

    A key whose image or label file is missing becomes a quarantine record. The image id is the
    image path relative to ``images`` (with extension), prefixed by ``id_prefix``."""
    counts: dict[str, int] = {}
    if pairs:
        pairs_abs = absolute(pairs)
        base = os.path.dirname(pairs_abs)
        images_root = absolute(images) if images else base
        labels_root = absolute(labels) if labels else base
        records = [{"image_id": id_prefix + rel, "path": img, "label_path": lab}
                   for rel, img, lab in _read_pairs_csv(pairs_abs, images_root, labels_root)]
        return sorted(records, key=lambda r: r["image_id"]), counts, {"source": pairs_abs}
    if not images or not labels:
        raise DatasetError(f"{fmt}: --images DIR and --labels DIR are required (or --annotations PAIRS.csv)")
    images_root, labels_root = absolute(images), absolute(labels)
    for name, root in (("--images", images_root), ("--labels", labels_root)):
        if not is_dir(root):
            raise DatasetError(f"{fmt}: {name} {root} is not a directory")
    image_by_key: dict[str, str] = {}
    for rel in list_files(images_root, IMAGE_EXTENSIONS):
        key = os.path.splitext(rel)[0]
        if key in image_by_key:
            raise DatasetError(f"{fmt}: {images_root} has two images for {key!r}: {image_by_key[key]} and {rel}")
        image_by_key[key] = rel
    label_by_key: dict[str, str] = {}
    for rel in list_files(labels_root, tuple(label_extensions)):
        key = os.path.splitext(rel)[0]
        if key in label_by_key:
            raise DatasetError(f"{fmt}: {labels_root} has two label files for {key!r}: {label_by_key[key]} and {rel}")
        label_by_key[key] = rel
    if split_file:
        split_abs = absolute(split_file)
        try:
            lines = read_bytes(split_abs).decode("utf-8").splitlines()
        except FileNotFoundError:
            raise DatasetError(f"{fmt}: split file not found: {split_abs}") from None
        keys = [ln.split()[0] for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if len(set(keys)) != len(keys):
            raise DatasetError(f"{split_abs}: duplicate keys")
        if not keys:
            raise DatasetError(f"{split_abs}: no keys")
    else:
        keys = sorted(label_by_key)
        counts["images_without_label"] = sum(1 for k in image_by_key if k not in label_by_key)
        if not keys:
            raise DatasetError(f"{fmt}: no label files ({', '.join(label_extensions)}) under {labels_root}")
    records = []
    for key in keys:
        label_rel = label_by_key.get(key, key + label_extensions[0])
        label_path = join(labels_root, label_rel)
        rel = image_by_key.get(key)
        if rel is None:
            records.append({"image_id": id_prefix + key, "path": join(images_root, key), "label_path": label_path,
                            "error": json.dumps(["missing_image", f"no image file for {key!r} under {images_root} "
                                                 f"(label {label_path})"])})
        else:
            records.append({"image_id": id_prefix + rel, "path": join(images_root, rel), "label_path": label_path})
    prov = {"source": labels_root, "image_root": images_root}
    if split_file:
        prov["split_file"] = absolute(split_file)
    return sorted(records, key=lambda r: r["image_id"]), counts, prov
