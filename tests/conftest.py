"""Shared fixtures: one local Ray instance for the whole test session (2 CPUs, never attaching to
a stray cluster; its workers import from the repository root too, so task modules under tests/
plug in there as a user's package would), the demo config, and small world tables written once per
session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Tests run on small CPU machines: keep torch from oversubscribing the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


PLUGIN_TASK_MODULE = "tests.edges_task"


@pytest.fixture
def sandboxed_registry(monkeypatch):
    """A plug-in task (tests/edges_task.py) registers into a copy of the task registry, forgotten
    (with its module) afterwards, so the rest of the session sees the five built-in tasks only."""
    from must_ray import task_registry
    from must_ray.tasks import registered_task_names

    registered_task_names()  # the built-in tasks, into the copy
    monkeypatch.setattr(task_registry, "_REGISTRY", dict(task_registry._REGISTRY))
    assert PLUGIN_TASK_MODULE not in sys.modules
    yield
    sys.modules.pop(PLUGIN_TASK_MODULE, None)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": _worker_pythonpath()}})
    session_dir = _session_dir(ray)
    yield ray
    ray.shutdown()
    _kill_session_leftovers(session_dir)


def _worker_pythonpath() -> str:
    """The repository root first, then whatever this process was given."""
    return os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def _session_dir(ray) -> str | None:
    """This test session's Ray session directory (every process of the session logs under it)."""
    try:
        return ray._private.worker._global_node.get_session_dir_path()
    except Exception:  # a private attribute: without it, no clean-up, never a failed session
        return None


def _kill_session_leftovers(session_dir: str | None, grace_s: float = 10.0) -> None:
    """After ``ray.shutdown()``, kill the processes of *this* session that did not exit.

    Seen in Ray 2.60: a Ray Train ``TrainController`` actor whose core worker had shut down hung at
    interpreter exit and outlived the suite, orphaned, holding ~1 GiB. Only processes with files
    open in this session's own directory are touched (never ``ray stop``, which would kill every
    Ray process on the machine)."""
    if not session_dir:
        return
    import psutil

    from tests.ray_head import kill_stragglers  # imports ray first, which provides psutil

    leftovers = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and any(f.path.startswith(session_dir) for f in p.open_files()):
                leftovers.append(p)
        except psutil.Error:  # gone, or not ours to read
            continue
    for pid in kill_stragglers(leftovers, grace_s):
        print(f"\n[conftest] killed pid {pid}, left over from this test session's Ray", file=sys.stderr)


@pytest.fixture(scope="session")
def demo_config():
    from must_ray.config import load_config

    return load_config(REPO / "jobs" / "configs" / "demo.yaml")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server (moto) on loopback for the session, in its own process, with IAM
    auth on (tests/s3_server.py); stopped by its pid at the end. This process's environment is
    left alone: tests hand ``s3_server.env()`` to the jobs they start."""
    from tests.s3_server import start_s3_server

    server = start_s3_server(str(tmp_path_factory.mktemp("s3")))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's S3 server (its name)."""
    return s3_server.create_bucket()
