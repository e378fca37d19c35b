"""Labelling inputs: what to label, split into shards, and the read -> decode -> resize step.

Three kinds of input (:func:`resolve_input`):

``files``
    a folder (recursive), a glob or a single image file, local or on any filesystem pyarrow knows
    (``s3://``, ``gs://``, ``abfs://``, ``hdfs://`` ...). Files whose extension is not in
    ``label.extensions`` and hidden files (a path component starting with ``.`` or ``_``) are not
    inputs. ``image_id`` = the file's full path (local) or URI.
``table``
    a Parquet examples table (a file or a directory of them) with an ``image`` column;
    ``image_id`` = its ``image_id`` column (``<file>#<row>`` when it has none). Ids must be unique.
``world``
    a split of the synthetic world rendered on the fly (``world:<split>``); ``image_id`` = the
    world's scene id. With no ``--input`` the labeller reads ``<paths.root>/<paths.world>/unlabeled``
    when that table exists and renders ``world:unlabeled`` otherwise.

The driver only ever sees *paths and ids* (a listing, or an ``image_id`` column read on its own):
pixels are read and decoded by the decode tasks on the workers. :func:`plan_table` turns the listing
into the run's *plan*: every input id with its locator and shard number (contiguous runs of
``label.shard_size`` ids in listing order; a table's shards never span two files). The plan is
written once to the output's manifest and reused by every resumed run, so a shard means the same
images forever, whatever happens to the folder later.

:func:`prepare_shard` is the one decode step: read bytes, ``images.decode_image`` (EXIF, modes,
bomb check), ``images.resize_rgb`` to the label size once, re-encode the resized image as PNG for
the table's ``image`` column (the original bytes are kept when they already are an 8-bit RGB PNG of
that size). Undecodable inputs come back with a quarantine reason instead of pixels.
"""
from __future__ import annotations

import fnmatch
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from must_ray.config import Config
from must_ray.images import BadImageError, decode_image, encode_png, resize_rgb
from must_ray.typed_config import ConfigError
from must_ray.world import render_scenes
from must_ray.world.splits import WORLD_SOURCE, image_id_for

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GLOB_CHARS = set("*?[")


# ----------------------------------------------------------------------------- filesystems


def filesystem_for(uri: str):
    """``(pyarrow filesystem, path inside it, id prefix)`` for a local path or a URI. Ids of files
    are ``prefix + path``: the plain absolute path locally, ``scheme://path`` elsewhere."""

    if "://" in uri and not uri.startswith("file://"):
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/"), uri.split("://", 1)[0] + "://"
    local = uri[7:] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local)), ""


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


# ----------------------------------------------------------------------------- input spec


@dataclass
class LabelInput:
    """A resolved input. ``uri`` is what provenance and the manifest record."""

    kind: str  # files | table | world
    uri: str
    filesystem: Any = None
    root: str = ""
    prefix: str = ""
    pattern: Optional[str] = None  # glob over fs paths (files)
    split: Optional[str] = None  # world split name

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "uri": self.uri, **({"split": self.split} if self.split else {})}


