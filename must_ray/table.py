"""The examples table: the one Parquet schema every dataset in must-ray uses, and every operation on it.

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

One function per concept: which files make a table (:func:`table_files`: a folder holds its table
and nothing else; bookkeeping lives beside it), open a table (:func:`open_table`), read its schema and provenance,
which tasks it holds (:func:`table_tasks`), its class vocabulary (:func:`table_classes`, one
rule for training and evaluation alike), add missing task columns (:func:`conform`,
:func:`with_columns`, :class:`Conform` for Ray Data), decode a task column
(:func:`decode_column`) and iterate a table in batches (:func:`iter_table_batches`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from must_ray.io import is_uri
from must_ray.tasks import build_task, get_task_class, registered_task_names
from must_ray.tasks.base import Task

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


# ----------------------------------------------------------------------------- schema


def task_fields(task_names: Iterable[str]) -> list[pa.Field]:
    """The nullable columns of the given tasks, in the order given."""
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
        schema = table_schema(source)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def tasks_in_schema(schema: pa.Schema) -> list[str]:
    """Registered tasks whose presence column is in ``schema`` (canonical order)."""
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
    return _conform_to(table, examples_schema(task_names))


def _conform_to(table: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = [_column_as(table, f) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema.with_metadata(table.schema.metadata))


def with_columns(table: pa.Table, fields: Optional[Sequence[pa.Field]]) -> pa.Table:
    """``table`` (its other columns kept) with every field of ``fields``: cast to the field's type,
    all-null where the table lacks it."""
    table = table.combine_chunks()
    if not fields:
        return table
    wanted = {f.name for f in fields}
    names = [c for c in table.column_names if c not in wanted]
    arrays = [table.column(c) for c in names]
    names += [f.name for f in fields]
    arrays += [_column_as(table, f) for f in fields]
    return pa.Table.from_arrays(arrays, names=names)


def _column_as(table: pa.Table, f: pa.Field):
    if f.name not in table.column_names:
        return pa.nulls(table.num_rows, f.type)
    col = table.column(f.name)
    return col if col.type.equals(f.type) else col.cast(f.type)


class Conform:
    """Ray Data batch function: every batch gets the same columns, so tables of different tasks
    union. ``tasks``: exactly the base columns + those tasks' (:func:`conform`); ``fields``: the
    batch's columns plus ``fields`` (:func:`with_columns`). Schema metadata is dropped. The schema
    is resolved where the object is made (the driver), so the workers need no task registry."""

    def __init__(self, tasks: Optional[Sequence[str]] = None, fields: Optional[Sequence[pa.Field]] = None):
        self.schema = None if tasks is None else examples_schema(tasks)
        self.fields = list(fields or [])

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = _conform_to(batch, self.schema) if self.schema is not None else with_columns(batch, self.fields)
        return out.replace_schema_metadata(None)


def rows_to_table(rows: Sequence[Mapping[str, Any]], task_names: Sequence[str], provenance=None) -> pa.Table:
    """Build an examples table from row dicts (base cells + task cells; missing cells -> null)."""
    schema = examples_schema(task_names, provenance)
    data = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(data, schema=schema)


def decode_labels(row: Mapping[str, Any], task_names: Sequence[str], tasks=None) -> dict[str, Any]:
    """The labels of one row (a dict of cells) for ``task_names``; ``None`` where the row has none
    or the table lacks the task's columns."""
    out = {}
    for name in task_names:
        task = tasks[name] if tasks and name in tasks else build_task(name, num_classes=1)
        out[name] = decode_cells(task, {f.name: row.get(f.name) for f in task.columns()})
    return out


def decode_cells(task: Task, cells: Mapping[str, Any]) -> Any:
    """One row's cells of ``task`` -> its label, ``None`` when the presence cell is null."""
    return None if cells.get(task.presence_column()) is None else task.decode(dict(cells))


# ----------------------------------------------------------------------------- tables on disk


