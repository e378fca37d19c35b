"""Object storage for real: every step on ``s3://`` locations of an S3-compatible server on loopback
(moto's server mode, tests/s3_server.py, IAM auth on), configured only by the standard AWS
variables, with the real jobs, real Ray (the session's cluster, which never saw those variables:
the jobs forward them to their workers) and real Parquet.

* a folder labelled to ``s3://bucket/labels``, the driver SIGKILLed mid-run, the same command
  rerun -> one row per image, the shards committed before the kill never rewritten (the bucket is
  versioned: each of their part objects has exactly one version);
* an ``s3://`` image prefix labelled to ``s3://``; the student trained on that table with Ray
  Train's storage on ``s3://``, its worker killed -> the run restarts from its S3 checkpoint;
  evaluate and export read the ``s3://`` table;
* a wrong endpoint (nothing listening, a host that does not resolve), a missing bucket and
  refused credentials fail in seconds with one line naming the URI and the cause, before any work;
* which AWS variables a driver forwards to its workers.

About three minutes on two cores, most of it the jobs' start-up (config, Ray, actors importing torch).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from must_ray.object_store import check_object_store_locations, worker_env_vars
from must_ray.storage import RAY_JOB_CONFIG_ENV
from must_ray.typed_config import ConfigError
from tests.conftest import REPO
from tests.s3_server import free_port

pytestmark = pytest.mark.cluster

TASKS = ["classification", "detection", "segmentation", "depth", "normals"]
RANDOM = [f"label.teachers.{t}.kind=random" for t in TASKS]
N_IMAGES = 24
JOBS = REPO / "jobs"


@pytest.fixture(scope="module")
def world_png(tmp_path_factory):
    """A local folder of 24 small PNG files (random pixels: the random teachers label anything)."""
    folder = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"img-{i:03d}.png")
    return folder


def _env(ray_session, s3_server, **overrides: str) -> dict[str, str]:
    """A job's environment: the session's Ray, the S3 server's AWS variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.3", **s3_server.env(**overrides)}


def _sets(*overrides: str) -> list[str]:
    return [x for s in overrides for x in ("--set", s)]


