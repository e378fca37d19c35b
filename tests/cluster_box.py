"""A Ray cluster in a box, for the cluster tests: a head on loopback that offers no CPUs for work,
whose worker nodes are either launched and removed by Ray's real autoscaler running
``cluster/local-autoscaling.yaml`` (the ``fake_multinode`` provider: each "node" is one more
raylet on this machine), or added and killed by hand. A :class:`NodeLog` records the alive worker
nodes over time.

Everything is stopped by pid: the head's ``ray start --block`` (and its process session, which
holds the autoscaler and every node it launched), each hand-added node's ``ray start --block``.
Never ``ray stop``, never ``ray.cluster_utils.AutoscalingCluster`` (both run ``ray stop``)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from tests.ray_head import RAY_BIN, LocalHead, free_ports, kill_stragglers, start_head

REPO = Path(__file__).resolve().parents[1]
BOX_YAML = REPO / "cluster" / "local-autoscaling.yaml"
WORKER_PORTS = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port", "runtime-env-agent-port")


def box_config(max_workers: Optional[int] = None, idle_timeout_s: Optional[float] = None) -> dict:
    """The shipped ``cluster/local-autoscaling.yaml``, with the worker cap and idle timeout a test
    needs."""
    config = yaml.safe_load(BOX_YAML.read_text())
    if max_workers is not None:
        config["max_workers"] = max_workers
        for name, node_type in config["available_node_types"].items():
            if name != config["head_node_type"]:
                node_type["max_workers"] = max_workers
    if idle_timeout_s is not None:
        config["idle_timeout_minutes"] = idle_timeout_s / 60
    return config


def start_box(autoscaling: bool = True, max_workers: Optional[int] = None, idle_timeout_s: Optional[float] = None,
              extra_env: Optional[dict[str, str]] = None) -> LocalHead:
    """A head with 0 CPUs; with ``autoscaling`` its autoscaler runs the box config (one update a
    second), without it worker nodes come from :func:`add_worker` only."""
    env = {"AUTOSCALER_UPDATE_INTERVAL_S": "1", **(extra_env or {})}
    config = box_config(max_workers, idle_timeout_s) if autoscaling else None
    return start_head(num_cpus=0, object_store_mb=256, extra_env=env, autoscaling=config)


@dataclass
class WorkerNode:
    """A worker node added by :func:`add_worker`: its ``ray start --block`` process and node id."""

    proc: subprocess.Popen
    node_id: str
    log_path: str = field(repr=False)

    def kill(self) -> None:
        """Lose the node: SIGKILL its raylet, then stop what is left of it."""
        kill_node(self.node_id)
        self.stop()

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop the node by its own means (SIGTERM to ``ray start --block``), then SIGKILL the rest
        of its process session."""
        import psutil

        try:
            mine = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            mine = []
        mine += [p for p in psutil.process_iter() if _sid(p.pid) == self.proc.pid and p not in mine]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        kill_stragglers([p for p in mine if p.is_running()], grace_s=3)


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


def add_worker(head: LocalHead, num_cpus: int = 1, timeout: float = 60.0, hide: Optional[str] = None) -> WorkerNode:
    """Join one more worker node (``num_cpus`` logical CPUs, its own free ports) to ``head`` and
    wait until the cluster lists it alive. ``hide``: a folder this node does not share with the
    others (it runs in its own mount namespace with an empty tmpfs over that folder, as a
    machine with its own local disk would; needs root, or CAP_SYS_ADMIN)."""
    before = {n["node_id"] for n in nodes(head)}
    ports = dict(zip(WORKER_PORTS, free_ports(len(WORKER_PORTS))))
    args = [RAY_BIN, "start", "--block", f"--address={head.gcs_address}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={256 * 1024 * 1024}",
            "--disable-usage-stats", *[f"--{name}={port}" for name, port in ports.items()]]
    if hide is not None:
        script = 'mount -t tmpfs must-ray-box "$0" && exec "$@"'
        args = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, hide, *args]
    log_path = os.path.join(head.temp_dir, f"worker_{ports['node-manager-port']}.log")
    env = {k: v for k, v in head.env.items() if k != "RAY_ADDRESS"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = [n for n in nodes(head) if n["node_id"] not in before and n["state"] == "ALIVE"]
        if new:
            return WorkerNode(proc, new[0]["node_id"], log_path)
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    WorkerNode(proc, "", log_path).stop()
    raise RuntimeError(f"worker node did not join in {timeout:.0f}s:\n{Path(log_path).read_text()[-3000:]}")


def nodes(head: LocalHead) -> list[dict]:
    """Every node the cluster knows (Ray's state API): ``node_id``, ``state``, ``is_head_node`` ..."""
    status, body = head.get(f"{head.dashboard_url}/api/v0/nodes?limit=1000&detail=true", timeout=10)
    if status != 200:
        raise RuntimeError(f"GET /api/v0/nodes -> {status}: {body[:300]}")
    return json.loads(body)["data"]["result"]["result"]


def alive_workers(head: LocalHead) -> list[str]:
    """Node ids of the alive worker (non-head) nodes."""
    return [n["node_id"] for n in nodes(head) if n["state"] == "ALIVE" and not n["is_head_node"]]


def raylet_pid(node_id: str) -> Optional[int]:
    """The pid of the raylet that runs node ``node_id`` on this machine."""
    import psutil

    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = p.info["cmdline"] or ()
        if cmd and cmd[0].endswith("/raylet") and f"--node_id={node_id}" in cmd:
            return p.pid
    return None


def kill_node(node_id: str) -> list[int]:
    """Lose node ``node_id`` the way a crashed machine is lost: SIGKILL its raylet and every process
    it started (its workers, agents) at once; a worker left running would finish its task and
    hand the result over, which a dead machine cannot. Returns the pids killed."""
    import psutil

    pid = raylet_pid(node_id)
    if pid is None:
        raise RuntimeError(f"no raylet runs node {node_id}")
    raylet = psutil.Process(pid)
    procs = [*raylet.children(recursive=True), raylet]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    return [p.pid for p in procs]


def can_hide_folders() -> bool:
    """Whether :func:`add_worker` can give a node its own mount namespace here."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs must-ray-box /mnt"], capture_output=True)
    return probe.returncode == 0


def wait_for(predicate: Callable[[], bool], timeout: float, every: float = 0.5) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


class NodeLog:
    """Records the number of alive worker nodes every ``interval_s`` in a thread: ``samples`` is
    ``[(seconds since start, count)]``, ``changes()`` only the samples where the count changed."""

    def __init__(self, head: LocalHead, interval_s: float = 1.0):
        self.head, self.interval_s = head, interval_s
        self.samples: list[tuple[float, int]] = []
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time() - self.t0, len(alive_workers(self.head))))
            except (RuntimeError, OSError, ValueError, KeyError):
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "NodeLog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        try:
            self.samples.append((time.time() - self.t0, len(alive_workers(self.head))))
        except (RuntimeError, OSError, ValueError, KeyError):
            pass

    @property
    def peak(self) -> int:
        return max((n for _, n in self.samples), default=0)

    def last(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def changes(self) -> list[tuple[float, int]]:
        out: list[tuple[float, int]] = []
        for t, n in self.samples:
            if not out or out[-1][1] != n:
                out.append((t, n))
        return out

    def text(self) -> str:
        """One line: ``t=0s:0 t=7s:1 t=9s:3 ...`` (seconds since the log started: worker nodes)."""
        return " ".join(f"t={t:.0f}s:{n}" for t, n in self.changes())
