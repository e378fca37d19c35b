"""One prediction request: its body (image bytes, or JSON naming a local file) and its options,
checked before any model work. Every problem is a :class:`BadRequest` with the HTTP status and a
one-line message for the client (a 4xx, never a 500)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Optional, Sequence

import numpy as np

from must_ray.images import BadImageError, decode_image

#: content types whose body is the image itself
IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream")
JSON_CONTENT_TYPE = "application/json"


class BadRequest(Exception):
    """A request the server refuses: ``status`` (400, 403, 404, 413, 415 ...) and ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Options:
    """What the client asks for besides the image: ``size`` (H, W) of dense maps (None = the
    image's, shrunk to the map limit), ``tasks`` (None = all), ``topk`` (None = the model's)."""

    size: Optional[tuple[int, int]] = None
    tasks: Optional[list[str]] = None
    topk: Optional[int] = None


def body_kind(content_type: Optional[str]) -> str:
    """``"image"`` or ``"json"`` from a Content-Type header; 415 for anything else."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media == JSON_CONTENT_TYPE:
        return "json"
    if any(media.startswith(t) for t in IMAGE_CONTENT_TYPES):
        return "image"
    raise BadRequest(415, f"unsupported content type {media or '(none)'!r}: send the image bytes as image/* or "
                          f"application/octet-stream, or JSON {{\"path\": FILE}} as {JSON_CONTENT_TYPE}")


OPTION_NAMES = ("size", "tasks", "topk")


async def read_body(chunks: AsyncIterator[bytes], declared: Optional[str], limit: int) -> bytes:
    """The request body from its stream of ``chunks``; 413 as soon as it passes ``limit`` bytes
    (or when the Content-Length header ``declared`` already says so), 400 when it is empty."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise BadRequest(413, f"request body is over the limit of {limit} bytes")
        parts.append(chunk)
    if not total:
        raise BadRequest(400, "empty request body: send an image")
    return b"".join(parts)


def parse_options(values: Mapping[str, Any], known_tasks: Sequence[str], extra: Sequence[str] = ()) -> Options:
    """Options from query parameters or JSON fields (``size`` as ``N``, ``HxW`` or ``[H, W]``;
    ``tasks`` as ``a,b`` or a list; ``topk`` an integer); 400 for an unknown name (besides
    ``extra``) or a bad value."""
    unknown = sorted(set(values) - set(OPTION_NAMES) - set(extra))
    if unknown:
        known = ", ".join(OPTION_NAMES + tuple(extra))
        raise BadRequest(400, f"unknown option(s) {', '.join(unknown)}; known: {known}")
    opts = Options()
    if values.get("size") is not None:
        opts.size = _size(values["size"])
    if values.get("tasks") is not None:
        raw = values["tasks"]
        names = [t.strip() for t in raw.split(",")] if isinstance(raw, str) else raw
        if not isinstance(names, list) or not names or not all(isinstance(t, str) and t for t in names):
            raise BadRequest(400, "tasks must be a comma-separated string or a list of task names")
        unknown = [t for t in names if t not in known_tasks]
        if unknown:
            raise BadRequest(400, f"unknown task(s) {', '.join(unknown)}; this model has {', '.join(known_tasks)}")
        opts.tasks = names
    if values.get("topk") is not None:
        opts.topk = _positive_int(values["topk"], "topk", 1000)
    return opts


def _size(raw: Any) -> tuple[int, int]:
    if isinstance(raw, str):
        parts = raw.lower().split("x")
    elif isinstance(raw, (list, tuple)):
        parts = list(raw)
    else:
        parts = [raw]
    if len(parts) not in (1, 2):
        raise BadRequest(400, f"size must be N, HxW or [H, W], got {raw!r}")
    dims = [_positive_int(p, "size", 16384) for p in parts]
    return (dims[0], dims[-1])


def _positive_int(raw: Any, name: str, limit: int) -> int:
    text = str(raw).strip() if isinstance(raw, (int, str)) and not isinstance(raw, bool) else ""
    if not text.isdigit() or not 1 <= int(text) <= limit:
        raise BadRequest(400, f"{name} must be an integer in [1, {limit}], got {raw!r}")
    return int(text)


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body (400 when it is not one, or has no ``path``)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(400, f"body is not valid JSON ({exc.__class__.__name__}): send {{\"path\": FILE}}") from None
    if not isinstance(data, dict) or not isinstance(data.get("path"), str) or not data["path"]:
        raise BadRequest(400, "JSON body must be an object with a \"path\" string naming a local image file")
    return data


def read_allowed_file(path: str, roots: Sequence[str], limit: int) -> bytes:
    """The bytes of local file ``path`` if it lies under one of ``roots`` (symlinks resolved);
    403 when path requests are off or it lies elsewhere, 404 when missing, 413 when too big."""
    if not roots:
        raise BadRequest(403, "this server does not read local files (serve.path_roots is empty): send the image "
                              "bytes instead")
    real = os.path.realpath(path)
    allowed = [os.path.realpath(r) for r in roots]
    if not os.path.isabs(path) or not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in allowed):
        raise BadRequest(403, f"path {path!r} is not an absolute path under an allowed folder (serve.path_roots)")
    if not os.path.isfile(real):
        raise BadRequest(404, f"no such file: {path}")
    if os.path.getsize(real) > limit:
        raise BadRequest(413, f"file {path} is {os.path.getsize(real)} bytes, over the limit of {limit} bytes")
    with open(real, "rb") as f:
        return f.read()


def decode_request_image(data: bytes, max_pixels: int) -> np.ndarray:
    """uint8 RGB (H, W, 3) of the request's image bytes: 400 for what is not an image (empty,
    truncated, undecodable), 413 for one over ``max_pixels`` (checked before decoding)."""
    try:
        return decode_image(data, max_pixels=max_pixels)
    except BadImageError as exc:
        raise BadRequest(413 if exc.reason == "too_large" else 400, f"not a usable image ({exc})") from None


__all__ = ["BadRequest", "Options", "body_kind", "read_body", "parse_options", "parse_json_body",
           "read_allowed_file", "decode_request_image", "IMAGE_CONTENT_TYPES", "JSON_CONTENT_TYPE"]
