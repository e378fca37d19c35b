"""Teacher weights on their way from a file to an actor.

The driver reads each weights file once (:class:`WeightsFiles`, local or any URI pyarrow knows),
hashes it (the SHA-256 goes into the table's provenance) and ships the bytes to the actors through
the object store, so the hash is exactly the weights that labelled, workers need no shared
filesystem, and a teacher file overwritten while a job runs cannot mix two models into one table.
An actor writes the bytes it received to a private temp file for the libraries that load from a
path (:func:`materialised`).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import pyarrow.fs as pafs

from must_ray.label.inputs import filesystem_for


class WeightsFiles:
    """The weights files of one resolution, each read (and each parsed form computed) once."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._parsed: dict[tuple[str, Any], Any] = {}

    @staticmethod
    def exists(path: str) -> bool:
        """True when ``path`` (a local path or a URI) is a file."""
        fs, inner, _ = filesystem_for(path)
        return fs.get_file_info(inner).type == pafs.FileType.File

    def read(self, path: str) -> bytes:
        """The bytes of ``path``, read on first use."""
        if path not in self._data:
            fs, inner, _ = filesystem_for(path)
            with fs.open_input_file(inner) as f:
                self._data[path] = f.read()
        return self._data[path]

    def sha256(self, path: str) -> str:
        """Content hash of ``path`` (what the provenance records)."""
        return hashlib.sha256(self.read(path)).hexdigest()

    def parsed(self, path: str, parse: Callable[[bytes], Any]) -> Any:
        """``parse(bytes of path)``, computed on first use."""
        key = (path, parse)
        if key not in self._parsed:
            self._parsed[key] = parse(self.read(path))
        return self._parsed[key]


@contextmanager
def materialised(blob: Any, suffix: str) -> Iterator[Optional[str]]:
    """Shipped weights (bytes or a Ray ObjectRef to them) as a private temp file for the block;
    ``None`` when there are none (hub weights)."""
    if blob is None:
        yield None
        return
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        import ray

        blob = ray.get(blob)
    tmp = tempfile.mkdtemp(prefix="must-ray-teacher-")
    try:
        path = os.path.join(tmp, "weights" + suffix)
        with open(path, "wb") as f:
            f.write(blob)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["WeightsFiles", "materialised"]
