"""Shared storage for multi-node runs: fail fast on output paths that other nodes cannot see.

On one machine any path works. On a multi-node Ray cluster the examples tables, teacher and
student checkpoints are written by tasks and Ray Train workers on *every* node, so each output
location must be storage that all nodes see: a URI (``s3://``, ``gs://``, ``abfs://`` ...; the
object store's own preflight is :mod:`must_ray.object_store`) or a path on a filesystem mounted at
the same place on every node. A node-local path would scatter outputs over the nodes' local
disks and lose checkpoints when nodes scale down, so :func:`check_cluster_paths` (called by
``must_ray.cli.init_ray`` right after connecting) raises :class:`~must_ray.config.ConfigError`.

Whether a path is shared is not guessed from its filesystem type: it is **probed**. The driver
writes a sentinel file with a random token under the path (in its nearest existing folder) and
one task pinned to each other alive node reads it back; a node that does not see the token is
named in the error. So an NFS, EFS, Lustre or FUSE mount passes because every node sees it, and
a node-local disk fails because one does not, whatever the mount table says.

A relative path is relative to the driver's working directory, which under ``ray job submit`` is
the job's unpacked ``--working-dir`` copy: always node-local, and temporary, so
:func:`check_job_output_paths` (called by ``must_ray.cli.load_job_config``) refuses relative
output paths in a submitted job even on a single node.

Environment:
  ``MUST_RAY_MULTI_NODE=1``        treat the cluster as multi-node even while only the driver's node is
                                   up (the shipped cluster YAMLs/manifests set it: autoscaling adds
                                   workers after the job has started). With no other node to probe,
                                   a local path is refused.
  ``MUST_RAY_ALLOW_LOCAL_PATHS=1`` skip the check: for that case only, when the path is a shared
                                   mount and no worker node is up yet to prove it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import secrets
from typing import Any, Optional, Sequence

from must_ray.typed_config import ConfigError

MULTI_NODE_ENV = "MUST_RAY_MULTI_NODE"
ALLOW_LOCAL_ENV = "MUST_RAY_ALLOW_LOCAL_PATHS"
PROBE_PREFIX = ".must-ray-storage-probe-"
PROBE_TIMEOUT_S = 30.0

# URI schemes that are a plain path on the local node.
LOCAL_URI_SCHEMES = frozenset({"file", "local"})

_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def uri_scheme(path_or_uri: str) -> Optional[str]:
    """The lower-case scheme of ``s3://bucket/x``-style strings, ``None`` for plain paths."""
    m = _URI_RE.match(path_or_uri)
    return m.group(1).lower() if m else None


def local_path(path_or_uri: str) -> Optional[str]:
    """The absolute local path of a plain path or ``file://`` URI; ``None`` for a remote URI."""
    scheme = uri_scheme(path_or_uri)
    if scheme is not None and scheme not in LOCAL_URI_SCHEMES:
        return None
    local = path_or_uri[len(scheme) + 3:] if scheme else path_or_uri
    return os.path.abspath(os.path.expanduser(local))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cluster_node_count() -> int:
    """Alive nodes of the connected Ray cluster (``ray.nodes()``)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive", n.get("alive", False)))


def _nearest_folder(path: str) -> str:
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _read_probes(paths: list[str]) -> list[Optional[str]]:
    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                out.append(f.read())
        except OSError:
            out.append(None)
    return out


def probe_shared_storage(locations: Sequence[tuple[str, str]], timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """Prove that every local ``(key, path)`` of ``locations`` is seen by every other alive node
    of the connected cluster: a sentinel written here must read back on each of them. Raises
    :class:`ConfigError` naming the key, the path and the first node that cannot see it. Returns
    the node ids probed (none on a one-node cluster). URIs are skipped."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = [(key, path) for key, location in locations if location and (path := local_path(location))]
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not local or not others:
        return []
    token = secrets.token_hex(16)
    sentinels = []
    try:
        for key, path in local:
            folder = _nearest_folder(path)
            sentinel = os.path.join(folder, f"{PROBE_PREFIX}{token}")
            try:
                with open(sentinel, "w", encoding="utf-8") as f:
                    f.write(token)
            except OSError as exc:
                raise ConfigError(f"{key}={path!r}: cannot write under {folder} to check that every node sees it "
                                  f"({exc.strerror or exc}); give a writable path or a URI") from None
            sentinels.append((key, path, sentinel))
        reader = ray.remote(num_cpus=0, max_retries=0)(_read_probes)
        paths = [s for _, _, s in sentinels]
        refs = {reader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            paths): n for n in others}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in pending:
            node = refs[ref]
            ray.cancel(ref, force=True)
            raise ConfigError(f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]}) did not answer the "
                              f"shared-storage probe of {', '.join(k for k, _, _ in sentinels)} in {timeout_s:.0f}s; "
                              f"check that node, or set {ALLOW_LOCAL_ENV}=1 to skip the probe")
        for ref in ready:
            try:
                seen = ray.get(ref)
            except (ray.exceptions.RayError, OSError):
                continue  # the node died meanwhile: nothing of this run will land there
            for (key, path, sentinel), token_seen in zip(sentinels, seen):
                if token_seen != token:
                    node = refs[ref]
                    raise ConfigError(
                        f"{key}={path!r} is not on storage every node sees: node {node['NodeManagerAddress']} "
                        f"({node['NodeID'][:12]}) cannot read {sentinel}, which this driver just wrote; tables "
                        f"and checkpoints written there would land on that node's local disk and be lost when it "
                        f"scales down. Point {key} at a URI (--set {key}=s3://my-bucket/must-ray/run1) or at a "
                        f"shared mount present on every node (NFS, EFS, Lustre ...)")
        return [n["NodeID"] for n in others]
    finally:
        for _, _, sentinel in sentinels:
            try:
                os.remove(sentinel)
            except OSError:
                pass


