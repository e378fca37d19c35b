"""Experiments (``jobs/experiment.py``, ``must_ray/experiment.py``): the seed renders the world,
trains the teachers and labels the pool once; each arm starts from a copy of it and redoes only what
its keys change (``rounds: 2``: the student, then the round-1 student relabels the pool and a
fresh student learns from it; a pool size: the pool and its labels, no teacher); the shared
teacher's transfer row is probed once; a rerun skips every finished arm; the results table holds
every arm."""
import hashlib
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from must_ray.experiment import (
    arm_config,
    load_experiment,
    plot_results,
    report_experiment,
    run_experiment,
    seed_arm,
    seed_config,
)
from must_ray.table import read_provenance
from must_ray.typed_config import ConfigError
from tests.conftest import REPO

TINY = {
    "label.tasks": ["depth"], "world.image_size": 32, "world.splits.teacher_depth.num": 16,
    "world.splits.unlabeled.num": 16, "world.splits.test.num": 16, "label.teachers.classification.input_size": 32,
    "teacher.schedule.max_steps": 3, "teacher.schedule.warmup_steps": 1, "teacher.global_batch_size": 8,
    "student.schedule.max_steps": 3, "student.schedule.warmup_steps": 1, "student.global_batch_size": 8,
    "teacher.model.fpn_channels": 16, "student.model.fpn_channels": 16, "teacher.report_every_steps": 1,
    "student.report_every_steps": 1, "teacher.scaling.cpus_per_worker": 0.8, "student.scaling.cpus_per_worker": 0.8,
    "transfer.train_num": 16, "transfer.test_num": 16, "label.shard_size": 8, "label.actors": [1, 1],
    "label.num_cpus_per_actor": 0.5,
}


