"""A throw-away Ray head on loopback, for tests that go through Ray's own front doors
(``ray job submit``, the node's Prometheus endpoint) instead of an in-process ``ray.init``.

Why a separate head: ``ray job submit`` needs a dashboard (the session fixture's local Ray has
none), and the node's metrics endpoint must belong to a cluster whose only jobs are the test's.
It has to coexist with the session's local Ray (tests/conftest.py) and with other users' Ray
instances on the same machine, so it

* uses 127.0.0.1 as its node address, binds the dashboard (job API) to it, and takes its own
  free ports (GCS, dashboard, dashboard agent HTTP + gRPC, runtime-env agent, client server,
  node/object manager, metrics export; worker ports are the OS's random ones, Ray's default).
  (Ray 2.60 still listens on all interfaces with the GCS, raylet, object manager and metrics
  ports; no ray start option restricts them. Token auth covers the RPC ports, not metrics.)
* keeps all its files under its own short ``--temp-dir`` (unix socket paths are limited to
  ~107 bytes; the default /tmp/ray and its ``ray_current_cluster`` file stay untouched);
* runs with token authentication ON, as users run it, with the token passed as
  ``RAY_AUTH_TOKEN`` in the environment of the head and of every client command: Ray prefers
  that variable to ``RAY_AUTH_TOKEN_PATH`` and to ``~/.ray/auth_token``, so a user's token file is
  neither read nor written;
* is stopped by its own means only: ``ray start --head --block`` is its parent process, and
  SIGTERM to it makes Ray kill the processes it started (``Node.kill_all_processes``); then any
  straggler in its process session or naming its temp dir is killed. Never ``ray stop``, which
  would kill every Ray on the machine.

The head's CPUs are logical (``--num-cpus``): it can be declared next to the session's Ray on
the same two cores; both are just slower.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import ray  # noqa: F401  (also puts Ray's vendored psutil on sys.path)

RAY_BIN = str(Path(sys.executable).with_name("ray"))
PORT_NAMES = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "ray-client-server-port", "node-manager-port",
              "object-manager-port", "metrics-export-port")
# Variables of the caller that must not leak into the head or its clients: they would point them
# at another cluster or another token.
_SCRUB = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free on 127.0.0.1 a moment ago (bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalHead:
    """A running head started by :func:`start_head`."""

    temp_dir: str
    ports: dict[str, int]
    token: str
    proc: subprocess.Popen
    env: dict[str, str] = field(repr=False)  # environment for client commands (ray job ..., jobs)
    startup_s: float = 0.0

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics-export-port']}/metrics"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    def get(self, url: str, timeout: float = 5.0, auth: bool = True) -> tuple[int, str]:
        """HTTP GET (with the cluster's bearer token): ``(status, body)``; status 0 = unreachable."""
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"} if auth else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError):
            return 0, ""

    def job(self, submission_id: str) -> dict:
        """The job's details from the job REST API (``status``, ``message``, ``start_time`` ...)."""
        status, body = self.get(f"{self.dashboard_url}/api/jobs/{submission_id}")
        if status != 200:
            raise RuntimeError(f"GET /api/jobs/{submission_id} -> {status}: {body[:500]}")
        return json.loads(body)

    def job_logs(self, submission_id: str) -> str:
        status, body = self.get(f"{self.dashboard_url}/api/jobs/{submission_id}/logs", timeout=30)
        if status != 200:
            raise RuntimeError(f"GET /api/jobs/{submission_id}/logs -> {status}: {body[:500]}")
        return json.loads(body)["logs"]

    def ray(self, *args: str, timeout: float = 120, check: bool = True,
            cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run a ``ray`` CLI command against this head (its dashboard address and token)."""
        proc = subprocess.run([RAY_BIN, *args], env=self.env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def processes(self) -> list:
        """psutil processes that belong to this head: its ``ray start`` process and descendants, its
        process session, anything whose command line names its temp dir."""
        import psutil

        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.proc.pid)
            found[root.pid] = root
            for child in root.children(recursive=True):
                found[child.pid] = child
        except psutil.Error:
            pass
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid == os.getpid():
                    continue
                mine = os.getsid(p.pid) == self.proc.pid or self.temp_dir in " ".join(p.info["cmdline"] or ())
            except (psutil.Error, OSError):
                continue
            if mine:
                found[p.pid] = p
                try:
                    for child in p.children(recursive=True):
                        found[child.pid] = child
                except psutil.Error:
                    pass
        return list(found.values())

    def stop(self, grace_s: float = 20.0) -> list[int]:
        """Stop this head and everything it started; returns pids that had to be SIGKILLed."""
        before = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ray start --block: Ray drains and kills its processes
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        killed = kill_stragglers([p for p in before + self.processes() if p.is_running()], grace_s=3)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return killed


def kill_stragglers(procs: list, grace_s: float) -> list[int]:
    """Give psutil ``procs`` ``grace_s`` seconds to exit, SIGKILL the ones still running; returns
    the pids that had to be killed."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    killed = []
    for p in alive:
        try:
            p.kill()
            killed.append(p.pid)
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return killed


def start_head(num_cpus: int = 2, object_store_mb: int = 256, extra_env: Optional[dict[str, str]] = None,
               timeout: float = 90.0, autoscaling: Optional[dict] = None) -> LocalHead:
    """Start a head with token auth on loopback, wait until its dashboard (job API) and metrics
    endpoint answer, and return it. ``extra_env``: more variables for the head's processes (e.g.
    ``RAY_metrics_report_interval_ms``); they reach every worker and job driver it starts.
    ``autoscaling``: a cluster config (a ``fake_multinode`` provider) the head's autoscaler runs;
    its ``provider.gcs_address`` is set to the head's port."""
    t0 = time.time()
    temp_dir = tempfile.mkdtemp(prefix="mrh", dir="/tmp")  # short: /tmp/mrhXXXXXXXX/session_.../sockets/...
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
    token = secrets.token_hex(32)
    base = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
                # SIGTERM tears the node down at once (no drain wait meant for Serve replicas)
                RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    # `python` in a job's entrypoint is looked up on the head's PATH: make it this interpreter (the
    # virtualenv that has must-ray's dependencies), as an activated virtualenv would
    base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")])
    head_env = dict(base, **(extra_env or {}))
    args = [RAY_BIN, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            "--include-dashboard=true", f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--object-store-memory={object_store_mb * 1024 * 1024}", "--disable-usage-stats"]
    args += [f"--{name}={port}" for name, port in ports.items()]
    if autoscaling is not None:
        config = json.loads(json.dumps(autoscaling))
        config["provider"]["gcs_address"] = f"127.0.0.1:{ports['port']}"
        config_path = os.path.join(temp_dir, "autoscaling.yaml")
        Path(config_path).write_text(json.dumps(config))
        args.append(f"--autoscaling-config={config_path}")
        head_env.update(RAY_FAKE_CLUSTER="1")
    log = open(os.path.join(temp_dir, "ray_start.log"), "w")
    proc = subprocess.Popen(args, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client_env = dict(base, RAY_ADDRESS=f"http://127.0.0.1:{ports['dashboard-port']}")
    head = LocalHead(temp_dir, ports, token, proc, client_env)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{_tail(log.name)}")
            status, _ = head.get(f"{head.dashboard_url}/api/version", timeout=2)
            mstatus, _ = head.get(head.metrics_url, timeout=2, auth=False)
            if status == 200 and mstatus == 200:
                break
            if time.time() > deadline:
                raise RuntimeError(f"head not ready after {timeout:.0f}s (dashboard {status}, metrics {mstatus}):\n"
                                   f"{_tail(log.name)}")
            time.sleep(0.5)
    except BaseException:
        head.stop()
        raise
    head.startup_s = time.time() - t0
    return head


def _tail(path: str, n: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ----------------------------------------------------------------------------- Prometheus scraping

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str, prefix: str = "") -> list[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` of every sample in Prometheus text exposition format whose name
    starts with ``prefix``."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#") or not line.startswith(prefix):
            continue
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(m.group(2) or "")}
        out.append((m.group(1), labels, float(m.group(3))))
    return out


class MetricsWatcher:
    """Scrapes a node's ``/metrics`` every ``interval_s`` in a thread and remembers every series
    (name + labels) it ever saw with its last and largest value: gauges of a worker vanish from
    the endpoint shortly after the worker exits, so a test must catch them while the job runs."""

    def __init__(self, url: str, prefix: str = "ray_must_ray_", interval_s: float = 0.5):
        self.url, self.prefix, self.interval_s = url, prefix, interval_s
        self.last: dict[tuple, float] = {}
        self.max: dict[tuple, float] = {}
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def scrape_once(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                text = resp.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError):
            return
        self.scrapes += 1
        for name, labels, value in parse_prometheus(text, self.prefix):
            key = (name, tuple(sorted(labels.items())))
            self.last[key] = value
            self.max[key] = max(value, self.max.get(key, value))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scrape_once()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "MetricsWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def series(self, name: str, **match: str) -> dict[tuple, float]:
        """Last values of the series called ``name`` whose labels include ``match``."""
        return {k: v for k, v in self.last.items()
                if k[0] == name and all(dict(k[1]).get(lk) == lv for lk, lv in match.items())}

    def total(self, name: str, **match: str) -> float:
        """Sum of the last values of ``name`` over its series (e.g. a counter over its workers)."""
        return sum(self.series(name, **match).values())
