"""The labelling output: an examples table written shard by shard with atomic commits.

Layout of ``label.output`` (a local path or a URI); the table folder holds the table and nothing
else, so every Parquet reader (pyarrow.dataset, Ray Data, pandas, polars, DuckDB with ``*.parquet``
or ``**/*.parquet``) reads it as exactly the table; the run's bookkeeping lives beside it::

    <output>/part-000000.parquet ...                    the pseudo-label examples table (one file per shard)
    <output>_quarantine/quarantine-000000.parquet ...   inputs that could not be labelled + reasons
    <output>_manifest/plan.arrow                        every input id -> shard (Arrow IPC; written once,
                                                        reused on resume)
    <output>_manifest/run.json                          what the run labels with (input, teachers + hashes ...)
    <output>_manifest/SUCCESS.json                      the final summary, after the exactly-once check passed
    <output>_manifest/tmp/                              files being written (emptied at the end)

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
* :meth:`OutputStore.verify` checks it anyway at the end: ids of all part and quarantine files ==
  the plan's ids, no duplicates, the two sets disjoint.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from typing import Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from must_ray.label.inputs import filesystem_for

PART_RE = re.compile(r"^part-(\d+)\.parquet$")
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

    def __init__(self, output: str):
        self.output = output
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
    def plan_path(self) -> str:
        return self.manifest_dir + "/plan.arrow"

    @property
    def run_path(self) -> str:
        return self.manifest_dir + "/run.json"

    @property
    def success_path(self) -> str:
        return self.manifest_dir + "/SUCCESS.json"

    @property
    def tmp_dir(self) -> str:
        return self.manifest_dir + "/tmp"

    # ------------------------------------------------------------------ basic io
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _is_dir(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.Directory

    def makedirs(self) -> None:
        for d in (self.root, self.quarantine_dir, self.manifest_dir, self.tmp_dir):
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

    def clean_tmp(self) -> None:
        """Remove temp files left by writers that died (only call while no writer runs)."""
        if self._is_dir(self.tmp_dir):
            self.fs.delete_dir_contents(self.tmp_dir, missing_dir_ok=True)

    # ------------------------------------------------------------------ manifest
    def write_plan(self, plan: pa.Table) -> None:
        self._write_bytes_atomic(self.plan_path, lambda f: _write_ipc(plan, f))

    def read_plan(self) -> Optional[pa.Table]:
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
    def committed_shards(self) -> set[int]:
        """Shards whose ``part-S.parquet`` exists (= committed)."""
        if not self._is_dir(self.root):
            return set()
        out = set()
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False)):
            m = PART_RE.match(os.path.basename(info.path))
            if m and info.type == pafs.FileType.File:
                out.add(int(m.group(1)))
        return out

    def commit_shard(self, shard: int, table: pa.Table, quarantine: pa.Table) -> None:
        """The commit protocol of the module docstring: quarantine first, the part file last."""
        qpath = f"{self.quarantine_dir}/{self.quarantine_name(shard)}"
        if quarantine.num_rows:
            self.write_table(qpath, quarantine)
        else:
            self.delete(qpath)  # a stale one from an uncommitted attempt with other settings
        self.write_table(self.path(self.part_name(shard)), table)

    def part_files(self) -> list[str]:
        return [self.path(self.part_name(s)) for s in sorted(self.committed_shards())]

    def quarantine_files(self) -> list[str]:
        if not self._is_dir(self.quarantine_dir):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.quarantine_dir, recursive=False))
        return sorted(i.path for i in infos
                      if i.path.endswith(".parquet") and os.path.basename(i.path).startswith("quarantine-"))

    def quarantine_reasons(self) -> dict[str, int]:
        """How many inputs the quarantine files hold, by reason (sorted by reason)."""
        c: Counter = Counter()
        for f in self.quarantine_files():
            c.update(pq.read_table(f, columns=["reason"], filesystem=self.fs).column("reason").to_pylist())
        return dict(sorted(c.items()))

    def read_ids(self, files: list[str]) -> list[str]:
        """The ``image_id`` column of ``files`` (read in parallel, nothing else is read)."""
        if not files:
            return []
        import pyarrow.dataset as pads

        table = pads.dataset(files, format="parquet", filesystem=self.fs).to_table(columns=["image_id"])
        return table.column("image_id").to_pylist()

    def verify(self, plan: pa.Table) -> dict[str, Any]:
        """The exactly-once check: the ids in part files and quarantine files are together exactly
        the plan's ids, each once. Returns the counts; raises RuntimeError naming examples."""
        expected = plan.column("image_id").to_pylist()
        written = self.read_ids(self.part_files())
        quarantined = self.read_ids(self.quarantine_files())
        problems = []
        for name, ids in (("written", written), ("quarantined", quarantined)):
            if len(set(ids)) != len(ids):
                seen: set[str] = set()
                dups = [i for i in ids if i in seen or seen.add(i)]
                problems.append(f"{len(dups)} duplicate {name} ids (e.g. {dups[:3]})")
        both = set(written) & set(quarantined)
        if both:
            problems.append(f"{len(both)} ids both written and quarantined (e.g. {sorted(both)[:3]})")
        got = set(written) | set(quarantined)
        want = set(expected)
        if got - want:
            problems.append(f"{len(got - want)} ids not in the plan (e.g. {sorted(got - want)[:3]})")
        if want - got:
            problems.append(f"{len(want - got)} planned ids missing (e.g. {sorted(want - got)[:3]})")
        if len(written) + len(quarantined) != len(expected):
            problems.append(f"rows_written {len(written)} + rows_quarantined {len(quarantined)} "
                            f"!= inputs {len(expected)}")
        if problems:
            raise RuntimeError(f"exactly-once check failed for {self.output}: " + "; ".join(problems))
        return {"inputs": len(expected), "rows": len(written), "quarantined": len(quarantined)}


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


__all__ = ["OutputStore", "QUARANTINE_SCHEMA", "PART_RE"]
