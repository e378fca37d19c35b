"""The labelling plan: every input id -> exactly one shard, fixed at a run's first start and reused
by every resume. The driver holds it as a few numbers per shard, never as ids, so its memory
grows with the number of shards, not of images.

Layout (``<output>_manifest/plan/``)::

    piece-000000.arrow ...  Arrow IPC files, one record batch per shard (image_id, locator, offset)
    index.arrow             one row per shard, in shard order: its piece, its batch, its inputs

:func:`write_plan` has the pieces written by Ray tasks (in process when no Ray is connected): a
world split in blocks of its index range, a table one task per file (a table's shards never span
two files), a local folder by one task per top-level sub-folder (:func:`plan_folder`; one task for
the whole tree when it holds a folder link: ``paths.walk_folder``'s rule that a linked folder is
listed once needs the whole tree). Shards are contiguous runs of the shard size in listing order,
as before. The driver only collects each piece's shard sizes, then writes the index; ``run.json``
comes after it (present => the plan is complete), so a planning run killed half-way leaves no
plan a resume could trust, and the next run plans again from scratch. A shard descriptor names its
piece and batch (:meth:`Plan.descriptors`); the decode task reads its own ids
(``inputs.shard_inputs``). An output whose plan is one ``plan.arrow`` (the previous layout) is
converted to pieces the first time a run opens it (:func:`load_plan`).
"""
from __future__ import annotations

import bisect
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from must_ray.config import Config
from must_ray.label.inputs import (
    LabelInput,
    filesystem_for,
    list_files,
    parquet_files,
    read_plan_batch,
    select_entries,
    table_file_ids,
)
from must_ray.label.paths import folder_children, walk_real_tree
from must_ray.label.store import OutputStore
from must_ray.progress import progress_text
from must_ray.typed_config import ConfigError
from must_ray.world.splits import image_id_for

PIECE_SCHEMA = pa.schema([("image_id", pa.string()), ("locator", pa.string()), ("offset", pa.int64())])
INDEX_SCHEMA = pa.schema([("piece", pa.int32()), ("batch", pa.int32()), ("rows", pa.int64())])
#: seconds the driver waits after each finished plan piece (fault-injection tests kill it meanwhile)
PAUSE_ENV = "MUST_RAY_PLAN_PAUSE_S"


def piece_name(k: int) -> str:
    return f"piece-{k:06d}.arrow"


def index_path(store: OutputStore) -> str:
    return store.plan_dir + "/index.arrow"


@dataclass
class Plan:
    """A written plan as the driver holds it: per shard its piece, batch and number of inputs."""

    store: OutputStore
    pieces: list[str]
    piece: np.ndarray
    batch: np.ndarray
    rows: np.ndarray

    @property
    def num_shards(self) -> int:
        return len(self.rows)

    @property
    def num_rows(self) -> int:
        return int(self.rows.sum())

    def piece_uri(self, k: int) -> str:
        """Path or URI of piece ``k`` (what a decode or verify task opens)."""
        return f"{self.store.manifest_uri}/plan/{self.pieces[k]}"

    def descriptors(self, shards: Sequence[int]) -> list[dict[str, Any]]:
        """The work items of ``shards``: ``{"shard", "piece", "batch"}``, no ids."""
        return [{"shard": int(s), "piece": self.piece_uri(int(self.piece[s])), "batch": int(self.batch[s])}
                for s in shards]

    def images(self, shards: Sequence[int]) -> int:
        """How many inputs ``shards`` hold."""
        return int(self.rows[np.asarray(shards, dtype=np.int64)].sum()) if len(shards) else 0

    def read_shard(self, shard: int) -> pa.RecordBatch:
        """Shard ``shard``'s planned inputs (``image_id``, ``locator``, ``offset``)."""
        return read_plan_batch(self.piece_uri(int(self.piece[shard])), int(self.batch[shard]))

    def by_piece(self) -> list[tuple[int, list[tuple[int, int]]]]:
        """``[(piece, [(shard, batch), ...]), ...]`` for the pieces that hold shards."""
        order = np.argsort(self.piece, kind="stable")
        out: dict[int, list[tuple[int, int]]] = {}
        for s in order.tolist():
            out.setdefault(int(self.piece[s]), []).append((s, int(self.batch[s])))
        return sorted(out.items())

    def to_table(self) -> pa.Table:
        """The whole plan as one table (``shard``, ``image_id``, ``locator``, ``offset``): for tests
        and small outputs only, it holds every id."""
        batches = [self.read_shard(s) for s in range(self.num_shards)]
        shard = np.repeat(np.arange(self.num_shards, dtype=np.int32), self.rows)
        table = pa.Table.from_batches(batches, schema=PIECE_SCHEMA)
        return table.add_column(0, "shard", pa.array(shard, pa.int32()))

    def save(self) -> None:
        """Write the index (after every piece it names)."""
        meta = {b"pieces": json.dumps(self.pieces).encode()}
        batch = pa.record_batch([pa.array(self.piece, pa.int32()), pa.array(self.batch, pa.int32()),
                                 pa.array(self.rows, pa.int64())], schema=INDEX_SCHEMA)
        self.store.write_ipc(index_path(self.store), INDEX_SCHEMA.with_metadata(meta), [batch])

    @classmethod
    def load(cls, store: OutputStore) -> Optional["Plan"]:
        """The plan written in ``store`` (None when it has no index)."""
        if not store.exists(index_path(store)):
            return None
        with store.fs.open_input_file(index_path(store)) as f:
            table = pa.ipc.open_file(f).read_all()
        pieces = json.loads(table.schema.metadata[b"pieces"].decode())
        return cls(store, pieces, table.column("piece").to_numpy().astype(np.int32),
                   table.column("batch").to_numpy().astype(np.int32), table.column("rows").to_numpy().astype(np.int64))


