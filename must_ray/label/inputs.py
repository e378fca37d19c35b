"""Labelling inputs: what to label, split into shards, and the read -> decode -> resize step.

Three kinds of input (:func:`resolve_input`):

``files``
    a folder (recursive), a glob or a single image file, local or on any filesystem pyarrow knows
    (``s3://``, ``gs://``, ``abfs://``, ``hdfs://`` ...). An existing path is a path, even with
    glob characters in its name; a glob is a path that does not exist. Files whose extension is
    not in ``label.extensions``, hidden names (starting with ``.`` or ``_``) and, locally, FIFOs,
    sockets, devices, broken links, link loops and folders reached twice are not inputs: the
    listing counts them by kind (``label.paths``; nothing is opened to find out).
    ``image_id`` = the file's full path (local) or URI.
``table``
    a Parquet examples table (a file or a directory of them) with a binary ``image`` column;
    ``image_id`` = its ``image_id`` column (``<file>#<row>`` when it has none). Ids must be
    unique non-empty strings; every file's footer and ids are checked while listing.
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
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from must_ray.config import Config
from must_ray.images import BadImageError, decode_image, encode_png, resize_rgb, stable_detail
from must_ray.label.paths import Entry, describe_kind, hidden_name, path_kind, walk_folder
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


def _is_local(fs) -> bool:
    return fs.type_name == "local"


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
        if info.type == pafs.FileType.Directory and parquet_files(fs, root):
            return LabelInput("table", table, fs, root, prefix)
        input_uri = "world:unlabeled"
    if input_uri.startswith("world:"):
        split = input_uri.split(":", 1)[1] or "unlabeled"
        if split not in cfg.world.splits:
            raise ConfigError(f"--input {input_uri}: no world split {split!r}; "
                              f"known: {', '.join(sorted(cfg.world.splits))}")
        return LabelInput("world", f"world:{split}", split=split)

    is_glob = any(c in input_uri for c in GLOB_CHARS)
    try:
        fs, root, prefix = filesystem_for(input_uri)
    except (pa.ArrowInvalid, ValueError) as exc:
        if is_glob:
            return _resolve_glob(input_uri)
        raise ConfigError(f"--input {input_uri}: not a path or a URI pyarrow can open ({exc})") from None
    try:
        kind = _kind(fs, root)
    except OSError:
        if not is_glob:
            raise
        kind = "missing"
    if kind == "missing" and is_glob:
        return _resolve_glob(input_uri)  # an existing path is a path, even with glob characters in its name
    if kind == "missing":
        raise ConfigError(f"--input {input_uri}: no such file or folder")
    if kind not in ("file", "directory"):
        raise ConfigError(f"--input {input_uri}: {describe_kind(kind)}, not an image, a folder or a Parquet table; "
                          "give an image file, a folder of images, a glob or a table")
    if kind == "file":
        return LabelInput("table" if root.endswith(".parquet") else "files", input_uri, fs, root, prefix)
    files = [e.path for e in _entries(fs, root) if e.kind == "file"]
    has_parquet = any(f.endswith(".parquet") for f in files)
    has_images = any(_ext(f) in _image_exts(cfg) for f in files)
    if has_parquet and not has_images:
        return LabelInput("table", input_uri, fs, root, prefix)
    return LabelInput("files", input_uri, fs, root, prefix)


def _kind(fs, path: str) -> str:
    """:func:`path_kind` for local paths; ``file`` / ``directory`` / ``missing`` elsewhere."""
    if _is_local(fs):
        return path_kind(path)
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "directory"}.get(fs.get_file_info(path).type,
                                                                                  "missing")


def _resolve_glob(input_uri: str) -> LabelInput:
    """A glob: the folder before the first part with glob characters, and the pattern."""
    head = []
    for part in input_uri.split("/"):
        if any(c in part for c in GLOB_CHARS):
            break
        head.append(part)
    base = "/".join(head) or "."
    fs, root, prefix = filesystem_for(base)
    pattern_rest = input_uri[len(base):].lstrip("/")
    if _kind(fs, root) != "directory":
        raise ConfigError(f"--input {input_uri}: the folder {base} does not exist")
    return LabelInput("files", input_uri, fs, root, prefix, pattern=root.rstrip("/") + "/" + pattern_rest)


def _image_exts(cfg: Config) -> set[str]:
    return {e.lower().lstrip(".") for e in cfg.label.extensions}


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower().lstrip(".")


def _entries(fs, root: str) -> list[Entry]:
    """Every entry below the folder ``root``: :func:`walk_folder` locally; elsewhere the files
    pyarrow lists, with each top-most hidden path as one ``hidden`` entry."""
    if _is_local(fs):
        return walk_folder(root)
    out: list[Entry] = []
    hidden: set[str] = set()
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        relative = info.path[len(root):].strip("/").split("/")
        first = next((k for k, part in enumerate(relative) if hidden_name(part)), None)
        if first is not None:
            hidden.add("/".join(relative[:first + 1]))
        elif info.type == pafs.FileType.File:
            out.append(Entry(info.path, "file", int(info.size if info.size is not None else -1)))
    out.extend(Entry(root.rstrip("/") + "/" + h, "hidden") for h in hidden)
    return sorted(out, key=lambda e: e.path)


def parquet_files(fs, root: str) -> list[str]:
    """The Parquet files of a table input (the file itself, or every ``.parquet`` below the folder)."""
    if _kind(fs, root) == "file":
        return [root]
    return [e.path for e in _entries(fs, root) if e.kind == "file" and e.path.endswith(".parquet")]


# ----------------------------------------------------------------------------- listing / plan


@dataclass
class Listing:
    """Every input of a run in a fixed order: ``image_id``, ``locator`` (file path / table file /
    ``""``), ``offset`` (file size / row in the table file / scene index) and, for tables, the file
    index (shards never span files). ``ignored``: the entries found that are not inputs, by kind
    (``paths.IGNORED_KINDS``); inputs + ignored = everything found under ``--input``."""

    image_id: list[str]
    locator: list[str]
    offset: list[int]
    group: list[int] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)


def list_inputs(cfg: Config, inp: LabelInput) -> Listing:
    """List ``inp`` (metadata only: paths and sizes, or the ``image_id`` column of a table).
    Raises :class:`ConfigError` for a table file that is unreadable, lacks a binary ``image``
    column, or has ids that are not unique non-empty strings."""
    if inp.kind == "world":

        split = cfg.world.splits[inp.split]
        idx = [split.seed_offset + i for i in range(split.num)]
        return Listing([image_id_for(cfg.world.seed, split.domain, i) for i in idx], [""] * len(idx), idx)
    if inp.kind == "files":
        return list_files(cfg, inp)
    return _list_table(inp)


def _single_file(fs, path: str) -> Entry:
    if _is_local(fs):
        return Entry(path, "file", os.stat(path).st_size)
    size = fs.get_file_info(path).size
    return Entry(path, "file", int(size if size is not None else -1))


def list_files(cfg: Config, inp: LabelInput) -> Listing:
    """The images of a ``files`` input in path order, with what was found that is not an input."""
    fs = inp.filesystem
    if inp.pattern is None and _kind(fs, inp.root) == "file":
        entries = [_single_file(fs, inp.root)]
    else:
        entries = _entries(fs, inp.root)
    return select_entries(cfg, inp, entries)


def select_entries(cfg: Config, inp: LabelInput, entries: list[Entry]) -> Listing:
    """``entries`` (found below ``inp``, in path order) as a listing: those the glob matches, each
    an input or counted as ignored by kind (an extension not in ``label.extensions`` included)."""
    if inp.pattern is not None:
        entries = [e for e in entries if fnmatch.fnmatchcase(e.path, inp.pattern)]
    exts = _image_exts(cfg)
    keep: list[Entry] = []
    ignored: Counter = Counter()
    for e in entries:
        kind = "not_an_image_suffix" if e.kind == "file" and exts and _ext(e.path) not in exts else e.kind
        if kind == "file":
            keep.append(e)
        else:
            ignored[kind] += 1
    return Listing([inp.prefix + e.path for e in keep], [e.path for e in keep], [e.size for e in keep],
                   [0] * len(keep), dict(sorted(ignored.items())))


def _is_binary(t: pa.DataType) -> bool:
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            or pa.types.is_binary_view(t))


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def table_file_ids(inp: LabelInput, path: str) -> list[str]:
    """The ids of one table file, after checking it up front: a readable Parquet file (footer and
    ``image_id`` column only, never the images), a binary ``image`` column, string ``source``,
    non-empty string ids."""
    where = f"--input {inp.uri}: table file {path}"
    try:
        pf = pq.ParquetFile(path, filesystem=inp.filesystem)
        schema = pf.schema_arrow
        ids = pf.read(columns=["image_id"]).column("image_id") if "image_id" in schema.names else None
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{where} is not a readable Parquet file ({stable_detail(str(exc), 200)}); "
                          "replace or remove it") from None
    if "image" not in schema.names:
        raise ConfigError(f"{where} has no 'image' column (the encoded image bytes)")
    image_type = schema.field("image").type
    if not _is_binary(image_type):
        hint = " (file paths? give the folder or a glob of the images instead)" if _is_string(image_type) else ""
        raise ConfigError(f"{where}: column 'image' is {image_type}{hint}; it must be binary, the encoded image "
                          "file bytes")
    if "source" in schema.names and not _is_string(schema.field("source").type):
        raise ConfigError(f"{where}: column 'source' is {schema.field('source').type}; it must be string "
                          "(or drop it)")
    if ids is None:
        return [f"{inp.prefix}{path}#{r}" for r in range(pf.metadata.num_rows)]
    if not _is_string(ids.type):
        raise ConfigError(f"{where}: column 'image_id' is {ids.type}; it must be string (cast it, or drop it "
                          "for ids <file>#<row>)")
    values = ids.to_pylist()
    bad = next((r for r, v in enumerate(values) if not v), None)
    if bad is not None:
        raise ConfigError(f"{where}: 'image_id' is {'null' if values[bad] is None else 'empty'} in row {bad} "
                          f"({values.count(None) + values.count('')} such rows); every row needs its own id")
    return values


def _list_table(inp: LabelInput) -> Listing:
    files = parquet_files(inp.filesystem, inp.root)
    if not files:
        raise ConfigError(f"--input {inp.uri}: no Parquet files")
    ids: list[str] = []
    locs: list[str] = []
    offs: list[int] = []
    groups: list[int] = []
    for fi, path in enumerate(files):
        col = table_file_ids(inp, path)
        n = len(col)
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


def read_plan_batch(piece: str, batch: int) -> pa.RecordBatch:
    """Record batch ``batch`` (one shard: ``image_id``, ``locator``, ``offset``) of the plan piece
    file ``piece`` (a path or URI); only that batch is read."""
    fs, path, _ = filesystem_for(piece)
    with fs.open_input_file(path) as f:
        return pa.ipc.open_file(f).get_batch(int(batch))


def shard_inputs(desc: dict[str, Any]) -> tuple[list[str], list[str], list[int]]:
    """``(ids, locators, offsets)`` of a shard descriptor: one naming its slice of a plan piece
    (``{"shard", "piece", "batch"}``, ``label.plan``) is read here, in the decode task; one
    carrying the lists (:func:`shard_descriptors`) is taken as it is."""
    if "piece" in desc:
        b = read_plan_batch(desc["piece"], desc["batch"])
        return (b.column("image_id").to_pylist(), b.column("locator").to_pylist(), b.column("offset").to_pylist())
    return list(desc["image_id"]), list(desc["locator"]), list(desc["offset"])


def prepare_shard(desc: dict[str, Any], ctx: PrepareContext) -> PreparedShard:
    """Read and decode every input of shard descriptor ``desc`` (:func:`shard_inputs`)."""
    t0 = time.perf_counter()
    ids, locs, offs = shard_inputs(desc)
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
            reason[i], detail[i] = exc.reason, exc.detail

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
        local = _is_local(fs)
        for i, (path, size) in enumerate(zip(locs, offs)):
            if size > ctx.max_file_bytes:
                reason[i], detail[i] = "too_large", f"file of {size} bytes > label.max_file_bytes {ctx.max_file_bytes}"
                continue
            kind = path_kind(path) if local else "file"
            if kind != "file":  # replaced since the listing: never open a FIFO or a device
                reason[i], detail[i] = "read_error", f"no longer a regular file: {describe_kind(kind)}"
                continue
            try:
                with fs.open_input_file(path) as f:
                    data = f.read()
            except (OSError, ValueError) as exc:
                reason[i], detail[i] = "read_error", stable_detail(str(exc), 500)
                continue
            take(i, data)
    else:  # table: the rows of one file; read only the row groups that hold them

        try:
            part, base = _read_table_rows(locs[0], offs, ctx.filesystem)
        except (pa.ArrowException, OSError) as exc:  # corrupt pages the up-front check could not see
            part, base = pa.table({"image": pa.array([], pa.binary())}), 0
            reason[:], detail[:] = ["read_error"] * n, [f"{locs[0]}: {stable_detail(str(exc), 400)}"] * n
        images = part.column("image")
        sources = part.column("source") if "source" in part.column_names else None
        for i, row in enumerate(offs if part.num_rows else []):
            r = int(row) - base
            if sources is not None and sources[r].is_valid:
                source[i] = sources[r].as_py()
            cell = images[r]
            take(i, b"" if not cell.is_valid else cell.as_py())
    pixels = np.stack(good) if good else np.zeros((0, s, s, 3), dtype=np.uint8)
    return PreparedShard(int(desc["shard"]), ids, locs if ctx.kind != "world" else [""] * n, source, height, width,
                         png, reason, detail, pixels, time.perf_counter() - t0, os.getpid())


def _read_table_rows(path: str, rows: list[int], filesystem) -> tuple[pa.Table, int]:
    """The ``image`` (and ``source``) cells of the row groups of table file ``path`` that hold
    ``rows``, and the file row of the first one."""
    pf = pq.ParquetFile(path, filesystem=filesystem)
    meta = pf.metadata
    starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    first = int(np.searchsorted(starts, min(rows), side="right") - 1)
    last = int(np.searchsorted(starts, max(rows), side="right") - 1)
    cols = ["image"] + (["source"] if "source" in pf.schema_arrow.names else [])
    return pf.read_row_groups(list(range(first, last + 1)), columns=cols), int(starts[first])


def decode_shards(batch: pa.Table, ctx: PrepareContext) -> pa.Table:
    """Ray Data ``map_batches`` function of the decode step: shard descriptors -> prepared shards
    (one row each)."""
    tables = [prepare_shard(desc, ctx).to_arrow() for desc in batch.to_pylist()]
    return pa.concat_tables(tables) if tables else pa.schema(list(PreparedShard.ARROW_FIELDS)).empty_table()


__all__ = ["LabelInput", "Listing", "PrepareContext", "PreparedShard", "PLAN_SCHEMA", "resolve_input", "list_inputs",
           "list_files", "select_entries", "table_file_ids", "parquet_files", "plan_table", "shard_descriptors",
           "read_plan_batch", "shard_inputs", "make_prepare_context", "prepare_image", "prepare_shard", "decode_shards",
           "filesystem_for"]
