"""`ray job submit` end to end, and the metrics the jobs export (issue 6, parts 4 and 5).

One real Ray head for the module (tests/ray_head.py): loopback, token auth on, its own ports and
temp dir, a 1 s metrics report interval; it runs beside the session's local Ray and is stopped by
its own processes after the module.

One submission runs MuST steps 2 and 3 on a tiny synthetic pool, exactly as a user submits them
(`ray job submit --working-dir . --runtime-env-json ... -- bash -c 'python jobs/label.py ... &&
python jobs/train_student.py ...'`): five random-init teachers pseudo-label 64 images rendered on
the fly, then a student trains 20 steps on those labels. While it runs, a watcher scrapes the
node's Prometheus endpoint. The tests then check

* the job: the API refuses requests without the token, the job SUCCEEDED, the label table has
  one row per input at the absolute path given, the upload held the code only, and a second job
  with a relative `paths.root`, submitted alongside, failed before doing any work;
* the labeller's metrics (images labelled = inputs, shards committed, a latency histogram per
  teacher, the four shard stages);
* the trainer's metrics (per-task and total loss finite, equal to what the run reported, images/s
  > 0, seconds since the last checkpoint within the run, steps = the run's steps).

Offline checks of the working-dir excludes and of the relative-output refusal follow.
"""
from __future__ import annotations

import json
import math
import re
import secrets
import shlex
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from must_ray.table import validate_table
from must_ray.tasks import default_task_names
from tests.conftest import REPO
from tests.ray_head import RAY_BIN, MetricsWatcher