def _experiment(tmp_path, arms):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "title": "a tiny experiment", "config": str(REPO / "jobs" / "configs" / "demo.yaml"),
        "seed_root": str(tmp_path / "seed"), "root": str(tmp_path / "exp"), "x": "world.splits.unlabeled.num",
        "set": {**TINY, "transfer.cache_dir": str(tmp_path / "transfer-cache")}, "arms": arms}))
    return str(path)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def tiny_experiment(ray_session, tmp_path_factory):
    """One tiny experiment run (seed + three arms), shared by the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("experiment")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.3")
    depth_teacher = str(tmp_path / "seed" / "teachers" / "depth" / "model.pt")
    spec, base = load_experiment(_experiment(tmp_path, {
        "pool": {"world.splits.unlabeled.num": 24}, "rounds2": {"rounds": 2},
        "features": {"label.tasks": ["depth", "features"], "tasks.features.stride": 8,
                     "label.teachers.features": {"kind": "backbone", "path": depth_teacher}}}))
    try:
        yield spec, base, run_experiment(spec, base), tmp_path
    finally:
        mp.undo()


def test_arms_start_from_the_seed_and_redo_only_what_their_keys_change(tiny_experiment):
    spec, base, first, tmp_path = tiny_experiment
    assert first["seed"]["ran"] == ["world", "teachers", "label"]
    assert first["arms"]["rounds2"]["ran"] == ["student", "label_r2", "student_r2", "evaluate", "transfer"]
    rounds = tmp_path / "exp" / "rounds2"
    teachers = read_provenance(str(rounds / "labels_r2"))["teachers"]
    assert [t["sha256"] for t in teachers] == [_sha(rounds / "student" / "model.pt")]  # one forward, every task
    assert teachers[0]["tasks"] == ["depth"] and pq.read_table(rounds / "labels_r2").num_rows == 16
    scored = json.loads((rounds / "reports" / "metrics.json").read_text())["models"]["student"]
    assert scored["sha256"] == _sha(rounds / "student_r2" / "model.pt") != _sha(rounds / "student" / "model.pt")
    assert first["arms"]["pool"]["ran"] == ["world", "teachers", "label", "student", "evaluate", "transfer"]
    pool_world = json.loads((tmp_path / "exp" / "pool" / "_pipeline" / "world.json").read_text())["summary"]
    assert [n for n, s in pool_world["splits"].items() if "skipped" not in s] == ["unlabeled"]
    teacher = json.loads((tmp_path / "exp" / "pool" / "_pipeline" / "teachers.json").read_text())["summary"]
    assert teacher["depth"]["skipped"] == "up to date"
    seed_model = tmp_path / "seed" / "teachers" / "depth" / "model.pt"
    assert _sha(tmp_path / "exp" / "pool" / "teachers" / "depth" / "model.pt") == _sha(seed_model)
    assert not (rounds / "teachers" / "depth" / "ray_train").exists()
    assert pq.read_table(tmp_path / "exp" / "pool" / "labels").num_rows == 24
    assert pq.read_table(rounds / "labels").num_rows == 16

    results = json.loads(open(first["files"]["results_json"]).read())["arms"]
    assert sorted(results) == ["features", "pool", "rounds2"]
    assert results["pool"]["x"] == 24 and results["rounds2"]["x"] == 16
    depth = {arm: r["tasks"]["depth"] for arm, r in results.items() if arm != "features"}
    assert all(d["metric"] == "abs_rel" and d["ratio"] == pytest.approx(d["student"] / d["teacher"])
               for d in depth.values())
    assert len({d["teacher"] for d in depth.values()}) == 1  # one teacher, shared
    assert depth["rounds2"]["student"] != depth["pool"]["student"]
    assert results["rounds2"]["transfer"]["depth"]["student"] is not None
    transfer = json.loads((rounds / "reports" / "transfer.json").read_text())["rows"]  # the second arm
    assert {r["backbone"]: r["cached"] for r in transfer} == {"student": False, "teacher_depth": True, "random": True}
    table = open(first["files"]["results_md"]).read()
    assert "| rounds2 |" in table and "| pool |" in table and "| teacher |" in table
    assert open(first["files"]["results_png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    again = run_experiment(spec, base, arms=["pool"])
    assert again["seed"]["ran"] == [] and again["arms"] == {"pool": {"ran": [], "skipped": [
        "world", "teachers", "label", "student", "evaluate", "transfer"]}}
    assert sorted(json.loads(open(again["files"]["results_json"]).read())["arms"]) == ["features", "pool", "rounds2"]
    reported, files = report_experiment(spec, base)  # --report-only: no step runs
    assert reported == results and files["results_md"] == first["files"]["results_md"]


def test_a_features_arm_distils_the_named_backbone_and_trains_no_teacher_for_it(tiny_experiment):
    import numpy as np
    import torch

    from must_ray.images import decode_image_rgb
    from must_ray.models import images_to_tensor, load_model
    from must_ray.models.precision import autocast, resolve_precision
    from must_ray.table import decode_column
    from must_ray.tasks import build_task

    spec, base, first, tmp_path = tiny_experiment
    arm = tmp_path / "exp" / "features"
    assert first["arms"]["features"]["ran"] == ["label", "student", "evaluate", "transfer"]
    assert not (arm / "teachers" / "features").exists()
    teachers = {tuple(t["tasks"]): t for t in read_provenance(str(arm / "labels"))["teachers"]}
    depth_teacher = tmp_path / "seed" / "teachers" / "depth" / "model.pt"
    assert teachers[("features",)]["kind"] == "backbone" and teachers[("features",)]["sha256"] == _sha(depth_teacher)

    cfg = arm_config(spec, base, "features")
    table = pq.read_table(arm / "labels").sort_by("image_id")
    assert table.column("features_map").null_count == 0 and table.num_rows == 16
    task = build_task("features", 1, cfg.tasks["features"])
    labels = decode_column(task, table)
    assert {lab.shape for lab in labels} == {(4, 4, 64)}  # 32-pixel images at stride 8, dim 64
    images = np.stack([decode_image_rgb(b) for b in table.column("image").to_pylist()])
    backbone = load_model(str(depth_teacher))[0].backbone
    level = list(backbone.feature_info.reduction()).index(8)
    with torch.inference_mode():
        with autocast(resolve_precision(cfg.label.precision, "cpu"), "cpu"):
            feats = backbone(images_to_tensor(images))[level]
        direct = task.teacher_labels(feats.float(), images.shape[1:3])
    for lab, want in zip(labels, direct):
        assert np.abs(lab - want).mean() < 0.05 and np.allclose(lab.mean(-1), 0, atol=0.02)

    student, _ = load_model(str(arm / "student" / "model.pt"))
    assert set(student.heads) == {"depth", "features"} and student.heads["features"].pred.out_channels == 64
    rounds_student = tmp_path / "exp" / "rounds2" / "student" / "model.pt"  # the same recipe without features
    assert "features" not in load_model(str(rounds_student))[0].heads


def test_a_bad_experiment_file_is_one_line_before_ray_starts(tmp_path):
    out = subprocess.run([sys.executable, "jobs/experiment.py", str(tmp_path / "nope.yaml")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"config error: experiment file not found: {tmp_path / 'nope.yaml'}"]

    (tmp_path / "bad.yaml").write_text("name: x\nconfig: ../nope.yaml\nseed_root: s\narms: {a: {}}\n")
    with pytest.raises(ConfigError, match="config: base config not found"):
        load_experiment(str(tmp_path / "bad.yaml"))
    (tmp_path / "noarms.yaml").write_text("name: x\nconfig: x\nseed_root: s\n")
    with pytest.raises(ConfigError, match="arms: missing"):
        load_experiment(str(tmp_path / "noarms.yaml"))
    spec, base = load_experiment(_experiment(tmp_path, {"a": {"student.optimizer.nope": 1},
                                                        "b": {"paths.labels": "/elsewhere"}}))
    with pytest.raises(ConfigError, match="student.optimizer.nope: unknown key"):
        arm_config(spec, base, "a")
    with pytest.raises(ConfigError, match="arms.b: paths.labels='/elsewhere'"):
        arm_config(spec, base, "b")
    with pytest.raises(ConfigError, match="--arm c: no such arm; arms: a, b"):
        arm_config(spec, base, "c")


def test_an_arm_copies_the_labels_with_their_manifest_and_quarantine_once(tmp_path):
    spec, base = load_experiment(_experiment(tmp_path, {"a": {"student.schedule.max_steps": 2}}))
    seed, arm = seed_config(spec, base), arm_config(spec, base, "a")
    files = {"labels/part-000000.parquet": b"p", "labels_manifest/SUCCESS.json": b"{}",
             "labels_quarantine/quarantine-000000.parquet": b"q", "teachers/depth/model.pt": b"m",
             "teachers/depth/ray_train/checkpoint": b"c", "world/test/part-0.parquet": b"w",
             "_pipeline/label.json": b"{}", "_pipeline/world/test.json": b"{}"}
    for name, data in files.items():
        (tmp_path / "seed" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "seed" / name).write_bytes(data)
    assert seed_arm(seed, arm)
    copied = tmp_path / "exp" / "a"
    assert {n: (copied / n).read_bytes() for n in files if "ray_train" not in n} == {
        n: d for n, d in files.items() if "ray_train" not in n}
    assert not (copied / "teachers" / "depth" / "ray_train").exists()
    (copied / "labels" / "part-000000.parquet").write_bytes(b"the arm's own")
    assert not seed_arm(seed, arm) and (copied / "labels" / "part-000000.parquet").read_bytes() == b"the arm's own"


def test_the_plot_takes_arms_that_share_an_x(tmp_path):
    spec, _ = load_experiment(_experiment(tmp_path, {"a": {}, "b": {}}))
    def arm(student):
        return {"x": 16, "tasks": {"depth": {"metric": "abs_rel", "student": student, "teacher": 0.2,
                                             "ratio": student / 0.2, "higher_is_better": False}}}

    plot_results(spec, {"a": arm(0.2), "b": arm(0.3)}, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
