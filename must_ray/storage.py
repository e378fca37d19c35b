"""Shared storage for multi-node runs: fail fast on node-local output paths.

On one machine any path works. On a multi-node Ray cluster the examples tables, teacher and
student checkpoints are written by tasks and Ray Train workers on *every* node, so each output
location must be storage that all nodes see: a URI (``s3://``, ``gs://``, ``abfs://``,
``hdfs://`` ...) or a path on a shared filesystem mounted at the same place on every node (NFS,
EFS, Filestore, CIFS, Lustre, GPFS, CephFS, gcsfuse, mountpoint-s3 ...). A node-local path
would scatter outputs over the nodes' local disks and lose checkpoints when nodes scale down,
so :func:`check_cluster_paths` (called by ``must_ray.cli.init_ray`` right after connecting)
raises :class:`~must_ray.config.ConfigError` instead.

Whether a local path is shared is read from ``/proc/mounts``: the filesystem type of the mount
that holds the path (longest mount-point prefix of its resolved absolute form; the path itself
need not exist yet). A relative path is relative to the driver's working directory, which under
``ray job submit`` is the job's unpacked ``--working-dir`` copy: always node-local, and temporary,
so :func:`check_job_output_paths` (called by ``must_ray.cli.load_job_config``) refuses relative
output paths in a submitted job even on a single node.

Environment:
  ``MUST_RAY_MULTI_NODE=1``        treat the cluster as multi-node even while only the head is up
                                   (the shipped cluster YAMLs/manifests set it: autoscaling adds
                                   workers after the job has started).
  ``MUST_RAY_ALLOW_LOCAL_PATHS=1`` skip the check (every node mounts the path from a shared
                                   filesystem this module does not recognise).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from must_ray.typed_config import ConfigError

MULTI_NODE_ENV = "MUST_RAY_MULTI_NODE"
ALLOW_LOCAL_ENV = "MUST_RAY_ALLOW_LOCAL_PATHS"

# URI schemes whose storage every node reaches over the network (pyarrow / fsspec filesystems).
SHARED_URI_SCHEMES = frozenset({
    "s3", "s3a", "s3n", "gs", "gcs", "abfs", "abfss", "az", "adl", "wasb", "wasbs",
    "hdfs", "viewfs", "oss", "cos", "obs", "r2", "b2", "swift", "webhdfs", "dbfs", "hf",
})
# URI schemes that are a plain path on the local node.
LOCAL_URI_SCHEMES = frozenset({"file", "local"})

# /proc/mounts filesystem types that are shared between machines.
SHARED_FSTYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "cephfs",
    "glusterfs", "wekafs", "panfs", "pvfs2", "orangefs", "afs", "ocfs2", "gfs2", "juicefs",
    "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.mountpoint-s3", "fuse.goofys",
    "fuse.juicefs", "fuse.blobfuse", "fuse.blobfuse2", "fuse.rclone", "fuse.sshfs",
    "fuse.ossfs", "fuse.geesefs", "fuse.ceph-fuse", "fuse.cephfs", "fuse.lustre",
})
# Plain "fuse" mounts name their daemon in the source column (e.g. mountpoint-s3).
SHARED_FUSE_SOURCES = frozenset({
    "s3fs", "gcsfuse", "mountpoint-s3", "goofys", "juicefs", "blobfuse", "blobfuse2", "rclone",
    "sshfs", "ossfs", "geesefs", "ceph-fuse", "glusterfs",
})

_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_OCTAL_RE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/mounts``."""

    source: str
    mountpoint: str
    fstype: str

    @property
    def shared(self) -> bool:
        fstype = self.fstype.lower()
        if fstype in SHARED_FSTYPES:
            return True
        if fstype in ("fuse", "fuseblk"):
            return os.path.basename(self.source.lower()).split(":")[0] in SHARED_FUSE_SOURCES
        return False


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \040, \011, \012, \134.
    return _OCTAL_RE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> list[Mount]:
    """Parse the text of ``/proc/mounts`` (or ``/proc/self/mounts``) into :class:`Mount` rows."""
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mounts.append(Mount(_unescape(parts[0]), _unescape(parts[1]), parts[2]))
    return mounts


