"""The examples table: the one Parquet schema every dataset in must-ray uses, and its codecs.

One row per image. Base columns (always present, never null):

=========== ======= ===================================================
``image_id`` string  stable unique key (source path/URI or world seed:index)
``image``    binary  encoded image bytes (PNG or JPEG)
``source``   string  where the image came from
``height``   int32   original image height in pixels
``width``    int32   original image width in pixels
=========== ======= ===================================================

Each task adds its own nullable columns (defined in its module under ``must_ray/tasks``); the
task's first column is its *presence column*: null means "this row has no label for the task".
A table may also omit a task's columns entirely, which reads the same as all-null. So a labelled
set has one task's columns, a pseudo-label table has all of them, and a partially labelled mix has
some. Provenance (teachers, checkpoint hashes, thresholds, class names, code version) lives in the
Parquet key-value metadata under the key ``must_ray`` as JSON. The column reference is
``docs/schema.md``.
"""
from __future__ import annotations

import io
import json
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SCHEMA_VERSION = 1
METADATA_KEY = b"must_ray"

BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
)
BASE_COLUMNS = tuple(f.name for f in BASE_FIELDS)


# ----------------------------------------------------------------------------- codecs


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a uint8 (H, W) / (H, W, 3) array or a uint16 (H, W) array (16-bit grey).
    Level 1 compression: labels are written once and read many times, speed beats size."""
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        if array.ndim != 2:
            raise ValueError(f"uint16 PNG must be (H, W), got {array.shape}")
        img = Image.fromarray(array)  # mode I;16
    elif array.dtype == np.uint8:
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise ValueError(f"uint8 PNG must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
        img = Image.fromarray(array)
    else:
        raise ValueError(f"PNG encoding needs uint8 or uint16, got {array.dtype}")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes, dtype: type = np.uint8) -> np.ndarray:
    """Inverse of :func:`encode_png` for label maps (no colour conversion)."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img)
    if arr.dtype != dtype:
        if dtype == np.uint16 and arr.dtype in (np.int32, np.uint8):
            arr = arr.astype(np.uint16)
        else:
            raise ValueError(f"PNG decodes to {arr.dtype}, expected {np.dtype(dtype).name}")
    return arr


def decode_image_rgb(data: bytes) -> np.ndarray:
    """Decode an image cell to uint8 RGB (H, W, 3), whatever its mode."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)


def encode_depth(depth_m: np.ndarray, scale: float) -> bytes:
    """Metric depth (float, metres, 0 = invalid) -> 16-bit PNG in units of ``scale`` metres.
    Valid depths round to the nearest unit but never to 0 (which means invalid)."""
    d = np.asarray(depth_m, dtype=np.float64)
    units = np.rint(d / scale)
    valid = np.isfinite(d) & (d > 0)
    units = np.where(valid, np.clip(units, 1, 65535), 0)
    return encode_png(units.astype(np.uint16))


def decode_depth(data: bytes, scale: float) -> np.ndarray:
    """16-bit depth PNG -> float32 metres (0 = invalid)."""
    return decode_png(data, np.uint16).astype(np.float32) * np.float32(scale)


def encode_normals(normals: np.ndarray) -> bytes:
    """Unit normals (H, W, 3) -> RGB PNG with ``rgb = round((n + 1) * 127.5)``.
    Invalid pixels (zero vectors) are stored as (128, 128, 128), which decodes to a near-zero
    vector and back to invalid."""
    n = np.asarray(normals, dtype=np.float32)
    valid = np.linalg.norm(n, axis=-1) > 0.5
    rgb = np.clip(np.rint((n + 1.0) * 127.5), 0, 255).astype(np.uint8)
    rgb[~valid] = 128
    return encode_png(rgb)


def decode_normals(data: bytes) -> np.ndarray:
    """RGB normals PNG -> float32 unit vectors (H, W, 3); invalid pixels are zero vectors."""
    rgb = decode_png(data, np.uint8).astype(np.float32)
    n = rgb / 127.5 - 1.0
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    valid = norm > 0.5
    return np.where(valid, n / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


# ----------------------------------------------------------------------------- schema


def task_fields(task_names: Iterable[str]) -> list[pa.Field]:
    """The nullable columns of the given tasks, in the order given."""
    from must_ray.tasks import get_task_class

    fields: list[pa.Field] = []
    for name in task_names:
        fields.extend(get_task_class(name).columns())
    return fields


def examples_schema(task_names: Iterable[str], provenance: Optional[Mapping[str, Any]] = None) -> pa.Schema:
    """The Arrow schema of an examples table holding ``task_names``' columns (plus provenance)."""
    schema = pa.schema(list(BASE_FIELDS) + task_fields(task_names))
    if provenance is not None:
        schema = with_provenance(schema, provenance)
    return schema