class TableNotFoundError(FileNotFoundError):
    """A table path that does not exist (the message names it)."""


def _locate(path: str) -> tuple[pafs.FileSystem, str]:
    location = str(path)
    return pafs.FileSystem.from_uri(location if is_uri(location) else os.path.abspath(location))


def table_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """``(filesystem, sorted paths)`` of the Parquet files that make up table ``path`` (a Parquet
    file, a directory of them, or a URI such as ``s3://...``): the one rule for what belongs to a
    table. In a directory: every file ending in ``.parquet``, recursively, except under a name that
    starts with ``_`` or ``.`` (the names pyarrow.dataset and Ray Data skip). must-ray keeps
    everything else a run writes (plans, markers, temp files) beside the table, never in it, so
    polars and DuckDB read the folder as the same table. Raises :class:`TableNotFoundError` when
    ``path`` does not exist."""
    fs, root = _locate(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return fs, [root]
    if info.type != pafs.FileType.Directory:
        raise TableNotFoundError(f"{path}: no such table (expected a Parquet file or a folder of them)")
    base = root.rstrip("/")
    files = []
    for entry in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        relative = entry.path[len(base) + 1:].replace(os.sep, "/")
        if (entry.type == pafs.FileType.File and relative.endswith(".parquet")
                and not any(part.startswith(("_", ".")) for part in relative.split("/"))):
            files.append(entry.path)
    return fs, sorted(files)


def non_table_files(path: str) -> list[str]:
    """Files under folder ``path`` that are not part of its table (:func:`table_files`), sorted;
    ``[]`` when ``path`` does not exist, ``[path]`` when it is a file. A job that replaces a table
    refuses a location with any."""
    fs, root = _locate(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        return [root]
    _, files = table_files(path)
    everything = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), recursive=True))
    return sorted(set(i.path for i in everything if i.type == pafs.FileType.File) - set(files))


def open_table(path: str) -> pads.Dataset:
    """An examples table (a Parquet file, a directory of them, or a URI pyarrow understands such
    as ``s3://...``) as a ``pyarrow.dataset.Dataset`` of its :func:`table_files`: the one way every
    module opens a table."""
    fs, files = table_files(path)
    return pads.dataset(files, format="parquet", filesystem=fs)


def table_schema(path: str) -> pa.Schema:
    """The Arrow schema (with key-value metadata) of an examples table: a Parquet file, a
    directory of them, or a URI pyarrow understands (``s3://...``)."""
    fs, files = table_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no Parquet files in the table")
    return pq.read_schema(files[0], filesystem=fs)


def table_rows(path: str) -> int:
    """Row count from Parquet footers (no data read)."""
    return int(open_table(path).count_rows())


def table_tasks(paths: Sequence[str]) -> list[str]:
    """Registered tasks (canonical order) whose presence column exists in at least one table."""
    names: set[str] = set()
    for p in paths:
        names.update(table_schema(p).names)
    return tasks_in_schema(pa.schema([pa.field(n, pa.null()) for n in sorted(names)]))


def table_classes(paths: Sequence[str], required: bool = True) -> list[str]:
    """The class vocabulary (provenance ``classes``) shared by ``paths``. Tables without a
    vocabulary are ignored; tables that disagree raise ValueError, and so does none having one
    when ``required`` (training must size its heads; evaluation can go without: ``[]``)."""
    found: dict[str, list[str]] = {}
    for p in paths:
        classes = read_provenance(table_schema(p)).get("classes")
        if classes:
            found[p] = list(classes)
    if not found:
        if not required:
            return []
        raise ValueError(f"none of the tables {list(paths)} records a class vocabulary "
                         "(Parquet metadata must_ray.classes); cannot size the heads")
    first_path, first = next(iter(found.items()))
    for p, classes in found.items():
        if classes != first:
            raise ValueError(f"tables disagree on the class vocabulary: {first_path} has {first}, {p} has {classes}")
    return first


