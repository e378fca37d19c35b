"""The multi-node fail-fast check for node-local output paths (must_ray.storage), with this
machine's real /proc/mounts and a real single-node Ray."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from must_ray.config import load_config
from must_ray.storage import (
    ALLOW_LOCAL_ENV,
    MULTI_NODE_ENV,
    check_cluster_paths,
    check_shared_storage,
    describe_storage,
    mount_for,
    parse_mounts,
    read_mounts,
    uri_scheme,
)
from must_ray.typed_config import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "configs" / "demo.yaml"

SYNTHETIC_MOUNTS = """\
/dev/vda1 / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
10.0.0.5:/export /mnt/nfs nfs4 rw,relatime,vers=4.1 0 0
fs-123.efs.us-west-2.amazonaws.com:/ /mnt/efs nfs4 rw,relatime 0 0
my-bucket /mnt/gcs fuse.gcsfuse rw,nosuid,nodev 0 0
mountpoint-s3 /mnt/s3 fuse rw,nosuid,nodev 0 0
some-daemon /mnt/other-fuse fuse rw 0 0
//server/share /mnt/my\\040share cifs rw 0 0
/dev/vdb /mnt/nfs/local-scratch ext4 rw 0 0
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(MULTI_NODE_ENV, raising=False)
    monkeypatch.delenv(ALLOW_LOCAL_ENV, raising=False)


@pytest.fixture
def local_tmp(tmp_path):
    """A temp dir on a node-local filesystem of this machine (skip where /tmp is itself shared)."""
    mounts = read_mounts()
    if mounts is None:
        pytest.skip("no /proc/mounts on this machine")
    m = mount_for(str(tmp_path), mounts)
    if m is not None and m.shared:
        pytest.skip(f"{tmp_path} is on a shared filesystem ({m.fstype}) here")
    return tmp_path


def test_reads_this_machines_mount_table(tmp_path):
    mounts = read_mounts()
    if mounts is None:
        pytest.skip("no /proc/mounts on this machine")
    assert any(m.mountpoint == "/" for m in mounts)
    m = mount_for(str(tmp_path), mounts)
    assert m is not None and m.fstype
    # a path that does not exist yet resolves to the mount of its nearest existing ancestor
    assert mount_for(str(tmp_path / "not" / "yet" / "there"), mounts) == m


def test_parse_mounts_and_longest_prefix_match():
    mounts = parse_mounts(SYNTHETIC_MOUNTS)
    assert len(mounts) == 9
    assert mounts[7].mountpoint == "/mnt/my share"  # \040 decoded
    by_path = {p: mount_for(p, mounts) for p in
               ["/mnt/nfs/run1", "/mnt/nfs/local-scratch/x", "/mnt/nfsx", "/mnt/gcs/a", "/mnt/s3/a",
                "/mnt/other-fuse/a", "/mnt/my share/run", "/mnt/efs"]}
    assert by_path["/mnt/nfs/run1"].fstype == "nfs4"
    assert by_path["/mnt/nfs/local-scratch/x"].fstype == "ext4"  # nested local disk wins
    assert by_path["/mnt/nfsx"].mountpoint == "/"  # a prefix of the name is not a parent
    assert by_path["/mnt/gcs/a"].shared and by_path["/mnt/s3/a"].shared
    assert by_path["/mnt/my share/run"].shared and by_path["/mnt/efs"].shared
    assert not by_path["/mnt/other-fuse/a"].shared
    assert not by_path["/mnt/nfs/local-scratch/x"].shared


def test_uris():
    assert uri_scheme("s3://bucket/x") == "s3"
    assert uri_scheme("GS://bucket") == "gs"
    assert uri_scheme("/abs/path") is None and uri_scheme("rel/path") is None
    for uri in ("s3://b/run", "gs://b/run", "abfs://c@acct.dfs.core.windows.net/run", "hdfs://nn:8020/run"):
        assert describe_storage(uri, mounts=[])[0], uri
        check_shared_storage(uri, 8)


def test_single_node_accepts_any_local_path(local_tmp):
    check_shared_storage(str(local_tmp), 1)
    check_shared_storage("out/demo", 1)
    check_shared_storage(str(local_tmp), 0)


