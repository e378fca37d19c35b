"""Local paths of a labelling run, inspected without opening them.

What kind of thing a path is (:func:`path_kind`: a FIFO is never opened, reading one blocks
forever), the folder walk that lists every entry once (:func:`walk_folder`: each real directory
visited once, whatever its symlinks), and the output check (:func:`check_output_dir`). Object-store
URIs have none of these hazards; the callers apply this module to local paths only.

An entry below ``--input`` that is not an input is *ignored*, and counted by kind
(:data:`IGNORED_KINDS`, documented in ``docs/labeling.md``).
"""
from __future__ import annotations

import errno
import heapq
import os
import stat
from dataclasses import dataclass

from must_ray.typed_config import ConfigError

#: why an entry found below ``--input`` is not an input (the label summary's ``ignored`` keys)
IGNORED_KINDS = {
    "hidden": "a file or folder whose name starts with '.' or '_' (a hidden folder counts once)",
    "not_an_image_suffix": "a file whose extension is not in label.extensions",
    "broken_symlink": "a symbolic link whose target does not exist",
    "symlink_loop": "a symbolic link that leads back to itself (a self-loop or a cycle of links)",
    "fifo": "a named pipe (never opened: reading one would block)",
    "socket": "a Unix socket",
    "device": "a character or block device (e.g. a link to /dev/null)",
    "duplicate_directory": "a folder reached a second time (a loop such as sub/up -> .., or a second "
                           "link to a folder already listed): its files are listed once",
    "unreadable": "a file or folder whose type or contents this process may not read",
}

SPECIAL_KINDS = ("fifo", "socket", "device")
_DESCRIPTION = {"fifo": "a FIFO (named pipe)", "socket": "a Unix socket", "device": "a device file",
                "broken_symlink": "a broken symbolic link", "symlink_loop": "a symbolic link loop",
                "unreadable": "a path this process may not read", "file": "an existing file"}


def describe_kind(kind: str) -> str:
    """A few words naming ``kind`` (one of :func:`path_kind`'s answers) for an error message."""
    return _DESCRIPTION.get(kind, kind)


def _mode_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "unreadable"


def _stat_error_kind(exc: OSError, is_link: bool) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink_loop"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "broken_symlink" if is_link else "missing"
    return "unreadable"


def path_kind(path: str) -> str:
    """What ``path`` is, following symbolic links but never opening it: ``file``, ``directory``,
    ``missing``, or one of the ignored kinds ``broken_symlink``, ``symlink_loop``, ``fifo``,
    ``socket``, ``device``, ``unreadable``."""
    try:
        return _mode_kind(os.stat(path).st_mode)
    except OSError as exc:
        return _stat_error_kind(exc, os.path.islink(path))


@dataclass(frozen=True)
class Entry:
    """One entry found below a folder: a regular file (``kind="file"``, with its size) or an entry
    that is not listed further (``kind`` is an ignored kind)."""

    path: str
    kind: str
    size: int = -1


def hidden_name(name: str) -> bool:
    """True for names that are never inputs (``.git``, ``_manifest`` ...)."""
    return name.startswith((".", "_"))


def _entry(path: str, dirent: os.DirEntry) -> tuple[str, int]:
    try:
        st = dirent.stat()
    except OSError as exc:
        return _stat_error_kind(exc, dirent.is_symlink()), -1
    return _mode_kind(st.st_mode), int(st.st_size)


def folder_children(folder: str) -> tuple[list[Entry], list[str], list[str]]:
    """One level of the local folder ``folder``: its entries that are not folders (files and the
    ignored kinds; a hidden name is one ``hidden`` entry, not looked into), its real sub-folders
    and the sub-folders reached through symbolic links, each sorted by path. Raises OSError when
    the folder cannot be listed."""
    with os.scandir(folder) as it:
        children = sorted(it, key=lambda d: d.name)
    entries: list[Entry] = []
    real: list[str] = []
    linked: list[str] = []
    for child in children:
        path = os.path.join(folder, child.name)
        if hidden_name(child.name):
            entries.append(Entry(path, "hidden"))
            continue
        kind, size = _entry(path, child)
        if kind == "directory":
            (linked if child.is_symlink() else real).append(path)
        else:
            entries.append(Entry(path, kind, size))
    return entries, real, linked


def _visit(top: str, entries: list[Entry], seen: set[tuple[int, int]], linked: list[str]) -> None:
    """Walk the real tree below ``top`` into ``entries``; folder links found go on the heap ``linked``."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                entries.append(Entry(folder, "duplicate_directory"))
                continue
            seen.add((st.st_dev, st.st_ino))
            here, subfolders, links = folder_children(folder)
        except OSError:
            entries.append(Entry(folder, "unreadable"))
            continue
        entries.extend(here)
        for path in links:
            heapq.heappush(linked, path)
        stack.extend(reversed(subfolders))


def walk_folder(root: str) -> list[Entry]:
    """Every entry below the local folder ``root``, sorted by path; no file is opened.

    Each real directory is visited once, keyed by ``(st_dev, st_ino)``: the real tree is walked
    first, then the folders reached through symbolic links (in path order), so a file keeps its
    real path when it has one and a loop like ``sub/up -> ..`` lists nothing twice (it is one
    ``duplicate_directory`` entry). Hidden names are one ``hidden`` entry each, not descended."""
    entries: list[Entry] = []
    seen: set[tuple[int, int]] = set()
    linked: list[str] = []
    _visit(root, entries, seen, linked)
    while linked:
        _visit(heapq.heappop(linked), entries, seen, linked)
    return sorted(entries, key=lambda e: e.path)


def walk_real_tree(root: str) -> tuple[list[Entry], list[str]]:
    """:func:`walk_folder` of ``root`` without following folder links: its entries, and the folders
    reached through links that were not walked (sorted). With no such link it is the same walk, so
    disjoint sub-trees can be walked apart (``label.plan`` lists a folder's sub-folders in tasks)."""
    entries: list[Entry] = []
    linked: list[str] = []
    _visit(root, entries, set(), linked)
    return sorted(entries, key=lambda e: e.path), sorted(linked)


def check_output_dir(path: str, flag: str = "--output") -> None:
    """Raise :class:`ConfigError` (one line naming the path and what to do) when the local folder
    ``path`` cannot be created or used: it exists as something other than a folder, or a path
    above it is a file."""
    kind = path_kind(path)
    if kind == "directory":
        return
    if kind != "missing":
        raise ConfigError(f"{flag} {path}: {describe_kind(kind)}, not a folder; choose a folder path for the "
                          "labelled table (it is created when missing)")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.lexists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    above = path_kind(parent)
    if above != "directory":
        raise ConfigError(f"{flag} {path}: {parent} is {describe_kind(above)}, so no folder can be made under it; "
                          f"choose another {flag}")


__all__ = ["Entry", "IGNORED_KINDS", "SPECIAL_KINDS", "check_output_dir", "describe_kind", "folder_children",
           "hidden_name", "path_kind", "walk_folder", "walk_real_tree"]