def tables_bytes(paths: Sequence[str]) -> int:
    """Total size of the tables' Parquet files (a proxy for their in-memory size: the bulk is
    already-compressed image/label PNG bytes)."""
    total = 0
    for p in paths:
        ds = open_table(p)
        for info in ds.filesystem.get_file_info(list(ds.files)):
            total += max(int(info.size or 0), 0)
    return total


def labelled_rows(path: str, column: str) -> int:
    """Rows of table ``path`` whose ``column`` is non-null (0 when the table lacks it). Read from
    the Parquet footers' null counts when they are there (no data read)."""
    ds = open_table(path)
    if column not in ds.schema.names:
        return 0
    total = 0
    for f in sorted(ds.files):
        md = pq.ParquetFile(f, filesystem=ds.filesystem).metadata
        counted: Optional[int] = 0
        for rg in range(md.num_row_groups):
            group = md.row_group(rg)
            # flat columns only: a list column's footer stats describe its leaf elements
            col = next((group.column(j) for j in range(group.num_columns)
                        if group.column(j).path_in_schema == column), None)
            stats = col.statistics if col is not None else None
            if stats is None or not stats.has_null_count:
                counted = None
                break
            counted += group.num_rows - stats.null_count
        if counted is None:
            arr = pq.read_table(f, columns=[column], filesystem=ds.filesystem).column(column)
            counted = len(arr) - arr.null_count
        total += counted
    return int(total)


def iter_table_batches(paths: Sequence[str], columns: Sequence[str], batch_size: int,
                       fields: Optional[Sequence[pa.Field]] = None) -> Iterator[pa.Table]:
    """Batches of exactly ``batch_size`` rows (the last of each file may be shorter) of every file of
    every table, in sorted file order; missing ``fields`` are added as nulls (the local twin of the
    Ray Data read in :func:`evaluate_model`)."""
    for path in paths:
        ds = open_table(path)
        names = ds.schema.names
        cols = [c for c in columns if c in names]
        for f in sorted(ds.files):
            pending: list[pa.RecordBatch] = []
            n = 0
            for rb in pq.ParquetFile(f, filesystem=ds.filesystem).iter_batches(batch_size=batch_size, columns=cols):
                pending.append(rb)
                n += rb.num_rows
                while n >= batch_size:
                    table = pa.Table.from_batches(pending)
                    yield with_columns(table.slice(0, batch_size), fields)
                    rest = table.slice(batch_size)
                    pending, n = rest.to_batches(), rest.num_rows
            if n:
                yield with_columns(pa.Table.from_batches(pending), fields)


def decode_column(task: Task, batch: pa.Table) -> list[Any]:
    """The task's labels for every row of ``batch`` (``None`` where the presence cell is null or the
    batch lacks the task's columns)."""
    cols = [f.name for f in task.columns()]
    n = batch.num_rows
    if cols[0] not in batch.column_names or batch.column(cols[0]).null_count == n:
        return [None] * n
    cells = {c: (batch.column(c).to_pylist() if c in batch.column_names else [None] * n) for c in cols}
    return [decode_cells(task, {c: cells[c][i] for c in cols}) for i in range(n)]


def read_labels(paths: Sequence[str], task: Task, limit: Optional[int] = None) -> list[Any]:
    """The first ``limit`` labels of ``task`` found in the tables (rows without a label skipped)."""
    out: list[Any] = []
    cols = [f.name for f in task.columns()]
    for path in paths:
        ds = open_table(path)
        present = [c for c in cols if c in ds.schema.names]
        if cols[0] not in present:
            continue
        for rb in ds.to_batches(columns=present, filter=pads.field(cols[0]).is_valid()):
            out.extend(lab for lab in decode_column(task, pa.Table.from_batches([rb])) if lab is not None)
            if limit is not None and len(out) >= limit:
                return out[:limit]
    return out
