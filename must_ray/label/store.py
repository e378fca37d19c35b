"""The labelling output: an examples table written shard by shard with atomic commits.

Layout of ``label.output`` (a local path or a URI); the table folder holds the table and nothing
else, so every Parquet reader (pyarrow.dataset, Ray Data, pandas, polars, DuckDB with ``*.parquet``
or ``**/*.parquet``) reads it as exactly the table; the run's bookkeeping lives beside it::

    <output>/part-000000.parquet ...                    the pseudo-label examples table (one file per shard)
    <output>_quarantine/quarantine-000000.parquet ...   inputs that could not be labelled + reasons
    <output>_manifest/plan/piece-000000.arrow ...       every input id -> shard, in pieces (Arrow IPC, one
    <output>_manifest/plan/index.arrow                  record batch per shard; ``label.plan``: written
                                                        once, reused on resume)
    <output>_manifest/run.json                          what the run labels with (input, teachers + hashes ...)
    <output>_manifest/SUCCESS.json                      the final summary, after the exactly-once check passed
    <output>_manifest/tmp/                              files being written (emptied at the end)
    <output>_manifest/attempts/<shard>                  a shard an actor started in this run (emptied when a
                                                        run starts): found by a second attempt = retried

A plan of more than ``label.files_per_dir`` shards spreads the part and quarantine files over
sub-directories of ``files_per_dir`` shards each (``<output>/0000/part-000000.parquet``,
``<output>/0001/part-010000.parquet`` ...), so no directory holds more than ``files_per_dir``
files and the resume check lists one small directory at a time; a smaller plan keeps the flat
layout above. The choice is recorded in ``run.json`` (``files_per_dir``; absent = flat).

An output written by an older must-ray (``<output>/_manifest/plan.parquet``, ``<output>/_SUCCESS.json``,
``_tmp/`` folders inside the tables) is moved to this layout the first time a run opens it
(:meth:`OutputStore.read_run`), so resuming it works and its folder becomes a clean table.

**Commit protocol** (one shard): write the quarantine rows (if any) to a temp file and move it to
``<output>_quarantine/quarantine-S.parquet`` (or delete a stale one), then write the labelled rows to a temp
file and move it to ``part-S.parquet``. The appearance of ``part-S.parquet`` is the commit; a
rename within one filesystem is atomic (the temp folder is a sibling of the tables, so on the same
filesystem; on object stores, where a move is a copy, the object is written directly under its
final name: an upload becomes visible only once complete). Why that is exactly once:

* every input id belongs to exactly one shard (the plan, fixed at the first run);
* ``part-S`` exists only complete (atomic), and only after ``quarantine-S`` holds S's bad inputs, so
  a committed shard's ids are exactly its part rows plus its quarantine rows;
* a run labels only shards without ``part-S``; re-labelling a shard (a retried task, a resumed run,
  a zombie worker of a killed run) rewrites the *same two names* with the same rows, so an id can
  never be in two files; it can only be rewritten in place;
* ``label.verify`` checks it anyway at the end, shard by shard in Ray tasks: ids of each part and
  quarantine file == its shard's planned ids, no duplicates, the two sets disjoint.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from must_ray.label.inputs import filesystem_for
from must_ray.label.paths import hidden_name

PART_RE = re.compile(r"^part-(\d+)\.parquet$")
QUARANTINE_RE = re.compile(r"^quarantine-(\d+)\.parquet$")
QUARANTINE_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("path", pa.string()),  # file path / table file ("" for rendered world scenes)
    pa.field("source", pa.string()),
    # empty | not_an_image | truncated | too_large | decode_error | read_error
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
    pa.field("shard", pa.int32(), nullable=False),
])


class OutputStore:
    """File operations on one labelling output (picklable: actors commit their own shards)."""

    def __init__(self, output: str, files_per_dir: int = 0):
        self.output = output
        self.files_per_dir = files_per_dir  # > 0: part files in sub-directories of this many shards
        self.fs, self.root, _ = filesystem_for(output)
        self.local = self.fs.type_name == "local"
        self.object_store = self.fs.type_name in ("s3", "gcs")

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @staticmethod
    def part_name(shard: int) -> str:
        return f"part-{shard:06d}.parquet"

    @staticmethod
    def quarantine_name(shard: int) -> str:
        return f"quarantine-{shard:06d}.parquet"

    def _subdir(self, shard: int) -> str:
        return f"{shard // self.files_per_dir:04d}/" if self.files_per_dir else ""

    def part_path(self, shard: int) -> str:
        """Where shard ``shard``'s part file lives (flat, or in its sub-directory)."""
        return self.path(self._subdir(shard) + self.part_name(shard))

    def quarantine_path(self, shard: int) -> str:
        """Where shard ``shard``'s quarantine file lives (beside the table, same sub-directory rule)."""
        return f"{self.quarantine_dir}/{self._subdir(shard)}{self.quarantine_name(shard)}"

    @property
    def quarantine_dir(self) -> str:
        return self.root.rstrip("/") + "_quarantine"

    @property
    def quarantine_uri(self) -> str:
        return self.output.rstrip("/") + "_quarantine"

    @property
    def manifest_dir(self) -> str:
        """The run's bookkeeping (plan, run.json, SUCCESS.json, temp files), beside the table."""
        return self.root.rstrip("/") + "_manifest"

    @property
    def manifest_uri(self) -> str:
        return self.output.rstrip("/") + "_manifest"

    @property
    def plan_path(self) -> str:
        """The plan of the previous layout (one Arrow file; ``label.plan`` converts it to pieces)."""
        return self.manifest_dir + "/plan.arrow"

    @property
    def plan_dir(self) -> str:
        """The plan's pieces and index (``label.plan``)."""
        return self.manifest_dir + "/plan"

    @property
    def run_path(self) -> str:
        return self.manifest_dir + "/run.json"

    @property
    def success_path(self) -> str:
        return self.manifest_dir + "/SUCCESS.json"

    @property
    def tmp_dir(self) -> str:
        return self.manifest_dir + "/tmp"

    @property
    def attempts_dir(self) -> str:
        return self.manifest_dir + "/attempts"

    # ------------------------------------------------------------------ basic io
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _is_dir(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.Directory

    def makedirs(self) -> None:
        for d in (self.root, self.quarantine_dir, self.manifest_dir, self.tmp_dir, self.attempts_dir):
            self.fs.create_dir(d, recursive=True)

    def _write_bytes_atomic(self, final: str, write) -> None:
        """Write with ``write(stream)`` so that ``final`` appears complete or not at all."""
        if self.object_store:
            with self.fs.open_output_stream(final) as f:
                write(f)
            return
        # the temp folder is a sibling of the tables (same filesystem: the move is a rename)
        tmp = f"{self.tmp_dir}/{os.path.basename(final)}.{uuid.uuid4().hex}.tmp"
        if self.local:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(os.path.dirname(final))
        else:
            with self.fs.open_output_stream(tmp) as f:
                write(f)
            self.fs.move(tmp, final)

    def write_ipc(self, final: str, schema: pa.Schema, batches) -> None:
        """Write the record ``batches`` as one Arrow IPC file ``final``, atomically."""
        def write(f):
            with pa.ipc.new_file(f, schema) as writer:
                for batch in batches:
                    writer.write_batch(batch)
        self._write_bytes_atomic(final, write)

    def write_table(self, final: str, table: pa.Table) -> None:
        self._write_bytes_atomic(final, lambda f: pq.write_table(table, f))

    def write_json(self, final: str, obj: Any) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True, default=str).encode()
        self._write_bytes_atomic(final, lambda f: f.write(data))

    def read_json(self, path: str) -> Optional[dict]:
        if not self.exists(path):
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def delete(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_file(path)

    def clear(self) -> None:
        """Delete the whole output (``label.overwrite``): the table, its quarantine and manifest."""
        for d in (self.root, self.quarantine_dir, self.manifest_dir):
            if self._is_dir(d):
                self.fs.delete_dir(d)

    def remove_empty_quarantine(self) -> None:
        """Drop ``<output>_quarantine`` when it holds no quarantine file (nothing was quarantined)."""
        if not self.quarantine_files() and self._is_dir(self.quarantine_dir):
            self.fs.delete_dir(self.quarantine_dir)

    def clear_plan(self) -> None:
        """Remove a plan that was never completed (its run.json missing: the planning run died)."""
        if self._is_dir(self.plan_dir):
            self.fs.delete_dir(self.plan_dir)

    def clean_tmp(self) -> None:
        """Remove temp files left by writers that died, and the previous run's attempt marks (only
        call while no writer runs)."""
        for d in (self.tmp_dir, self.attempts_dir):
            if self._is_dir(d):
                self.fs.delete_dir_contents(d, missing_dir_ok=True)

    def start_attempt(self, shard: int, node: str) -> Optional[str]:
        """Mark ``shard`` as started by an actor on ``node``. Returns the node of an earlier attempt
        in this run (the shard is being retried: that actor or its node was lost mid-shard), else
        ``None``."""
        path = f"{self.attempts_dir}/{shard:08d}"
        if self.exists(path):
            with self.fs.open_input_stream(path) as f:
                return f.read().decode() or "?"
        data = node.encode()
        self._write_bytes_atomic(path, lambda f: f.write(data))
        return None

    # ------------------------------------------------------------------ manifest
    def write_plan(self, plan: pa.Table) -> None:
        """Write a whole plan as one file in the previous layout (``plan_path``; moving an old output)."""
        self._write_bytes_atomic(self.plan_path, lambda f: _write_ipc(plan, f))

    def read_plan(self) -> Optional[pa.Table]:
        """The previous layout's one-file plan (None when there is none)."""
        if not self.exists(self.plan_path):
            return None
        with self.fs.open_input_file(self.plan_path) as f:
            return pa.ipc.open_file(f).read_all()

    def write_run(self, run: dict) -> None:
        self.write_json(self.run_path, run)

    def read_run(self) -> Optional[dict]:
        """The run's identity (None for a new output); an output in the old layout is moved to
        the current one first (:meth:`migrate_legacy_layout`)."""
        self.migrate_legacy_layout()
        return self.read_json(self.run_path)

    def write_success(self, summary: dict) -> None:
        self.write_json(self.success_path, summary)

    def read_success(self) -> Optional[dict]:
        return self.read_json(self.success_path)

    def migrate_legacy_layout(self) -> bool:
        """Move an older must-ray's bookkeeping out of the table folders (``<output>/_manifest/``,
        ``<output>/_SUCCESS.json``, ``_tmp/`` in the table and its quarantine) into
        ``<output>_manifest/``, so the folder is a clean table and the run resumes. Idempotent (a
        crash half-way is finished by the next call); returns whether there was anything to move."""
        legacy_manifest = self.path("_manifest")
        legacy_success = self.path("_SUCCESS.json")
        legacy = [d for d in (legacy_manifest, self.path("_tmp"), self.quarantine_dir + "/_tmp") if self._is_dir(d)]
        if not legacy and not self.exists(legacy_success):
            return False
        self.fs.create_dir(self.tmp_dir, recursive=True)
        old_run = self.read_json(legacy_manifest + "/run.json")
        old_plan = legacy_manifest + "/plan.parquet"
        if old_run is not None and self.exists(old_plan) and not self.exists(self.run_path):
            self.write_plan(pq.read_table(old_plan, filesystem=self.fs))
            old_success = self.read_json(legacy_success)
            if old_success is not None:
                self.write_success(old_success)
            self.write_run(old_run)  # last: run.json present => plan complete
        self.delete(legacy_success)
        for d in legacy:
            self.fs.delete_dir(d)
        return True

    # ------------------------------------------------------------------ shards
    def _shard_files(self, folder: str, pattern: re.Pattern) -> dict[int, str]:
        """``{shard: path}`` of the files named like ``pattern`` in ``folder`` (and, nested, in its
        sub-directories: one directory listed at a time, never the whole tree at once)."""
        if not self._is_dir(folder):
            return {}
        folders = [folder]
        if self.files_per_dir:
            folders = sorted(i.path for i in self.fs.get_file_info(pafs.FileSelector(folder, recursive=False))
                             if i.type == pafs.FileType.Directory and not hidden_name(os.path.basename(i.path)))
        out: dict[int, str] = {}
        for d in folders:
            for info in self.fs.get_file_info(pafs.FileSelector(d, recursive=False)):
                m = pattern.match(os.path.basename(info.path))
                if m and info.type == pafs.FileType.File:
                    out[int(m.group(1))] = info.path
        return out

    def committed_shards(self) -> set[int]:
        """Shards whose part file exists (= committed)."""
        return set(self._shard_files(self.root, PART_RE))

    def commit_shard(self, shard: int, table: pa.Table, quarantine: pa.Table) -> None:
        """The commit protocol of the module docstring: quarantine first, the part file last."""
        qpath = self.quarantine_path(shard)
        if quarantine.num_rows:
            if self.files_per_dir:
                self.fs.create_dir(os.path.dirname(qpath), recursive=True)
            self.write_table(qpath, quarantine)
        else:
            self.delete(qpath)  # a stale one from an uncommitted attempt with other settings
        final = self.part_path(shard)
        if self.files_per_dir:
            self.fs.create_dir(os.path.dirname(final), recursive=True)
        self.write_table(final, table)

    def part_files(self) -> list[str]:
        return [p for _, p in sorted(self._shard_files(self.root, PART_RE).items())]

    def quarantine_shards(self) -> dict[int, str]:
        """``{shard: quarantine file}`` of the shards with quarantined inputs."""
        return self._shard_files(self.quarantine_dir, QUARANTINE_RE)

    def quarantine_files(self) -> list[str]:
        return [p for _, p in sorted(self.quarantine_shards().items())]

    def read_ids(self, path: str) -> list[str]:
        """The ``image_id`` column of one part or quarantine file (nothing else is read)."""
        return pq.read_table(path, columns=["image_id"], filesystem=self.fs).column("image_id").to_pylist()


def _write_ipc(table: pa.Table, sink) -> None:
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["OutputStore", "QUARANTINE_SCHEMA", "PART_RE", "QUARANTINE_RE"]