def resolve_input(cfg: Config, input_uri: Optional[str]) -> LabelInput:
    """Work out what ``input_uri`` is (see the module docstring). Raises :class:`ConfigError` for
    inputs that do not exist or hold nothing to label."""

    if input_uri is None:
        table = cfg.paths.resolve("world")
        table = os.path.join(table, "unlabeled") if "://" not in table else table.rstrip("/") + "/unlabeled"
        fs, root, prefix = filesystem_for(table)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.Directory and _parquet_files(fs, root):
            return LabelInput("table", table, fs, root, prefix)
        input_uri = "world:unlabeled"
    if input_uri.startswith("world:"):
        split = input_uri.split(":", 1)[1] or "unlabeled"
        if split not in cfg.world.splits:
            raise ConfigError(f"--input {input_uri}: no world split {split!r}; known: {', '.join(sorted(cfg.world.splits))}")
        return LabelInput("world", f"world:{split}", split=split)

    if any(c in input_uri for c in GLOB_CHARS):
        head = []
        for part in input_uri.split("/"):
            if any(c in part for c in GLOB_CHARS):
                break
            head.append(part)
        base = "/".join(head) or "."
        fs, root, prefix = filesystem_for(base)
        pattern_rest = input_uri[len(base):].lstrip("/")
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise ConfigError(f"--input {input_uri}: the folder {base} does not exist")
        return LabelInput("files", input_uri, fs, root, prefix, pattern=root.rstrip("/") + "/" + pattern_rest)

    fs, root, prefix = filesystem_for(input_uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"--input {input_uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        kind = "table" if root.endswith(".parquet") else "files"
        return LabelInput(kind, input_uri, fs, root, prefix)
    infos = _list(fs, root)
    has_parquet = any(i.path.endswith(".parquet") for i in infos)
    has_images = any(_ext(i.path) in _image_exts(cfg) for i in infos)
    if has_parquet and not has_images:
        return LabelInput("table", input_uri, fs, root, prefix)
    return LabelInput("files", input_uri, fs, root, prefix)


def _image_exts(cfg: Config) -> set[str]:
    return {e.lower().lstrip(".") for e in cfg.label.extensions}


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower().lstrip(".")


def _list(fs, root: str):

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return [i for i in infos if i.type == pafs.FileType.File and not _hidden(i.path[len(root):])]


def _parquet_files(fs, root: str) -> list[str]:

    if fs.get_file_info(root).type == pafs.FileType.File:
        return [root]
    return sorted(i.path for i in _list(fs, root) if i.path.endswith(".parquet"))


# ----------------------------------------------------------------------------- listing / plan


@dataclass
class Listing:
    """Every input of a run in a fixed order: ``image_id``, ``locator`` (file path / table file /
    ``""``), ``offset`` (file size / row in the table file / scene index) and, for tables, the file
    index (shards never span files). ``ignored``: files skipped for their extension."""

    image_id: list[str]
    locator: list[str]
    offset: list[int]
    group: list[int] = field(default_factory=list)
    ignored: int = 0


def list_inputs(cfg: Config, inp: LabelInput) -> Listing:
    """List ``inp`` (metadata only: paths and sizes, or the ``image_id`` column of a table)."""
    if inp.kind == "world":

        split = cfg.world.splits[inp.split]
        idx = [split.seed_offset + i for i in range(split.num)]
        return Listing([image_id_for(cfg.world.seed, split.domain, i) for i in idx], [""] * len(idx), idx)

    fs = inp.filesystem
    if inp.kind == "files":

        if inp.pattern is None and fs.get_file_info(inp.root).type == pafs.FileType.File:
            infos = [fs.get_file_info(inp.root)]
        else:
            infos = _list(fs, inp.root)
            if inp.pattern is not None:
                infos = [i for i in infos if fnmatch.fnmatchcase(i.path, inp.pattern)]
        exts = _image_exts(cfg)
        keep = sorted((i for i in infos if not exts or _ext(i.path) in exts), key=lambda i: i.path)
        ignored = len(infos) - len(keep)
        return Listing([inp.prefix + i.path for i in keep], [i.path for i in keep],
                       [int(i.size if i.size is not None else -1) for i in keep], [0] * len(keep), ignored)


    files = _parquet_files(fs, inp.root)
    if not files:
        raise ConfigError(f"--input {inp.uri}: no Parquet files")
    ids: list[str] = []
    locs: list[str] = []
    offs: list[int] = []
    groups: list[int] = []
    for fi, path in enumerate(files):
        schema = pq.read_schema(path, filesystem=fs)
        if "image" not in schema.names:
            raise ConfigError(f"--input {inp.uri}: table file {path} has no 'image' column")
        n = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
        if "image_id" in schema.names:
            col = pq.read_table(path, columns=["image_id"], filesystem=fs).column("image_id").to_pylist()
        else:
            col = [f"{inp.prefix}{path}#{r}" for r in range(n)]
        ids.extend(col)
        locs.extend([path] * n)
        offs.extend(range(n))
        groups.extend([fi] * n)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ConfigError(f"--input {inp.uri}: image_id values are not unique (e.g. {dup!r}); "
                          "exactly-once labelling needs one id per image")
    return Listing(ids, locs, offs, groups)


PLAN_SCHEMA = pa.schema([("shard", pa.int32()), ("image_id", pa.string()), ("locator", pa.string()),
                         ("offset", pa.int64())])


def plan_table(listing: Listing, shard_size: int) -> pa.Table:
    """Deterministic shards: contiguous runs of ``shard_size`` inputs in listing order, restarted at
    every new group (table file)."""
    shards = np.empty(len(listing.image_id), dtype=np.int32)
    shard, filled, group = -1, shard_size, None
    groups = listing.group or [0] * len(listing.image_id)
    for i, g in enumerate(groups):
        if filled >= shard_size or g != group:
            shard, filled, group = shard + 1, 0, g
        shards[i] = shard
        filled += 1
    return pa.Table.from_arrays([pa.array(shards, pa.int32()), pa.array(listing.image_id, pa.string()),
                                 pa.array(listing.locator, pa.string()), pa.array(listing.offset, pa.int64())],
                                schema=PLAN_SCHEMA)


def shard_descriptors(plan: pa.Table, shards: Sequence[int]) -> list[dict[str, Any]]:
    """The work items of ``shards``: ``{"shard", "image_id", "locator", "offset"}`` (lists)."""
    wanted = set(int(s) for s in shards)
    col = plan.column("shard").to_numpy()
    ids = plan.column("image_id").to_pylist()
    locs = plan.column("locator").to_pylist()
    offs = plan.column("offset").to_pylist()
    out: dict[int, dict[str, Any]] = {}
    for i, s in enumerate(col.tolist()):
        if s in wanted:
            d = out.setdefault(s, {"shard": s, "image_id": [], "locator": [], "offset": []})
            d["image_id"].append(ids[i])
            d["locator"].append(locs[i])
            d["offset"].append(offs[i])
    return [out[s] for s in sorted(out)]


# ----------------------------------------------------------------------------- decode step


@dataclass
class PrepareContext:
    """What the decode step needs besides a shard descriptor (shipped once to the decode tasks)."""

    kind: str
    image_size: int
    max_image_pixels: int
    max_file_bytes: int
    source: str
    filesystem: Any = None
    world: Any = None  # WorldConfig (kind=world)
    split: Any = None  # SplitConfig (kind=world)


def make_prepare_context(cfg: Config, inp: LabelInput, image_size: int) -> PrepareContext:

    world = split = None
    source = inp.uri
    if inp.kind == "world":
        world, split, source = cfg.world, cfg.world.splits[inp.split], WORLD_SOURCE
    return PrepareContext(inp.kind, image_size, cfg.label.max_image_pixels, cfg.label.max_file_bytes, source,
                          inp.filesystem, world, split)


@dataclass
class PreparedShard:
    """One shard after the decode step. Per input (in plan order): id, locator, source, original
    height/width, the PNG for the ``image`` column and a quarantine ``reason`` ("" = good) with its
    ``detail``. ``pixels``: the good images only, uint8 (n_good, S, S, 3)."""

    shard: int
    image_id: list[str]
    locator: list[str]
    source: list[str]
    height: list[int]
    width: list[int]
    png: list[bytes]
    reason: list[str]
    detail: list[str]
    pixels: np.ndarray
    decode_s: float = 0.0
    decode_pid: int = 0  # the process that decoded (the actor checks it is not itself: no fusion)

    ARROW_FIELDS = (("shard", pa.int64()), ("image_id", pa.list_(pa.string())), ("locator", pa.list_(pa.string())),
                    ("source", pa.list_(pa.string())), ("height", pa.list_(pa.int32())),
                    ("width", pa.list_(pa.int32())), ("png", pa.list_(pa.binary())),
                    ("reason", pa.list_(pa.string())), ("detail", pa.list_(pa.string())),
                    ("pixels", pa.large_binary()), ("pixels_shape", pa.list_(pa.int32())), ("decode_s", pa.float64()),
                    ("decode_pid", pa.int64()))

    @property
    def num_good(self) -> int:
        return int(self.pixels.shape[0])

    def to_arrow(self) -> pa.Table:
        """A one-row Arrow table: a shard travels as ONE row, so Ray Data can never split it
        across batches (the actor always sees whole shards, which is what makes a shard the unit
        of commit)."""
        values = [self.shard, self.image_id, self.locator, self.source, self.height, self.width, self.png,
                  self.reason, self.detail, self.pixels.tobytes(), list(self.pixels.shape), self.decode_s,
                  self.decode_pid]
        schema = pa.schema(list(self.ARROW_FIELDS))
        return pa.Table.from_arrays([pa.array([v], f.type) for v, f in zip(values, schema)], schema=schema)

    @classmethod
    def from_arrow(cls, table: pa.Table, row: int) -> "PreparedShard":
        get = {name: table.column(name)[row] for name, _ in cls.ARROW_FIELDS}
        shape = tuple(get["pixels_shape"].as_py())
        buf = get["pixels"].as_buffer()
        pixels = np.frombuffer(buf, dtype=np.uint8).reshape(shape) if buf is not None else np.zeros(shape, np.uint8)
        return cls(shard=int(get["shard"].as_py()), image_id=get["image_id"].as_py(), locator=get["locator"].as_py(),
                   source=get["source"].as_py(), height=get["height"].as_py(), width=get["width"].as_py(),
                   png=get["png"].as_py(), reason=get["reason"].as_py(), detail=get["detail"].as_py(),
                   pixels=pixels, decode_s=float(get["decode_s"].as_py()), decode_pid=int(get["decode_pid"].as_py()))


def _png_is_plain_rgb8(data: bytes, size: int) -> bool:
    """True when ``data`` is an 8-bit RGB PNG of ``size`` x ``size`` without EXIF: decoding it
    anywhere gives exactly the array :func:`decode_image` gave, so it can be stored as is."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    w, h, depth, colour = struct.unpack(">IIBB", data[16:26])
    return (w, h, depth, colour) == (size, size, 8, 2) and b"eXIf" not in data


def prepare_image(data: bytes, size: int, max_pixels: int) -> tuple[np.ndarray, bytes, int, int]:
    """Decode (:func:`decode_image`), resize once to ``size`` and encode the ``image`` cell.
    Returns ``(pixels (size, size, 3), png, original height, original width)``; raises
    :class:`BadImageError`."""
    arr = decode_image(data, max_pixels=max_pixels)
    h, w = arr.shape[:2]
    small = resize_rgb(arr, size)
    png = bytes(data) if (h, w) == (size, size) and _png_is_plain_rgb8(data, size) else encode_png(small)
    return small, png, h, w


def prepare_shard(desc: dict[str, Any], ctx: PrepareContext) -> PreparedShard:
    """Read and decode every input of shard descriptor ``desc`` (see :func:`shard_descriptors`)."""
    t0 = time.perf_counter()
    ids, locs, offs = list(desc["image_id"]), list(desc["locator"]), list(desc["offset"])
    n = len(ids)
    s = ctx.image_size
    source = [ctx.source] * n
    height, width = [0] * n, [0] * n
    png: list[bytes] = [b""] * n
    reason, detail = [""] * n, [""] * n
    good: list[np.ndarray] = []

    def take(i: int, data: bytes) -> None:
        try:
            small, png[i], height[i], width[i] = prepare_image(data, s, ctx.max_image_pixels)
            good.append(small)
        except BadImageError as exc:
            reason[i], detail[i] = exc.reason, exc.detail[:500]

    if ctx.kind == "world":

        scenes = render_scenes(ctx.world.seed, offs, image_size=ctx.world.image_size, domain=ctx.split.domain,
                               min_objects=ctx.world.min_objects, max_objects=ctx.world.max_objects)
        for i, scene in enumerate(scenes):
            img = scene["image"]
            height[i], width[i] = img.shape[:2]
            small = resize_rgb(img, s)
            png[i] = encode_png(small)
            good.append(small)
    elif ctx.kind == "files":
        fs = ctx.filesystem
        for i, (path, size) in enumerate(zip(locs, offs)):
            if size > ctx.max_file_bytes:
                reason[i], detail[i] = "too_large", f"file of {size} bytes > label.max_file_bytes {ctx.max_file_bytes}"
                continue
            try:
                with fs.open_input_file(path) as f:
                    data = f.read()
            except (OSError, ValueError) as exc:
                reason[i], detail[i] = "read_error", str(exc)[:500]
                continue
            take(i, data)
    else:  # table: the rows of one file; read only the row groups that hold them

        pf = pq.ParquetFile(locs[0], filesystem=ctx.filesystem)
        meta = pf.metadata
        starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        lo, hi = min(offs), max(offs)
        first = int(np.searchsorted(starts, lo, side="right") - 1)
        last = int(np.searchsorted(starts, hi, side="right") - 1)
        cols = ["image"] + (["source"] if "source" in pf.schema_arrow.names else [])
        part = pf.read_row_groups(list(range(first, last + 1)), columns=cols)
        base = int(starts[first])
        images = part.column("image")
        sources = part.column("source") if "source" in cols else None
        for i, row in enumerate(offs):
            r = int(row) - base
            if sources is not None and sources[r].is_valid:
                source[i] = sources[r].as_py()
            cell = images[r]
            take(i, b"" if not cell.is_valid else cell.as_py())
    pixels = np.stack(good) if good else np.zeros((0, s, s, 3), dtype=np.uint8)
    return PreparedShard(int(desc["shard"]), ids, locs if ctx.kind != "world" else [""] * n, source, height, width,
                         png, reason, detail, pixels, time.perf_counter() - t0, os.getpid())


def decode_shards(batch: pa.Table, ctx: PrepareContext) -> pa.Table:
    """Ray Data ``map_batches`` function of the decode step: shard descriptors -> prepared shards
    (one row each)."""
    tables = [prepare_shard(desc, ctx).to_arrow() for desc in batch.to_pylist()]
    return pa.concat_tables(tables) if tables else pa.schema(list(PreparedShard.ARROW_FIELDS)).empty_table()


__all__ = ["LabelInput", "Listing", "PrepareContext", "PreparedShard", "PLAN_SCHEMA", "resolve_input", "list_inputs",
           "plan_table", "shard_descriptors", "make_prepare_context", "prepare_image", "prepare_shard", "decode_shards",
           "filesystem_for"]