def read_mounts(path: str = "/proc/mounts") -> Optional[list[Mount]]:
    """This machine's mount table, or ``None`` where there is none (e.g. macOS)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_mounts(f.read())
    except OSError:
        return None


def uri_scheme(path_or_uri: str) -> Optional[str]:
    """The lower-case scheme of ``s3://bucket/x``-style strings, ``None`` for plain paths."""
    m = _URI_RE.match(path_or_uri)
    return m.group(1).lower() if m else None


def mount_for(path: str, mounts: Sequence[Mount]) -> Optional[Mount]:
    """The mount that holds local ``path`` (which need not exist yet; symlinks in its existing
    part are resolved): the longest mount point that is a prefix of it, the last one listed when
    several are stacked on the same point."""
    target = os.path.realpath(os.path.abspath(os.path.expanduser(path)))
    best: Optional[Mount] = None
    best_len = -1
    for m in mounts:
        mp = m.mountpoint.rstrip("/") or "/"
        if target == mp or mp == "/" or target.startswith(mp + "/"):
            if len(mp) >= best_len:
                best, best_len = m, len(mp)
    return best


def describe_storage(path_or_uri: str, mounts: Optional[Sequence[Mount]] = None) -> tuple[bool, str]:
    """``(shared, how)``: whether every node of a cluster can see ``path_or_uri``, and why."""
    scheme = uri_scheme(path_or_uri)
    if scheme is not None and scheme not in LOCAL_URI_SCHEMES:
        known = "a shared" if scheme in SHARED_URI_SCHEMES else "a remote"
        return True, f"{known} {scheme}:// URI"
    local = path_or_uri[len(scheme) + 3:] if scheme else path_or_uri
    if mounts is None:
        mounts = read_mounts()
    resolved = os.path.realpath(os.path.abspath(os.path.expanduser(local)))
    if not mounts:
        return False, f"a local path ({resolved}; no /proc/mounts to prove it is on a shared filesystem)"
    m = mount_for(resolved, mounts)
    if m is None:
        return False, f"a local path ({resolved}; no mount found for it)"
    where = f"{resolved} on {m.fstype} filesystem {m.source} mounted at {m.mountpoint}"
    if m.shared:
        return True, f"a path on a shared filesystem ({where})"
    return False, f"a node-local path ({where})"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def check_shared_storage(path_or_uri: str, cluster_nodes: int, *, key: str = "paths.root",
                         mounts: Optional[Sequence[Mount]] = None, cluster: str = "") -> None:
    """Raise :class:`ConfigError` naming ``key`` when ``cluster_nodes > 1`` and ``path_or_uri`` is
    not on storage every node sees. Single-node clusters (a laptop) accept any path.
    ``cluster`` optionally replaces the "has N nodes" wording of the message."""
    if cluster_nodes <= 1 or _truthy(ALLOW_LOCAL_ENV):
        return
    shared, how = describe_storage(path_or_uri, mounts)
    if shared:
        return
    cluster = cluster or f"has {cluster_nodes} nodes"
    raise ConfigError(
        f"{key}={path_or_uri!r} is {how}, but this Ray cluster {cluster}: tables and "
        f"checkpoints written by tasks and Ray Train workers on other nodes would land on those "
        f"nodes' local disks and be lost when they scale down. Point {key} at storage every node "
        f"sees, e.g. --set {key}=s3://my-bucket/must-ray/run1 (or gs://..., abfs://...) or a path "
        f"on an NFS mount present on every node (e.g. /mnt/nfs/must-ray/run1). If this path is "
        f"shared after all, set {ALLOW_LOCAL_ENV}=1."
    )