def load_plan(store: OutputStore) -> Optional[Plan]:
    """The plan of an existing output, converting a previous layout's one-file ``plan.arrow`` to
    pieces first (idempotent: a conversion cut short is redone). None when there is none."""
    plan = Plan.load(store)
    if plan is not None:
        store.delete(store.plan_path)
        return plan
    table = store.read_plan()
    if table is None:
        return None
    store.clear_plan()
    plan = plan_from_table(store, table)
    store.delete(store.plan_path)
    return plan


def plan_from_table(store: OutputStore, table: pa.Table, piece_rows: int = 1 << 18) -> Plan:
    """Write a whole plan table (``shard``, ``image_id``, ``locator``, ``offset``; shards contiguous)
    as pieces and an index."""
    shard = table.column("shard").to_numpy()
    starts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])
    sizes = np.diff(np.r_[starts, len(shard)])
    pieces, piece, batch = [], [], []
    body = table.select(["image_id", "locator", "offset"]).cast(PIECE_SCHEMA)
    k = first = 0
    while first < len(starts):
        last = first
        total = sizes[first]
        while last + 1 < len(starts) and total + sizes[last + 1] <= piece_rows:
            last += 1
            total += sizes[last]
        batches = [body.slice(int(starts[s]), int(sizes[s])).combine_chunks().to_batches()[0]
                   for s in range(first, last + 1)]
        _write_piece(store, piece_name(k), batches)
        pieces.append(piece_name(k))
        piece.extend([k] * len(batches))
        batch.extend(range(len(batches)))
        k, first = k + 1, last + 1
    plan = Plan(store, pieces, np.array(piece, np.int32), np.array(batch, np.int32), sizes.astype(np.int64))
    plan.save()
    return plan


# ----------------------------------------------------------------------------- the piece writers (tasks)


def _write_piece(store: OutputStore, name: str, batches: list[pa.RecordBatch]) -> list[int]:
    for d in (store.plan_dir, store.tmp_dir):
        store.fs.create_dir(d, recursive=True)
    store.write_ipc(f"{store.plan_dir}/{name}", PIECE_SCHEMA, batches)
    return [b.num_rows for b in batches]


def _shard_batches(ids: pa.Array, locs: pa.Array, offs: pa.Array, shard_size: int) -> list[pa.RecordBatch]:
    n = len(ids)
    return [pa.record_batch([ids.slice(i, shard_size), locs.slice(i, shard_size), offs.slice(i, shard_size)],
                            schema=PIECE_SCHEMA) for i in range(0, n, shard_size)]


