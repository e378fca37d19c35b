"""The multi-node fail-fast check for output paths other nodes cannot see (must_ray.storage),
on the session's real single-node Ray. The probe across nodes (a shared path passes, a path a
node cannot see fails naming that node) runs on a cluster in a box: tests/test_cluster_box.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from must_ray.config import load_config
from must_ray.storage import (
    ALLOW_LOCAL_ENV,
    MULTI_NODE_ENV,
    check_cluster_paths,
    check_shared_storage,
    local_path,
    output_locations,
    probe_shared_storage,
    uri_scheme,
)
from must_ray.typed_config import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "configs" / "demo.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(MULTI_NODE_ENV, raising=False)
    monkeypatch.delenv(ALLOW_LOCAL_ENV, raising=False)


def test_uris_and_local_paths(tmp_path):
    assert uri_scheme("s3://bucket/x") == "s3"
    assert uri_scheme("GS://bucket") == "gs"
    assert uri_scheme("/abs/path") is None and uri_scheme("rel/path") is None
    for uri in ("s3://b/run", "gs://b/run", "abfs://c@acct.dfs.core.windows.net/run", "hdfs://nn:8020/run"):
        assert local_path(uri) is None, uri
    assert local_path(f"file://{tmp_path}/x") == f"{tmp_path}/x"
    assert local_path("rel/x").endswith("/rel/x") and local_path("rel/x").startswith("/")


def test_output_locations_name_every_output_key(tmp_path):
    cfg = load_config(DEMO, ["paths.root=s3://my-bucket/run1", f"paths.student={tmp_path}/student",
                             f"label.output={tmp_path}/labels"])
    assert dict(output_locations(cfg)) == {"paths.root": "s3://my-bucket/run1", "paths.student": f"{tmp_path}/student",
                                          "label.output": f"{tmp_path}/labels"}


def test_single_node_accepts_any_path_and_probes_nothing(ray_session, tmp_path):
    assert probe_shared_storage([("paths.root", str(tmp_path))]) == []  # no other node to ask
    check_shared_storage([("paths.root", str(tmp_path)), ("paths.x", "out/demo")])
    check_cluster_paths(load_config(DEMO, [f"paths.root={tmp_path}/run"]))
    assert not list(tmp_path.glob(".must-ray-storage-probe-*"))


def test_multi_node_cluster_without_other_nodes_refuses_local_paths(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv(MULTI_NODE_ENV, "1")  # what the shipped cluster configs set on every node
    cfg = load_config(DEMO, [f"paths.root={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"^paths\.root=.*MUST_RAY_MULTI_NODE=1.*s3://") as exc:
        check_cluster_paths(cfg)
    assert "\n" not in str(exc.value)
    cfg = load_config(DEMO, ["paths.root=gs://b/run1", f"label.output=file://{tmp_path}/labels"])
    with pytest.raises(ConfigError, match=r"^label\.output="):
        check_cluster_paths(cfg)
    check_cluster_paths(load_config(DEMO, ["paths.root=s3://my-bucket/run1"]))
    monkeypatch.setenv(ALLOW_LOCAL_ENV, "1")
    check_cluster_paths(load_config(DEMO, [f"paths.root={tmp_path}/run"]))