def cluster_node_count() -> int:
    """Alive nodes of the connected Ray cluster (``ray.nodes()``)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive", n.get("alive", False)))


def output_locations(cfg: Any) -> list[tuple[str, str]]:
    """``(dotted key, location)`` of every output a run writes that is not under ``paths.root``
    implicitly: ``paths.root`` itself, absolute/URI ``paths.<name>`` and ``label.output``."""
    paths = cfg.paths
    out = [("paths.root", paths.root)]
    names = [f.name for f in dataclasses.fields(paths)] if dataclasses.is_dataclass(paths) else []
    for name in names:
        value = getattr(paths, name, None)
        if name == "root":
            continue
        if isinstance(value, str) and (uri_scheme(value) or os.path.isabs(value)):
            out.append((f"paths.{name}", value))
    label_output = getattr(getattr(cfg, "label", None), "output", None)
    if label_output:
        out.append(("label.output", label_output))
    return out


def check_cluster_paths(cfg: Any, cluster_nodes: Optional[int] = None,
                        mounts: Optional[Sequence[Mount]] = None) -> None:
    """Fail fast when a multi-node cluster would write outputs to a node-local path.
    ``cluster_nodes`` defaults to the alive nodes of the connected Ray cluster; with
    ``MUST_RAY_MULTI_NODE=1`` the cluster counts as multi-node even while only the head is up."""
    if _truthy(ALLOW_LOCAL_ENV):
        return
    nodes = cluster_node_count() if cluster_nodes is None else cluster_nodes
    cluster = ""
    if nodes <= 1 and _truthy(MULTI_NODE_ENV):
        cluster = (f"has {nodes} alive node(s) now and {MULTI_NODE_ENV}=1 (set by the cluster config: "
                   f"the autoscaler adds worker nodes while the job runs)")
        nodes = 2
    if nodes <= 1:
        return
    if mounts is None:
        mounts = read_mounts()
    for key, location in output_locations(cfg):
        check_shared_storage(location, nodes, key=key, mounts=mounts, cluster=cluster)


# Set by Ray's job supervisor in the environment of a `ray job submit` entrypoint: the job's
# runtime_env (with its working_dir URI) and metadata, as JSON (ray._private.runtime_env.constants).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submitted_working_dir(environ: Optional[dict] = None) -> Optional[str]:
    """The ``working_dir`` of the runtime environment this process was submitted with
    (``ray job submit --working-dir ...``), or ``None`` outside a submitted job / without one."""
    import json

    raw = (os.environ if environ is None else environ).get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    working_dir = runtime_env.get("working_dir") if isinstance(runtime_env, dict) else None
    return str(working_dir) if working_dir else None


def check_job_output_paths(locations: Sequence[tuple[str, str]], environ: Optional[dict] = None) -> None:
    """Refuse relative output paths in a job submitted with a working dir.

    Under ``ray job submit --working-dir .`` the entrypoint runs inside Ray's unpacked copy of
    the working dir (``<temp-dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>``):
    a relative ``paths.root`` would write there, where nobody looks, a resubmission with changed
    code runs in another copy (so a run could never resume), and Ray deletes unused copies.
    ``locations``: ``(key or flag, path)`` pairs; URIs and absolute paths pass.
    ``MUST_RAY_ALLOW_LOCAL_PATHS=1`` skips the check."""
    environ = os.environ if environ is None else environ
    working_dir = submitted_working_dir(environ)
    if working_dir is None or environ.get(ALLOW_LOCAL_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return
    for key, location in locations:
        if not location or uri_scheme(location) or os.path.isabs(os.path.expanduser(location)):
            continue
        example = f"{key} /mnt/shared/must-ray/run1" if key.startswith("--") else \
            f"--set {key}=/mnt/shared/must-ray/run1 (or s3://my-bucket/must-ray/run1)"
        raise ConfigError(
            f"{key}={location!r} is a relative path, but this job was submitted with a working dir "
            f"({working_dir}), so it would resolve inside Ray's temporary copy of that dir "
            f"({os.path.abspath(location)}): not where you look, a new directory for every code change "
            f"(a rerun would not resume), deleted by Ray. Give an absolute path or a URI, e.g. {example}.")


def job_output_locations(cfg: Any) -> list[tuple[str, str]]:
    """:func:`output_locations` plus the Ray Train storage paths when they are set."""
    out = output_locations(cfg)
    for role in ("teacher", "student"):
        train_cfg = getattr(cfg, role, None)
        storage = train_cfg.checkpoint.storage_path if train_cfg is not None else None
        if storage:
            out.append((f"{role}.checkpoint.storage_path", storage))
    return out


__all__ = [
    "Mount", "parse_mounts", "read_mounts", "mount_for", "uri_scheme", "describe_storage",
    "check_shared_storage", "check_cluster_paths", "cluster_node_count", "output_locations",
    "submitted_working_dir", "check_job_output_paths", "job_output_locations",
    "MULTI_NODE_ENV", "ALLOW_LOCAL_ENV", "RAY_JOB_CONFIG_ENV",
]