def world_piece(store: OutputStore, name: str, seed: int, domain: str, first: int, count: int,
                shard_size: int) -> dict[str, Any]:
    """Plan piece ``name``: world scenes ``first .. first + count - 1`` (ids computed, nothing rendered)."""
    ids = pa.array([image_id_for(seed, domain, first + i) for i in range(count)], pa.string())
    offs = pa.array(np.arange(first, first + count, dtype=np.int64))
    rows = _write_piece(store, name, _shard_batches(ids, pa.repeat(pa.scalar("", pa.string()), count), offs,
                                                    shard_size))
    return {"piece": name, "rows": rows}


def table_piece(store: OutputStore, name: str, inp: LabelInput, path: str, shard_size: int) -> dict[str, Any]:
    """Plan piece ``name``: the rows of table file ``path`` (checked first: ``inputs.table_file_ids``);
    ``{"error": ...}`` instead when the file is not a usable table."""
    try:
        values = table_file_ids(inp, path)
    except ConfigError as exc:
        return {"error": str(exc)}
    n = len(values)
    batches = _shard_batches(pa.array(values, pa.string()), pa.repeat(pa.scalar(path, pa.string()), n),
                             pa.array(np.arange(n, dtype=np.int64)), shard_size)
    return {"piece": name, "rows": _write_piece(store, name, batches)}