def check_shared_storage(locations: Sequence[tuple[str, Optional[str]]]) -> None:
    """Fail fast when a multi-node cluster would write to a path some node cannot see: probe the
    other alive nodes (:func:`probe_shared_storage`); on a cluster marked multi-node
    (``MUST_RAY_MULTI_NODE=1``) whose other nodes are not up yet, refuse local paths (nothing can
    prove them shared yet). A one-node cluster (a laptop) accepts any path."""
    if _truthy(ALLOW_LOCAL_ENV):
        return
    locations = [(key, loc) for key, loc in locations if loc]
    if probe_shared_storage(locations) or not _truthy(MULTI_NODE_ENV):
        return
    for key, location in locations:
        if local_path(location) is not None:
            raise ConfigError(
                f"{key}={location!r} is a local path, and this Ray cluster is multi-node ({MULTI_NODE_ENV}=1) but "
                f"has no other node up yet to prove that path is shared: point {key} at a URI "
                f"(--set {key}=s3://my-bucket/must-ray/run1), or keep a worker node up (min_workers >= 1) so "
                f"the probe can check it, or set {ALLOW_LOCAL_ENV}=1 if it is a mount every node has")


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


def check_cluster_paths(cfg: Any) -> None:
    """Fail fast when a multi-node cluster would write the config's outputs to a path some node
    cannot see (:func:`check_shared_storage`)."""
    check_shared_storage(output_locations(cfg))


# Set by Ray's job supervisor in the environment of a `ray job submit` entrypoint: the job's
# runtime_env (with its working_dir URI) and metadata, as JSON (ray._private.runtime_env.constants).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submitted_runtime_env(environ: Optional[dict] = None) -> dict:
    """The runtime environment this process was submitted with (``ray job submit
    --working-dir ... --runtime-env-json ...``), ``{}`` outside a submitted job."""
    import json

    raw = (os.environ if environ is None else environ).get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}
    return runtime_env if isinstance(runtime_env, dict) else {}


def submitted_working_dir(environ: Optional[dict] = None) -> Optional[str]:
    """The ``working_dir`` of the runtime environment this process was submitted with
    (``ray job submit --working-dir ...``), or ``None`` outside a submitted job / without one."""
    working_dir = submitted_runtime_env(environ).get("working_dir")
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
    "uri_scheme", "local_path", "probe_shared_storage", "check_shared_storage", "check_cluster_paths",
    "cluster_node_count", "output_locations", "submitted_runtime_env", "submitted_working_dir",
    "check_job_output_paths",
    "job_output_locations", "MULTI_NODE_ENV", "ALLOW_LOCAL_ENV", "RAY_JOB_CONFIG_ENV",
]
