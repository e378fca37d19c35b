"""The cluster paths, run on a Ray cluster in a box (tests/cluster_box.py): autoscaled labelling
from cluster/local-autoscaling.yaml with a node lost mid-shard, elastic training that grows and
shrinks, and the shared-storage probe across nodes. Each test starts its own head on loopback with
free ports and its own temp dir, drives the real jobs as subprocesses, and stops everything it
started by pid."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from must_ray.label.store import OutputStore
from must_ray.tasks import default_task_names
from tests.cluster_box import NodeLog, alive_workers, kill_node, start_box, wait_for

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
RANDOM_TEACHERS = [x for t in default_task_names() for x in ("--set", f"label.teachers.{t}.kind=random")]
IDLE_TIMEOUT_S = 10


def _write_images(folder: Path, n: int, size: int = 48) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return sorted(str(p) for p in folder.iterdir())


def _in_flight_on_a_node(store: OutputStore) -> tuple[int, str] | None:
    """A shard an actor has started and not committed yet, and the node it runs on."""
    committed = store.committed_shards()
    if not store.exists(store.attempts_dir):
        return None
    for info in store.fs.get_file_info(pafs.FileSelector(store.attempts_dir)):
        shard = int(os.path.basename(info.path))
        if shard not in committed:
            with store.fs.open_input_stream(info.path) as f:
                node = f.read().decode()
            if node:
                return shard, node
    return None


def test_autoscaled_labelling_survives_a_lost_node_and_scales_back_to_zero(tmp_path):
    """A label job with an actor pool of [1, 3] on a head with no CPUs: the autoscaler launches
    worker nodes for it; one node is killed (its raylet and processes, SIGKILL) while its actor is
    mid-shard; the job still ends in the same run with one row per input and says which shard it
    retried; the idle nodes are removed after the idle timeout."""
    images = _write_images(tmp_path / "png", 24)
    out = tmp_path / "labels"
    head = start_box(max_workers=3, idle_timeout_s=IDLE_TIMEOUT_S,
                     extra_env={"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
    try:
        with NodeLog(head) as nodes:
            args = [sys.executable, str(REPO / "jobs" / "label.py"), "--input", str(tmp_path / "png"),
                    "--output", str(out), "--set", f"paths.root={tmp_path}", "--set", "label.shard_size=3",
                    "--set", "label.batch_size=3", "--set", "label.image_size=96", "--set", "label.actors=[1, 3]",
                    "--set", "label.decode_num_cpus=0.25", *RANDOM_TEACHERS]
            job = subprocess.Popen(args, env=dict(head.env, RAY_ADDRESS=head.gcs_address), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            store = OutputStore(str(out))
            assert wait_for(lambda: job.poll() is not None or _in_flight_on_a_node(store) is not None, 240, 0.05)
            victim = _in_flight_on_a_node(store)
            assert victim is not None, f"the job ended before a shard was in flight: {job.communicate()[1][-3000:]}"
            shard, node = victim
            kill_node(node)
            killed_at = time.time() - nodes.t0
            stdout, stderr = job.communicate(timeout=300)
            assert job.returncode == 0, stderr[-4000:]
            done_at = time.time() - nodes.t0
            assert wait_for(lambda: not alive_workers(head), IDLE_TIMEOUT_S + 90), nodes.text()
        summary = json.loads(stdout.strip().splitlines()[-1])
        ids = pq.read_table(out, columns=["image_id"]).column("image_id").to_pylist()
        assert len(ids) == len(set(ids)) == len(images) and set(ids) == set(images)
        assert summary["rows"] == len(images) and summary["exactly_once"]["passed"]
        assert summary["shards_retried"] >= 1, summary
        assert f"shard {shard} was retried" in stderr, stderr[-3000:]
        assert nodes.peak >= 2, nodes.text()
        print(f"\nautoscaled labelling: worker nodes over time {nodes.text()}; node {node[-5:]} killed at "
              f"t={killed_at:.0f}s mid-shard {shard}; job done at t={done_at:.0f}s: {summary['rows']} rows for "
              f"{len(images)} inputs, {summary['shards_retried']} shard(s) retried of {summary['shards']}")
    finally:
        head.stop()


def _stream_lines(proc: subprocess.Popen, t0: float) -> list[tuple[float, str]]:
    """Collect ``proc``'s stderr lines with their second since ``t0``, in a thread."""
    import threading

    lines: list[tuple[float, str]] = []

    def pump():
        for line in proc.stderr:
            lines.append((time.time() - t0, line.rstrip()))

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_elastic_training_grows_with_a_new_node_and_shrinks_when_one_is_lost(tmp_path, demo_config):
    """``--workers 1,2`` on a cluster of one 1-CPU worker node: a second node joins mid-run and the
    group grows to 2 workers at the next resize check; that node is then killed and the group
    shrinks to 1 and trains on. The global batch stays 8 and the step count is continuous: each
    group restarts from the newest registered checkpoint, at most one checkpoint interval back."""
    from tests.cluster_box import add_worker
    from tests.train.test_training import FAST, world_table

    table = world_table(demo_config, "teacher_depth", tmp_path / "depth", 128, image_size=32)
    head = start_box(autoscaling=False,
                     extra_env={"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
    nodes = []
    try:
        nodes.append(add_worker(head, num_cpus=1))
        # enough steps that the run cannot end before it grows: a joined node is seen by Ray Train's
        # elastic policy only at the AutoscalingCoordinator's next 20 s tick (300 steps once ran out)
        every, steps = 10, 450
        sets = [f"teacher.{o}" for o in FAST if not o.startswith("scaling.num_workers")] + [
            f"paths.root={tmp_path}", "world.image_size=32", "teacher.scaling.resize_interval_s=5",
            f"teacher.checkpoint.every_steps={every}", f"teacher.report_every_steps={every}",
            "teacher.checkpoint.max_failures=3"]
        args = [sys.executable, str(REPO / "jobs" / "train_teacher.py"), "--task", "depth", "--data", table,
                "--out", str(tmp_path / "out"), "--steps", str(steps), "--workers", "1,2", "--batch-size", "8",
                *[x for s in sets for x in ("--set", s)]]
        t0 = time.time()
        job = subprocess.Popen(args, env=dict(head.env, RAY_ADDRESS=head.gcs_address), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        lines = _stream_lines(job, t0)

        def reports(world: int) -> int:  # distinct lines: in the box every node's log monitor forwards each line
            return len({line for _, line in lines if f"img/s x{world}" in line})

        assert wait_for(lambda: reports(1) >= 1 or job.poll() is not None, 240), lines[-20:]
        nodes.append(add_worker(head, num_cpus=1))
        added_at = time.time() - t0
        assert wait_for(lambda: reports(2) >= 3 or job.poll() is not None, 120), lines[-20:]
        kill_node(nodes[1].node_id)
        killed_at = time.time()
        nodes[1].stop()
        stdout, _ = job.communicate(timeout=300)
        assert job.returncode == 0, "\n".join(line for _, line in lines[-40:])
    finally:
        for node in nodes:
            node.stop()
        head.stop()
    summary = json.loads(stdout.strip().splitlines()[-1])
    attempts = summary["attempts"]
    worlds = [a["world_size"] for a in attempts]
    controller = sorted({f"t={t:5.1f}s {line[:200]}" for t, line in lines
                         if any(k in line for k in ("Deciding", "timed out", "workers=", "Error in", "Attempting"))})
    assert worlds[0] == 1 and 2 in worlds and worlds[-1] == 1, (attempts, controller)
    grown = worlds.index(2)
    assert summary["steps"] == steps and summary["global_batch"] == 8
    for a in attempts[1:]:  # continuous: every group resumes from a registered checkpoint of the run
        assert a["restored_step"] == a["start_step"] and a["start_step"] % every == 0, attempts
    shrink = attempts[-1]
    back_s = shrink["time"] + shrink["startup_s"] - killed_at
    lost_steps = [a["start_step"] for a in attempts]
    history = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
               if '"step"' in line]
    assert history == sorted(set(history)), "the report history repeats or skips steps"
    print(f"\nelastic training: node added at t={added_at:.0f}s -> group of 2 from step "
          f"{attempts[grown]['start_step']}; node killed -> group of 1 from step {shrink['start_step']} "
          f"(restored checkpoint), training again {back_s:.1f}s after the node loss; group starts at steps "
          f"{lost_steps}, world sizes {worlds}, {summary['steps']} steps, global batch {summary['global_batch']}")
    print(f"node killed at t={killed_at - t0:.1f}s; the controller and the groups:\n" + "\n".join(controller))


def test_storage_probe_names_the_node_that_cannot_see_the_output(tmp_path):
    """Two worker nodes; one has its own disk under the output folder (its own mount namespace, an
    empty tmpfs there). A label job whose outputs live in that folder fails before any work, in
    one line that names the node and the key. (A shared path passing the probe across nodes: the
    elastic training test, whose outputs are on the disk all nodes share.)"""
    from tests.cluster_box import add_worker, can_hide_folders

    if not can_hide_folders():
        pytest.skip("no mount namespaces here (needs root or CAP_SYS_ADMIN)")
    hidden = tmp_path / "node-local"
    hidden.mkdir()
    _write_images(tmp_path / "png", 4)
    head = start_box(autoscaling=False)
    nodes = []
    try:
        nodes.append(add_worker(head, num_cpus=1))
        nodes.append(add_worker(head, num_cpus=1, hide=str(hidden)))
        env = dict(head.env, RAY_ADDRESS=head.gcs_address)
        base = [sys.executable, str(REPO / "jobs" / "label.py"), "--input", str(tmp_path / "png"),
                "--set", "label.image_size=32", *RANDOM_TEACHERS]
        t0 = time.time()
        bad = subprocess.run([*base, "--output", str(hidden / "labels"), "--set", f"paths.root={hidden}"],
                             env=env, capture_output=True, text=True, timeout=120)
        bad_s = time.time() - t0
    finally:
        for node in nodes:
            node.stop()
        head.stop()
    assert bad.returncode == 2, bad.stderr[-3000:]
    error = [line for line in bad.stderr.splitlines() if line.startswith("config error:")]
    assert len(error) == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert f"paths.root='{hidden}' is not on storage every node sees" in error[0]
    assert nodes[1].node_id[:12] in error[0], (error[0], nodes[1].node_id)
    assert not list(hidden.glob(".must-ray-storage-probe-*")) and not (hidden / "labels").exists()
    print(f"\nstorage probe: refused in {bad_s:.1f}s: {error[0][:160]}...")