def files_pieces(store: OutputStore, cfg: Config, inp: LabelInput, shard_size: int,
                 piece_rows: int) -> dict[str, Any]:
    """The pieces of a ``files`` input: its listing (``inputs.list_files``) cut into pieces of whole
    shards; also what was found that is not an input."""
    listing = list_files(cfg, inp)
    per_piece = max(1, piece_rows // shard_size) * shard_size
    ids = pa.array(listing.image_id, pa.string())
    locs = pa.array(listing.locator, pa.string())
    offs = pa.array(listing.offset, pa.int64())
    del listing.image_id, listing.locator, listing.offset
    out = []
    for k, first in enumerate(range(0, len(ids), per_piece)):
        n = min(per_piece, len(ids) - first)
        rows = _write_piece(store, piece_name(k), _shard_batches(ids.slice(first, n), locs.slice(first, n),
                                                                 offs.slice(first, n), shard_size))
        out.append({"piece": piece_name(k), "rows": rows})
    return {"pieces": out, "ignored": listing.ignored}


def _write_listing(store: OutputStore, name: str, listing) -> int:
    """A folder part's inputs as a temporary listing file (``plan/listing/``); their number."""
    for d in (store.plan_dir + "/listing", store.tmp_dir):
        store.fs.create_dir(d, recursive=True)
    batch = pa.record_batch([pa.array(listing.image_id, pa.string()), pa.array(listing.locator, pa.string()),
                             pa.array(listing.offset, pa.int64())], schema=PIECE_SCHEMA)
    store.write_ipc(f"{store.plan_dir}/listing/{name}", PIECE_SCHEMA, [batch])
    return batch.num_rows


def scan_top(store: OutputStore, cfg: Config, inp: LabelInput) -> dict[str, Any]:
    """Task: the top level of a local folder input. Its inputs go to a listing file; returned: its
    real sub-folders, where each one's inputs fall among the top-level ones in path order, and the
    ignored counts. ``{"split": False}`` when it cannot be split (unlistable, or a folder link)."""
    try:
        entries, real, linked = folder_children(inp.root)
    except OSError:
        return {"split": False}
    if linked or not real:
        return {"split": False}
    listing = select_entries(cfg, inp, entries)
    rows = _write_listing(store, "top.arrow", listing)
    # a folder's files sort at its path + "/", after a top-level "a.png" and before "a0.png"
    positions = [bisect.bisect_left(listing.locator, d + "/") for d in real]
    return {"split": True, "rows": rows, "dirs": real, "positions": positions, "ignored": listing.ignored}


def list_subfolder(store: OutputStore, cfg: Config, inp: LabelInput, folder: str, name: str) -> dict[str, Any]:
    """Task: the inputs below one top-level sub-folder to a listing file; ``{"linked": True}``
    instead when the sub-tree holds a folder link (the whole tree is then listed by one task)."""
    entries, linked = walk_real_tree(folder)
    if linked:
        return {"linked": True}
    listing = select_entries(cfg, inp, entries)
    return {"rows": _write_listing(store, name, listing), "ignored": listing.ignored}


def piece_from_listings(store: OutputStore, name: str, slices: list[tuple[str, int, int]],
                        shard_size: int) -> dict[str, Any]:
    """Task: plan piece ``name`` from ``(listing uri, first row, rows)`` slices, in order."""
    parts = []
    for uri, first, count in slices:
        fs, path, _ = filesystem_for(uri)
        with fs.open_input_file(path) as f:
            parts.append(pa.ipc.open_file(f).read_all().slice(first, count))
    table = pa.concat_tables(parts).combine_chunks()
    ids, locs, offs = (table.column(c).chunk(0) if table.num_rows else pa.array([], t)
                       for c, t in (("image_id", pa.string()), ("locator", pa.string()), ("offset", pa.int64())))
    return {"piece": name, "rows": _write_piece(store, name, _shard_batches(ids, locs, offs, shard_size))}


def plan_folder(store: OutputStore, cfg: Config, inp: LabelInput, shard_size: int, piece_rows: int,
                remote: bool) -> Optional[tuple[list[dict[str, Any]], dict[str, int]]]:
    """The pieces of a local folder input listed by one task per top-level sub-folder (the same
    inputs, order and shards as one walk of the whole tree: without folder links, disjoint
    sub-trees walk apart), then one task per piece. None when the folder cannot be split that way
    (not local, no sub-folder, a folder link): the caller lists it in one task."""
    if inp.filesystem.type_name != "local" or not os.path.isdir(inp.root):
        return None
    (top,) = run_tasks([(scan_top, (store, cfg, inp))], remote, tag="list")
    if not top["split"]:
        return None
    subs = run_tasks([(list_subfolder, (store, cfg, inp, d, f"sub-{i:06d}.arrow")) for i, d in enumerate(top["dirs"])],
                     remote, tag="list")
    listing_dir = f"{store.manifest_uri}/plan/listing"
    if any(r.get("linked") for r in subs):
        store.fs.delete_dir(store.plan_dir + "/listing")
        return None
    segments: list[tuple[str, int, int]] = []  # (listing, first row, rows) in path order
    previous = 0
    for i, position in enumerate(top["positions"]):
        if position > previous:
            segments.append((f"{listing_dir}/top.arrow", previous, position - previous))
        segments.append((f"{listing_dir}/sub-{i:06d}.arrow", 0, subs[i]["rows"]))
        previous = position
    if top["rows"] > previous:
        segments.append((f"{listing_dir}/top.arrow", previous, top["rows"] - previous))
    total = sum(n for _, _, n in segments)
    per_piece = max(1, piece_rows // shard_size) * shard_size
    jobs, seg, used = [], 0, 0
    for k, start in enumerate(range(0, total, per_piece)):
        want, slices = min(per_piece, total - start), []
        while want:
            uri, first, count = segments[seg]
            take = min(want, count - used)
            if take:
                slices.append((uri, first + used, take))
            want, used = want - take, used + take
            if used == count:
                seg, used = seg + 1, 0
        jobs.append((piece_from_listings, (store, piece_name(k), slices, shard_size)))
    pieces = run_tasks(jobs, remote)
    store.fs.delete_dir(store.plan_dir + "/listing")
    ignored: dict[str, int] = {}
    for r in [top, *subs]:
        for kind, n in r["ignored"].items():
            ignored[kind] = ignored.get(kind, 0) + n
    return pieces, dict(sorted(ignored.items()))


def duplicate_id(pieces: list[str]) -> Optional[str]:
    """An id that occurs twice in the plan pieces ``pieces`` (paths or URIs), else None."""
    columns = []
    for uri in pieces:
        fs, path, _ = filesystem_for(uri)
        with fs.open_input_file(path) as f:
            columns.append(pa.ipc.open_file(f).read_all().column("image_id"))
    ids = pa.chunked_array([c for col in columns for c in col.chunks], pa.string())
    if pc.count_distinct(ids).as_py() == len(ids):
        return None
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    return dup.field("values")[0].as_py()


# ----------------------------------------------------------------------------- planning (the driver)


def run_tasks(jobs: list[tuple[Callable, tuple]], remote: bool, tag: str = "plan") -> list[Any]:
    """Run ``fn(*args)`` for every job: as Ray tasks (``remote``) or here; results in job order,
    with a progress line on stderr every few seconds while tasks run."""
    if not remote:
        return [fn(*args) for fn, args in jobs]
    import ray

    pause = float(os.environ.get(PAUSE_ENV) or 0)
    remotes: dict[Callable, Any] = {}
    refs = [remotes.setdefault(fn, ray.remote(num_cpus=1)(fn)).remote(*args) for fn, args in jobs]
    position = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    waiting, t0, last = list(refs), time.perf_counter(), time.perf_counter()
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        results[position[done[0]]] = ray.get(done[0])
        now = time.perf_counter()
        if len(refs) > 1 and (now - last >= 5.0 or not waiting):
            finished = len(refs) - len(waiting)
            print(progress_text(tag, finished, len(refs), "pieces", finished / max(now - t0, 1e-9)),
                  file=sys.stderr, flush=True)
            last = now
        if pause:
            time.sleep(pause)
    return results


def write_plan(store: OutputStore, cfg: Config, inp: LabelInput, shard_size: int,
               remote: bool) -> tuple[Plan, dict[str, int]]:
    """Plan ``inp`` into ``store`` (pieces by Ray tasks when ``remote``, then the index); returns
    the plan and what the listing found that is not an input. Raises :class:`ConfigError` for a
    table file that is not a usable table or ids that are not unique (nothing of the plan is left)."""
    piece_rows = cfg.label.plan_piece_rows
    per_piece = max(1, piece_rows // shard_size) * shard_size
    jobs: list[tuple[Callable, tuple]] = []
    if inp.kind == "world":
        split = cfg.world.splits[inp.split]
        for k, first in enumerate(range(0, split.num, per_piece)):
            jobs.append((world_piece, (store, piece_name(k), cfg.world.seed, split.domain, split.seed_offset + first,
                                       min(per_piece, split.num - first), shard_size)))
    elif inp.kind == "table":
        files = parquet_files(inp.filesystem, inp.root)
        if not files:
            raise ConfigError(f"--input {inp.uri}: no Parquet files")
        jobs = [(table_piece, (store, piece_name(k), inp, path, shard_size)) for k, path in enumerate(files)]
    folder = plan_folder(store, cfg, inp, shard_size, piece_rows, remote) if inp.kind == "files" else None
    if inp.kind == "files" and folder is None:
        jobs = [(files_pieces, (store, cfg, inp, shard_size, piece_rows))]
    results = run_tasks(jobs, remote) if folder is None else [{"pieces": folder[0], "ignored": folder[1]}]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        store.clear_plan()
        raise ConfigError(errors[0])
    ignored: dict[str, int] = {}
    if inp.kind == "files":
        ignored, results = results[0]["ignored"], results[0]["pieces"]
    pieces, piece, batch, rows = [], [], [], []
    for r in results:
        k = len(pieces)
        pieces.append(r["piece"])
        piece.extend([k] * len(r["rows"]))
        batch.extend(range(len(r["rows"])))
        rows.extend(r["rows"])
    plan = Plan(store, pieces, np.array(piece, np.int32), np.array(batch, np.int32), np.array(rows, np.int64))
    if inp.kind == "table" and plan.num_rows:
        (dup,) = run_tasks([(duplicate_id, ([plan.piece_uri(k) for k in range(len(pieces))],))], remote)
        if dup is not None:
            store.clear_plan()
            raise ConfigError(f"--input {inp.uri}: image_id values are not unique (e.g. {dup!r}); "
                              "exactly-once labelling needs one id per image")
    if plan.num_rows:
        plan.save()
    return plan, ignored


__all__ = ["Plan", "run_tasks", "PIECE_SCHEMA", "INDEX_SCHEMA", "PAUSE_ENV", "load_plan", "plan_from_table",
           "write_plan", "world_piece", "table_piece", "files_pieces", "plan_folder", "scan_top", "list_subfolder",
           "piece_from_listings", "duplicate_id", "piece_name", "index_path"]