def with_provenance(schema: pa.Schema, provenance: Mapping[str, Any]) -> pa.Schema:
    """``schema`` with ``provenance`` (JSON-serialisable) stored under the ``must_ray`` key."""
    meta = dict(schema.metadata or {})
    payload = {"schema_version": SCHEMA_VERSION, **provenance}
    meta[METADATA_KEY] = json.dumps(payload, sort_keys=True).encode()
    return schema.with_metadata(meta)


def read_provenance(source: str | pa.Schema) -> dict[str, Any]:
    """The provenance dict of a table (a Parquet file, a directory of them, or a schema)."""
    if isinstance(source, pa.Schema):
        schema = source
    else:
        schema = pq.read_schema(_first_parquet_file(source))
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _first_parquet_file(path: str) -> str:
    import os

    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".parquet"))
        if not files:
            raise FileNotFoundError(f"no .parquet files in {path}")
        return os.path.join(path, files[0])
    return path


def tasks_in_schema(schema: pa.Schema) -> list[str]:
    """Registered tasks whose presence column is in ``schema`` (canonical order)."""
    from must_ray.tasks import get_task_class, registered_task_names

    names = set(schema.names)
    return [t for t in registered_task_names() if get_task_class(t).presence_column() in names]


def validate_table(table: pa.Table) -> list[str]:
    """Check ``table`` against the examples schema; returns the tasks it holds.
    Raises ValueError naming the first bad column."""
    for f in BASE_FIELDS:
        if f.name not in table.column_names:
            raise ValueError(f"examples table lacks base column {f.name!r}")
        if not table.schema.field(f.name).type.equals(f.type):
            raise ValueError(f"column {f.name!r} has type {table.schema.field(f.name).type}, expected {f.type}")
        if table.column(f.name).null_count:
            raise ValueError(f"column {f.name!r} has nulls")
    tasks = tasks_in_schema(table.schema)
    for f in task_fields(tasks):
        if f.name not in table.column_names:
            raise ValueError(f"examples table lacks column {f.name!r}")
        got = table.schema.field(f.name).type
        if not got.equals(f.type):
            raise ValueError(f"column {f.name!r} has type {got}, expected {f.type}")
    return tasks


def conform(table: pa.Table, task_names: Sequence[str]) -> pa.Table:
    """``table`` with exactly the base columns and ``task_names``' columns in canonical order;
    columns of absent tasks are added as all-null (so tables of different tasks can be unioned).
    Extra task columns not asked for are dropped."""
    schema = examples_schema(task_names)
    cols = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            cols.append(col if col.type.equals(f.type) else col.cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema.with_metadata(table.schema.metadata))


def rows_to_table(rows: Sequence[Mapping[str, Any]], task_names: Sequence[str], provenance=None) -> pa.Table:
    """Build an examples table from row dicts (base cells + task cells; missing cells -> null)."""
    schema = examples_schema(task_names, provenance)
    data = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(data, schema=schema)


def decode_labels(row: Mapping[str, Any], task_names: Sequence[str], tasks=None) -> dict[str, Any]:
    """The labels of one row (a dict of cells) for ``task_names``; ``None`` where the row has none
    or the table lacks the task's columns."""
    from must_ray.tasks import build_task

    out = {}
    for name in task_names:
        task = tasks[name] if tasks and name in tasks else build_task(name, num_classes=1)
        cols = [f.name for f in task.columns()]
        if row.get(cols[0]) is None:
            out[name] = None
        else:
            out[name] = task.decode({c: row.get(c) for c in cols})
    return out