def _label_args(tmp_path, inp: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, str(JOBS / "label.py"), "--input", inp, "--output", out,
            *_sets(f"paths.root={tmp_path}", "label.batch_size=2", *RANDOM, *extra)]


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _job(args: list[str], env: dict[str, str], cwd, timeout: float = 300) -> tuple[dict, float]:
    """Run a job to its end; ``(its JSON summary line, seconds)``."""
    t0 = time.time()
    proc = subprocess.run(args, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _summary(proc.stdout), time.time() - t0


def _parts(fs, bucket: str, folder: str) -> list[str]:
    info = fs.get_file_info(pafs.FileSelector(f"{bucket}/{folder}", allow_not_found=True))
    return sorted(i.base_name for i in info if i.base_name.startswith("part-") and i.type == pafs.FileType.File)


def test_label_folder_to_s3_killed_driver_rerun_gives_exactly_one_row_per_image(ray_session, s3_server, world_png,
                                                                                 tmp_path):
    """SIGKILL a real `jobs/label.py` writing to s3:// after some shards committed; the same
    command rerun skips them (never rewrites them) and ends with exactly one row per input."""
    s3_bucket = s3_server.create_bucket(versioned=True)  # each write of an object is a version
    out = f"s3://{s3_bucket}/labels"
    args = _label_args(tmp_path, str(world_png), out, "label.shard_size=2", "label.image_size=96")
    env = _env(ray_session, s3_server)
    fs = s3_server.filesystem()
    total = N_IMAGES // 2
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and len(_parts(fs, s3_bucket, "labels")) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, f"job ended before the kill: {proc.communicate()[1].decode()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    t_kill = time.time() - t0
    at_kill = len(_parts(fs, s3_bucket, "labels"))
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= at_kill < total, f"kill was not mid-run: {at_kill} of {total} shards committed"
    time.sleep(2)  # let the killed job's actor die (Ray tears down a dead driver's actors)
    committed = _parts(fs, s3_bucket, "labels")
    assert fs.get_file_info(f"{s3_bucket}/labels_manifest/SUCCESS.json").type == pafs.FileType.NotFound

    summary, _ = _job(args, env, tmp_path)
    assert summary["shards"] == total and summary["shards_skipped"] >= len(committed)
    assert summary["shards_skipped"] + summary["shards_labeled"] == total
    versions = s3_server.versions(s3_bucket, "labels/")
    for name in committed:  # finished work was not redone
        assert versions[f"labels/{name}"] == 1, f"{name} was rewritten ({versions[f'labels/{name}']} versions)"
    ids = pq.read_table(f"{s3_bucket}/labels", columns=["image_id"], filesystem=fs).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == N_IMAGES
    assert set(ids) == {str(p) for p in world_png.iterdir()}
    assert summary["rows"] == N_IMAGES and summary["quarantined"] == 0
    assert fs.get_file_info(f"{s3_bucket}/labels_manifest/SUCCESS.json").type == pafs.FileType.File
    print(f"\ns3 kill test: {at_kill}/{total} shards committed when killed ({len(committed)} before the rerun); "
          f"the rerun skipped {summary['shards_skipped']}, labelled {summary['shards_labeled']} in "
          f"{summary['wall_s']} s; killed after {t_kill:.1f} s", file=sys.stderr)


def _unusable_cases(tmp_path, s3_server, bucket: str) -> dict[str, tuple[list[str], dict[str, str], list[str]]]:
    """``{case: (job command, AWS variables changed, texts its one stderr line must hold)}``."""
    out = f"s3://{bucket}/labels"
    missing = "s3://no-such-bucket-for-must-ray"
    silent = f"http://127.0.0.1:{free_port()}"
    at_server = f"at {s3_server.endpoint} (AWS_ENDPOINT_URL)"
    label = _label_args(tmp_path, "world:unlabeled", out)
    return {
        "nothing listening": (label, {"AWS_ENDPOINT_URL": silent},
                              [f"label.output={out}", f"cannot reach the S3 endpoint {silent} (AWS_ENDPOINT_URL)",
                               "could not connect"]),
        "unresolvable host": (label, {"AWS_ENDPOINT_URL": "http://no-such-host.invalid:9000"},
                              [f"label.output={out}", "cannot reach the S3 endpoint http://no-such-host.invalid:9000",
                               "could not resolve"]),
        "missing bucket": (_label_args(tmp_path, "world:unlabeled", f"{missing}/labels"), {},
                           [f"label.output={missing}/labels",
                            f"bucket 'no-such-bucket-for-must-ray' does not exist {at_server}"]),
        "bad credentials": (label, {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
                            [f"label.output={out}", "refused the credentials", "ACCESS_DENIED",
                             "AWS_SECRET_ACCESS_KEY"]),
        "missing storage bucket": ([sys.executable, str(JOBS / "train_student.py"), "--data", out,
                                    *_sets(f"paths.root={tmp_path}",
                                           f"student.checkpoint.storage_path={missing}/ray_train")], {},
                                   [f"student.checkpoint.storage_path={missing}/ray_train", "does not exist"]),
    }


def test_unusable_object_store_fails_fast_with_one_line(ray_session, s3_server, s3_bucket, tmp_path):
    """Each way an s3:// location can be unusable (nothing listening at the endpoint, a host that
    does not resolve, a missing bucket for the labeller's output or the trainer's Ray Train
    storage, credentials the server refuses) ends the real job in seconds, before any work: exit
    code 2, one stderr line naming the key, the URI and the cause, no traceback, nothing written.
    The jobs run two at a time (each takes ~6 s, ~5 s of it loading the config)."""
    cases = _unusable_cases(tmp_path, s3_server, s3_bucket)
    pending = list(cases)
    running: dict[str, tuple[float, subprocess.Popen]] = {}
    while pending or running:
        while pending and len(running) < 2:  # two at a time: one per core
            case = pending.pop(0)
            args, overrides, _ = cases[case]
            env = _env(ray_session, s3_server, **overrides)
            t0 = time.time()
            proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            running[case] = (t0, proc)
        case = next(iter(running))
        t0, proc = running.pop(case)
        _, stderr = proc.communicate(timeout=120)
        elapsed = time.time() - t0
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, f"{case}: {stderr[-3000:]}"
        assert len(lines) == 1 and "Traceback" not in stderr, f"{case}: {stderr[-3000:]}"
        assert lines[0].startswith("config error: ")
        for text in cases[case][2]:
            assert text in lines[0], f"{case}: {lines[0]}"
        assert elapsed < 30, f"{case}: took {elapsed:.1f} s"
        print(f"\n{case}: {elapsed:.1f} s: {lines[0]}", file=sys.stderr)
    assert s3_server.versions(s3_bucket) == {}, "something was written before a job failed"


TRAIN_DRIVER = """
import json, sys
from must_ray.cli import init_ray
from must_ray.config import load_config
from must_ray.train.driver import train
from tests import faults

data, out, marker, *sets = sys.argv[1:]
cfg = load_config("jobs/configs/demo.yaml", sets)
init_ray(cfg)
faults.shippable()
kill = faults.ExitAfterStep(3, marker, delay_s=2.5)  # > two polls of Ray Train's controller: step 2 is registered
summary = train(cfg, "student", [data], out_dir=out, step_hooks=[kill])
print(json.dumps(summary, default=str))
"""

STUDENT = ["student.model.fpn_channels=16", "student.schedule.warmup_steps=2", "student.report_every_steps=1",
           "student.checkpoint.every_steps=2", "student.scaling.cpus_per_worker=0.8", "student.ema_decay=0.0",
           "student.checkpoint.max_failures=2", "student.scaling.num_workers=[1, 1]", "student.global_batch_size=8",
           "student.schedule.max_steps=5", "student.input.image_size=32", "student.checkpoint.run_name=s3-student"]


def test_s3_prefix_labelled_then_student_resumes_from_s3_checkpoint_then_evaluate_and_export(
        ray_session, s3_server, s3_bucket, world_png, tmp_path):
    """An s3:// image prefix labelled to s3://; the student trained on that table with Ray Train's
    storage on s3:// loses its worker after step 3 and restarts from the step-2 checkpoint it reads
    back from S3; evaluate and export read the s3:// table (in the driver: Ray Data's workers read
    it for training already)."""
    fs = s3_server.filesystem()
    for p in sorted(world_png.iterdir()):
        with fs.open_output_stream(f"{s3_bucket}/pool/{p.name}") as f:
            f.write(p.read_bytes())
    env = _env(ray_session, s3_server)
    labels = f"s3://{s3_bucket}/labels"
    summary, t_label = _job(_label_args(tmp_path, f"s3://{s3_bucket}/pool", labels, "label.shard_size=8",
                                        "label.image_size=32"), env, tmp_path)
    assert summary["rows"] == N_IMAGES and summary["shards"] == 3 and summary["input_kind"] == "files"
    ids = pq.read_table(f"{s3_bucket}/labels", columns=["image_id"], filesystem=fs).column("image_id").to_pylist()
    assert sorted(ids) == [f"s3://{s3_bucket}/pool/{p.name}" for p in sorted(world_png.iterdir())]

    storage = f"s3://{s3_bucket}/ray_train"
    marker = tmp_path / "fault.marker"
    first, t_train = _job([sys.executable, "-c", TRAIN_DRIVER, labels, str(tmp_path / "student"), str(marker),
                           f"paths.root={tmp_path}", f"student.checkpoint.storage_path={storage}", *STUDENT],
                          {**env, "PYTHONPATH": str(REPO)}, REPO, timeout=400)
    assert marker.exists(), "the fault was not injected"
    assert first["steps"] == 5 and first["tasks"] == TASKS
    assert [a["start_step"] for a in first["attempts"]] == [0, 2], first["attempts"]  # restored from S3
    assert first["storage_path"] == storage and first["experiment_dir"] == f"{storage}/s3-student"
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/ray_train/s3-student"))}
    assert "checkpoint_manager_snapshot.json" in names and any(n.startswith("checkpoint_step") for n in names)
    assert os.path.isfile(first["model"])

    reports = tmp_path / "reports"
    _, t_eval = _job([sys.executable, str(JOBS / "evaluate.py"), "--model", f"student={first['model']}",
                      "--data", labels, "--out", str(reports), "--no-pictures", "--no-ray",
                      *_sets(f"paths.root={tmp_path}")],
                     env, tmp_path)
    scored = json.loads((reports / "metrics.json").read_text())["models"]["student"]
    assert scored["tables"] == [labels] and scored["rows"] == N_IMAGES
    assert all(scored["tasks"][t]["labelled_rows"] == N_IMAGES for t in TASKS)

    export = tmp_path / "export"
    exported, t_export = _job([sys.executable, str(JOBS / "export_labels.py"), "--table", labels, "--format", "coco",
                               "--format", "topk-csv", "--out", str(export)], env, tmp_path)
    assert exported["images_exported"] == N_IMAGES
    assert len(json.loads((export / "coco.json").read_text())["images"]) == N_IMAGES
    assert len((export / "topk.csv").read_text().splitlines()) > N_IMAGES
    print(f"\ns3 chain: label {t_label:.1f} s, train {t_train:.1f} s, evaluate {t_eval:.1f} s, "
          f"export {t_export:.1f} s", file=sys.stderr)


def test_a_driver_forwards_its_aws_variables_but_not_those_its_submission_sets():
    """What a job joining a cluster adds to its runtime env: the AWS variables it has, except
    those ``ray job submit --runtime-env-json`` already sets (Ray refuses to merge two values)."""
    environ = {"AWS_ENDPOINT_URL": "http://s3:9000", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
               "AWS_REGION": "", "AWS_CA_BUNDLE": "/etc/ca.pem", "HOME": "/root"}
    assert worker_env_vars(environ) == {"AWS_ENDPOINT_URL": "http://s3:9000", "AWS_ACCESS_KEY_ID": "k",
                                        "AWS_SECRET_ACCESS_KEY": "s"}
    submitted = {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://s3:9000"}, "working_dir": "gcs://x.zip"}}
    environ[RAY_JOB_CONFIG_ENV] = json.dumps(submitted)
    assert worker_env_vars(environ) == {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}


def test_the_preflight_asks_for_the_bucket_only(s3_server, s3_bucket, monkeypatch):
    """A glob pyarrow cannot parse as a URI (brackets, spaces) passes: only its bucket is asked for;
    a local path or another scheme is not checked at all."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    check_object_store_locations([("label.input", f"s3://{s3_bucket}/pool/img[0-9] *.png"),
                                  ("--data", [f"s3://{s3_bucket}/labels", "/local/table", "gs://elsewhere/t"])])
    with pytest.raises(ConfigError, match=r"^--data=s3://no-such-bucket-for-must-ray/t: bucket .* does not exist"):
        check_object_store_locations([("--data", ["/local/table", "s3://no-such-bucket-for-must-ray/t"])])