TASKS = list(default_task_names())
N_IMAGES = 64
SHARD = 16
STEPS = 20
RUNTIME_ENV = {"env_vars": {"OMP_NUM_THREADS": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.3"}}


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray head for this module's jobs; metrics reach the endpoint within ~1 s."""
    from tests.ray_head import start_head

    head = start_head(num_cpus=2, extra_env={"RAY_metrics_report_interval_ms": "1000"})
    yield head
    head.stop()


def _sets(*pairs: str) -> list[str]:
    return [x for s in pairs for x in ("--set", s)]


def label_command(root: Path, out: Path) -> list[str]:
    """64 world images rendered on the fly at 32 px, five random-init teachers."""
    return ["python", "jobs/label.py", "--input", "world:unlabeled", "--output", str(out), *_sets(
        f"paths.root={root}", f"world.splits.unlabeled.num={N_IMAGES}", "world.image_size=32",
        f"label.shard_size={SHARD}", f"label.batch_size={SHARD}", "label.actors=[1, 1]",
        "label.num_cpus_per_actor=1", "label.decode_num_cpus=0.5",
        *[f"label.teachers.{t}.kind=random" for t in TASKS])]


def student_command(root: Path, labels: Path, run: str) -> list[str]:
    """The student on those pseudo labels: every task, 20 steps, a report every 2 steps."""
    return ["python", "jobs/train_student.py", "--data", str(labels), "--out", str(root / "student"),
            "--steps", str(STEPS), "--run-name", run, "--batch-size", "16", *_sets(
                f"paths.root={root}", "world.image_size=32", "student.report_every_steps=2",
                "student.checkpoint.every_steps=10", "student.schedule.warmup_steps=2", "student.ema_decay=0.0",
                "student.model.fpn_channels=16", "student.scaling.cpus_per_worker=1",
                "student.input.read_cpus=0.25")]


def json_lines(text: str) -> list[dict]:
    """The JSON summary lines in a job's log (one per job script, in order)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def wait_for(predicate, timeout_s: float, interval_s: float = 0.3) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


@pytest.fixture(scope="module")
def must_job(ray_head, tmp_path_factory):
    """Submit the label + student job (and the relative-path job beside it), scraping the node's
    metrics endpoint throughout; everything the tests look at afterwards."""
    head = ray_head
    root = tmp_path_factory.mktemp("must_job")
    labels = root / "labels"
    tag = secrets.token_hex(3)
    job_id, bad_id, run = f"must-ray-{tag}", f"must-ray-relative-{tag}", f"student-{tag}"
    # a job with a relative paths.root (the demo config's out/demo) must fail before any work
    bad = subprocess.Popen([RAY_BIN, "job", "submit", "--no-wait", "--submission-id", bad_id, "--working-dir", ".",
                            "--", "python", "jobs/label.py"], cwd=str(REPO), env=head.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    command = f"{shlex.join(label_command(root, labels))} && {shlex.join(student_command(root, labels, run))}"
    t0 = time.time()
    with MetricsWatcher(head.metrics_url, interval_s=0.3) as watcher:
        # what a user types (cluster/README.md): the CLI uploads the working dir, streams the logs
        # and exits 0 iff the job SUCCEEDED
        submit = subprocess.run([RAY_BIN, "job", "submit", "--submission-id", job_id, "--working-dir", ".",
                                 "--runtime-env-json", json.dumps(RUNTIME_ENV), "--", "bash", "-c", command],
                                cwd=str(REPO), env=head.env, capture_output=True, text=True, timeout=400)
        job_s = time.time() - t0
        assert submit.returncode == 0, f"{submit.stdout[-5000:]}\n{submit.stderr[-3000:]}"
        # counters outlive their process, but the last increments reach the agent one report later
        wait_for(lambda: watcher.total("ray_must_ray_images_labeled_total", output=str(labels)) >= N_IMAGES
                 and watcher.total("ray_must_ray_train_steps_total", run=run) >= STEPS, 15)
    bad_out, _ = bad.communicate(timeout=120)
    return SimpleNamespace(head=head, root=root, labels=labels, job_id=job_id, bad_id=bad_id, run=run, t0=t0,
                           job_s=job_s, watcher=watcher, info=head.job(job_id), logs=head.job_logs(job_id),
                           bad_rc=bad.returncode, bad_out=bad_out)


def test_jobs_submitted_with_token_auth_succeed_and_write_their_outputs(must_job):
    head, job = must_job.head, must_job
    # token auth is on: the job API refuses a request without the token
    assert head.get(f"{head.dashboard_url}/api/jobs/", auth=False)[0] == 401
    assert head.get(f"{head.dashboard_url}/api/jobs/")[0] == 200
    assert job.info["status"] == "SUCCEEDED", job.info

    summaries = json_lines(job.logs)
    assert len(summaries) == 2, job.logs[-5000:]
    label_summary, student = summaries  # each job script's last stdout line
    # the label table, at the absolute path the job was given
    assert label_summary["output"] == str(job.labels)
    assert label_summary["rows"] == label_summary["inputs"] == N_IMAGES and label_summary["quarantined"] == 0
    table = pq.read_table(job.labels)
    assert table.num_rows == N_IMAGES and validate_table(table) == TASKS
    assert len(set(table.column("image_id").to_pylist())) == N_IMAGES
    assert len(list(job.labels.glob("part-*.parquet"))) == N_IMAGES // SHARD
    # the student, trained on them in the same job
    assert student["steps"] == STEPS and sorted(student["tasks"]) == sorted(TASKS), student
    assert Path(student["model"]).is_file() and str(job.root) in student["model"]

    # the upload was the code only: .rayignore / .gitignore / Ray's defaults kept .venv, out/, .git home
    pkgs = {p.resolve() for p in Path(head.temp_dir).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
            if p.is_dir()}
    assert pkgs, "no unpacked working dir found"
    for pkg in pkgs:
        names = {p.name for p in pkg.iterdir()}
        assert {"jobs", "must_ray"} <= names and not names & {".venv", ".git", "out", ".pytest_cache"}, names
        size = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
        assert size < 20 * 2**20, f"working dir upload of {size / 2**20:.1f} MiB"

    # the relative-path job failed with the config error, before any work
    assert job.bad_rc == 0, job.bad_out[-3000:]
    assert wait_for(lambda: head.job(job.bad_id)["status"] == "FAILED", 60), head.job(job.bad_id)
    bad_logs = head.job_logs(job.bad_id)
    assert "config error: paths.root='out/demo' is a relative path" in bad_logs, bad_logs[-3000:]
    print(f"\njob {job.job_id}: {job.info['status']}; label rows={table.num_rows} of {label_summary['inputs']} "
          f"inputs; student {student['steps']} steps; submit->done {job.job_s:.1f}s (job started after "
          f"{job.info['start_time'] / 1000 - job.t0:.1f}s, label driver {label_summary['wall_s']}s, actor start-up "
          f"{label_summary.get('actor_start_s')}s, student driver {student['wall_s']}s, fit {student['fit_s']}s); "
          f"head start-up {head.startup_s:.1f}s; relative-path job: {head.job(job.bad_id)['status']}")


def test_labelling_metrics_on_the_prometheus_endpoint(must_job):
    w, out = must_job.watcher, str(must_job.labels)
    labeled = "ray_must_ray_images_labeled_total"
    assert w.total(labeled, output=out) == N_IMAGES
    assert w.total("ray_must_ray_label_shards_committed_total", output=out) == N_IMAGES // SHARD
    assert not w.series("ray_must_ray_images_quarantined_total", output=out)  # nothing was quarantined
    latency = {dict(k[1])["teacher"]: v for k, v in w.series("ray_must_ray_teacher_batch_latency_s_count").items()}
    assert len(latency) == len(TASKS) and all(v == N_IMAGES // SHARD for v in latency.values()), latency
    lat_sum = {dict(k[1])["teacher"]: v for k, v in w.series("ray_must_ray_teacher_batch_latency_s_sum").items()}
    assert all(v > 0 for v in lat_sum.values()), lat_sum
    stages = {dict(k[1])["stage"] for k in w.series("ray_must_ray_label_shard_s_count")}
    assert stages == {"decode", "teachers", "encode", "write"}
    print(f"\n{labeled}={w.total(labeled, output=out):g}; shards_committed="
          f"{w.total('ray_must_ray_label_shards_committed_total', output=out):g}; teacher_batch_latency_s_count={latency}; "
          f"mean latency s={ {t: round(lat_sum[t] / latency[t], 3) for t in latency} }")


def test_training_metrics_on_the_prometheus_endpoint_while_it_runs(must_job):
    w, run, root = must_job.watcher, must_job.run, must_job.root
    task_loss = {dict(k[1])["task"]: v for k, v in w.series("ray_must_ray_train_task_loss", run=run, role="student").items()}
    loss = w.series("ray_must_ray_train_loss", run=run)
    speed = w.series("ray_must_ray_train_images_per_s", run=run)
    since = w.series("ray_must_ray_train_seconds_since_checkpoint", run=run)
    ckpt_time = w.series("ray_must_ray_train_last_checkpoint_time_s", run=run)
    wait = w.series("ray_must_ray_train_data_wait_frac", run=run)
    assert task_loss and loss and speed and since and ckpt_time and wait, \
        f"training gauges not seen in {w.scrapes} scrapes: {sorted({k[0] for k in w.last})}"
    assert sorted(task_loss) == sorted(TASKS)
    assert all(math.isfinite(v) and v >= 0 for v in task_loss.values()) and sum(task_loss.values()) > 0, task_loss
    assert all(math.isfinite(v) and v > 0 for v in loss.values()), loss
    assert all(v > 0 for v in speed.values()), speed
    assert all(0 <= v < must_job.job_s for v in since.values()), since
    assert all(must_job.t0 <= v <= time.time() for v in ckpt_time.values()), ckpt_time
    assert all(0 <= v <= 1 for v in wait.values()), wait
    assert w.total("ray_must_ray_train_steps_total", run=run) == STEPS
    # the last losses the endpoint showed are ones the run reported (metrics.jsonl: same window means)
    history = [json.loads(line) for line in (root / "student" / "metrics.jsonl").read_text().splitlines()]
    for task, value in task_loss.items():
        reported = {round(m[f"loss_{task}"], 6) for m in history if m.get(f"loss_{task}") is not None}
        assert round(value, 6) in reported, (task, value, reported)
    assert any(round(v, 6) == round(m["loss"], 6) for v in loss.values() for m in history)
    print(f"\nrun {run}, {w.scrapes} scrapes: task_loss={ {t: round(v, 4) for t, v in task_loss.items()} }; "
          + "; ".join(f"{k[0]}={v:.4g} (max seen {w.max[k]:.4g})" for k, v in sorted(w.last.items())
                      if dict(k[1]).get("run") == run and k[0] != "ray_must_ray_train_task_loss")
          + f"; labels of a series: {sorted(dict(next(iter(loss))[1]))}")


# ----------------------------------------------------------------------------- offline


def test_rayignore_keeps_environments_and_outputs_out_of_the_upload():
    """Ray's own ignore-file matcher on this repository, with .gitignore switched off
    (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1): .rayignore alone keeps the heavy paths home."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    excludes = get_excludes_from_ignore_files(REPO, include_gitignore=False)
    assert excludes, ".rayignore missing"
    for path in (".venv/lib/python3.11", ".git/objects", "out/demo/labels", "runs/x", "must_ray/__pycache__/a.pyc",
                 "must_ray.egg-info/PKG-INFO", ".pytest_cache/v"):
        assert any(e(REPO / path) for e in excludes), f"{path} would be uploaded"
    for path in ("must_ray/cli.py", "jobs/label.py", "jobs/configs/demo.yaml", "cluster/README.md", "tests/ray_head.py"):
        assert not any(e(REPO / path) for e in excludes), f"{path} would not be uploaded"


def test_relative_outputs_are_refused_only_in_a_job_with_a_working_dir():
    from must_ray.config import load_config
    from must_ray.storage import ALLOW_LOCAL_ENV, RAY_JOB_CONFIG_ENV, check_job_output_paths, job_output_locations
    from must_ray.typed_config import ConfigError

    job = {RAY_JOB_CONFIG_ENV: json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0.zip"}, "metadata": {}})}
    demo = REPO / "jobs" / "configs" / "demo.yaml"
    relative = job_output_locations(load_config(demo))  # paths.root: out/demo
    check_job_output_paths(relative, {})  # a laptop run: relative is fine
    no_wd = {RAY_JOB_CONFIG_ENV: json.dumps({"runtime_env": {}, "metadata": {}})}
    check_job_output_paths(relative, no_wd)  # a job without a working dir runs in the submitter's cwd
    with pytest.raises(ConfigError, match=r"paths.root='out/demo' is a relative path.*--set paths.root=/"):
        check_job_output_paths(relative, job)
    check_job_output_paths(relative, {**job, ALLOW_LOCAL_ENV: "1"})
    ok = load_config(demo, ["paths.root=/mnt/shared/run1", "label.output=s3://bucket/labels"])
    check_job_output_paths(job_output_locations(ok) + [("--out", "/abs/teacher")], job)
    for key, cfg_sets, extra in (("label.output", ["paths.root=/abs", "label.output=labels"], []),
                                 ("student.checkpoint.storage_path",
                                  ["paths.root=/abs", "student.checkpoint.storage_path=rr"], []),
                                 ("--out", ["paths.root=/abs"], [("--out", "teacher")])):
        with pytest.raises(ConfigError, match=re.escape(key)):
            check_job_output_paths(job_output_locations(load_config(demo, cfg_sets)) + extra, job)


def test_job_config_checks_the_outputs_the_job_writes(monkeypatch):
    """load_job_config in a submitted job: paths.root counts unless an explicit --out/--output
    names the output (the README's `make_world.py --out /tmp/test_table` must pass)."""
    from must_ray.cli import job_parser, load_job_config
    from must_ray.storage import RAY_JOB_CONFIG_ENV
    from must_ray.typed_config import ConfigError

    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0.zip"}}))
    parser = job_parser("test")
    parser.add_argument("--out")
    parser.add_argument("--image-dir")
    load_job_config(parser.parse_args(["--out", "/tmp/test_table"]))  # paths.root (out/demo) unused
    load_job_config(parser.parse_args(["--set", "paths.root=/abs/run"]))
    with pytest.raises(ConfigError, match="paths.root='out/demo'"):
        load_job_config(parser.parse_args([]))
    with pytest.raises(ConfigError, match="--image-dir='png'"):
        load_job_config(parser.parse_args(["--out", "/abs/t", "--image-dir", "png"]))
    # the trainers' checkpoint storage defaults to <--out>/ray_train; an explicit URI stays as given
    from must_ray.config import load_config
    from must_ray.train.driver import default_storage_path

    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml")
    assert default_storage_path(cfg.teacher, "/abs/t") == "/abs/t/ray_train"
    assert default_storage_path(cfg.teacher, "s3://b/t/") == "s3://b/t/ray_train"
    s3 = load_config(REPO / "jobs" / "configs" / "demo.yaml", ["teacher.checkpoint.storage_path=s3://b/ckpt"])
    assert default_storage_path(s3.teacher, "/abs/t") == "s3://b/ckpt"