def test_multi_node_rejects_node_local_path(local_tmp):
    with pytest.raises(ConfigError) as exc:
        check_shared_storage(str(local_tmp / "run1"), 3)
    msg = str(exc.value)
    assert msg.startswith("paths.root=")
    assert "node-local" in msg and "3 nodes" in msg
    assert "s3://" in msg and "NFS" in msg
    # file:// URIs are local paths too, and the key named in the message is the caller's
    with pytest.raises(ConfigError, match=r"^paths\.student='file://"):
        check_shared_storage(f"file://{local_tmp}/ckpt", 2, key="paths.student")


def test_multi_node_accepts_shared_filesystems():
    mounts = parse_mounts(SYNTHETIC_MOUNTS)
    # these mount points need not exist on this machine: the given table decides
    for path in ("/mnt/nfs/run1", "/mnt/efs/run1", "/mnt/gcs/run1", "/mnt/s3/run1", "/mnt/my share/r"):
        shared, how = describe_storage(path, mounts)
        assert shared, (path, how)
        check_shared_storage(path, 4, mounts=mounts)
    with pytest.raises(ConfigError):
        check_shared_storage("/mnt/nfs/local-scratch/run1", 4, mounts=mounts)


def test_multi_node_shared_path_passes_with_real_nfs_style_table(tmp_path):
    # The real ancestor of tmp_path, declared as an NFS mount in a table: the path-to-mount
    # resolution then runs on real, existing directories.
    real = os.path.realpath(tmp_path)
    mounts = parse_mounts(f"/dev/vda1 / ext4 rw 0 0\nnfs-server:/exp {real} nfs4 rw 0 0\n")
    check_shared_storage(str(tmp_path / "run1"), 5, mounts=mounts)


def test_allow_local_env_escape_hatch(local_tmp, monkeypatch):
    monkeypatch.setenv(ALLOW_LOCAL_ENV, "1")
    check_shared_storage(str(local_tmp), 10)


def test_check_cluster_paths_names_the_key(local_tmp):
    cfg = load_config(DEMO)  # paths.root: out/demo (relative, node-local)
    check_cluster_paths(cfg, cluster_nodes=1)
    with pytest.raises(ConfigError, match=r"^paths\.root='out/demo'"):
        check_cluster_paths(cfg, cluster_nodes=2)
    check_cluster_paths(load_config(DEMO, ["paths.root=s3://my-bucket/run1"]), cluster_nodes=2)
    # an absolute output outside paths.root is checked under its own key
    cfg = load_config(DEMO, ["paths.root=s3://my-bucket/run1", f"paths.student={local_tmp}/student"])
    with pytest.raises(ConfigError, match=r"^paths\.student="):
        check_cluster_paths(cfg, cluster_nodes=2)
    cfg = load_config(DEMO, ["paths.root=gs://b/run1", f"label.output={local_tmp}/labels"])
    with pytest.raises(ConfigError, match=r"^label\.output="):
        check_cluster_paths(cfg, cluster_nodes=2)


def test_check_cluster_paths_with_real_ray(ray_session, local_tmp, monkeypatch):
    cfg = load_config(DEMO, [f"paths.root={local_tmp}/run"])
    check_cluster_paths(cfg)  # a single-node local Ray: any path is fine
    monkeypatch.setenv(MULTI_NODE_ENV, "1")  # what the shipped cluster configs set on every node
    with pytest.raises(ConfigError, match=MULTI_NODE_ENV):
        check_cluster_paths(cfg)
    check_cluster_paths(load_config(DEMO, ["paths.root=s3://my-bucket/run1"]))
    monkeypatch.setenv(ALLOW_LOCAL_ENV, "1")
    check_cluster_paths(cfg)


def test_init_ray_runs_the_check(monkeypatch):
    import ray

    import must_ray.storage as storage
    from must_ray.cli import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(storage, "cluster_node_count", lambda: 3)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head.example:10001")
    with pytest.raises(ConfigError, match=r"^paths\.root="):
        init_ray(load_config(DEMO))
    assert calls, "init_ray must connect before checking"
    init_ray(load_config(DEMO, ["paths.root=s3://my-bucket/run1"]))
