"""Evaluation (Ray Data + local), the perfect-prediction check, compare(), strict metrics.json,
transfer probes and the evaluate job."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from must_ray.config import EvalConfig, SplitConfig, TransferConfig
from must_ray.evaluate.compare import compare, comparison_passed, passes, write_metrics
from must_ray.evaluate.scoring import (
    BatchScorer,
    compute_metrics,
    evaluate_model,
    evaluate_models,
    merge_states,
    score_batch,
)
from must_ray.io import strict_json
from must_ray.models import MultiTaskModel, images_to_tensor, save_model
from must_ray.table import decode_column, examples_schema, iter_table_batches
from must_ray.tasks import build_tasks, default_task_names
from must_ray.world import CATEGORIES, NUM_CATEGORIES
from must_ray.world.splits import RenderBatch, split_provenance
from tests.conftest import REPO

ALL = list(default_task_names())


def _no_constants(text: str):
    """json.loads that rejects NaN/Infinity (strict JSON)."""
    def bad(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=bad)


def write_world_table(cfg, out_dir, name: str, num: int, tasks, domain="default", seed_offset=900_000,
                      rows_per_file=None):
    """A world split written straight to Parquet (no Ray: fast fixtures), ``rows_per_file`` per file."""
    split = SplitConfig(num=num, seed_offset=seed_offset, tasks=list(tasks), domain=domain)
    table = RenderBatch(cfg.world, split, cfg.tasks)({"id": np.arange(num)})
    schema = examples_schema(split.tasks, split_provenance(cfg.world, name, split))
    table = table.cast(schema)
    out_dir.mkdir(parents=True, exist_ok=True)
    per = rows_per_file or num
    for i in range(0, num, per):
        pq.write_table(table.slice(i, per), out_dir / f"{name}-{i // per:05d}.parquet")
    return str(out_dir)


@pytest.fixture(scope="module")
def world_table(demo_config, tmp_path_factory):
    """24 test scenes with all five tasks, in two files of 12 rows."""
    return write_world_table(demo_config, tmp_path_factory.mktemp("eval") / "test", "test", 24, ALL, rows_per_file=12)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    torch.manual_seed(0)
    model = MultiTaskModel("test_resnet", build_tasks(ALL, NUM_CATEGORIES), fpn_channels=16).eval()
    path = tmp_path_factory.mktemp("models") / "student" / "model.pt"
    return save_model(str(path), model, num_classes=NUM_CATEGORIES, task_cfgs={}, classes=list(CATEGORIES),
                      fpn_channels=16)


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    torch.manual_seed(1)
    model = MultiTaskModel("test_resnet", build_tasks(["depth"], NUM_CATEGORIES), fpn_channels=16).eval()
    path = tmp_path_factory.mktemp("models") / "teacher_depth" / "model.pt"
    return save_model(str(path), model, num_classes=NUM_CATEGORIES, task_cfgs={}, classes=list(CATEGORIES),
                      fpn_channels=16)


# ----------------------------------------------------------------------------- evaluate_model


def test_random_model_ray_and_local_agree_exactly(ray_session, world_table, random_model):
    ray_res = evaluate_model(random_model, world_table, EvalConfig(batch_size=4, use_ray=True, actors=[1, 1]))
    local = evaluate_model(random_model, world_table, EvalConfig(batch_size=4, use_ray=False))
    assert set(ray_res["tasks"]) == set(ALL) and ray_res["rows"] == local["rows"] == 24
    for t in ALL:
        e = ray_res["tasks"][t]
        assert e["metrics"] == local["tasks"][t]["metrics"], t  # same batches, same merge order: identical
        assert e["trivial"] == local["tasks"][t]["trivial"], t
        assert all(math.isfinite(v) for v in e["metrics"].values()), (t, e["metrics"])
        assert e["labelled_rows"] == 24 and isinstance(e["beats_trivial"], bool)
        assert e["value"] == e["metrics"][e["primary_metric"]]
    assert ray_res["trivial_fit"]["classification"] == {"rows": 24, "mode": "constant"}
    # the trivial baselines are what they say: no boxes -> mAP 0, majority class <= 1
    assert ray_res["tasks"]["detection"]["trivial_value"] == 0.0
    assert 0 < ray_res["tasks"]["classification"]["trivial_value"] <= 1


def test_several_models_in_one_pass_match_single_runs(world_table, random_model, depth_model):
    both = evaluate_models({"student": random_model, "teacher_depth": depth_model}, world_table,
                           EvalConfig(batch_size=12, use_ray=False))
    single = evaluate_model(depth_model, world_table, EvalConfig(batch_size=12, use_ray=False))
    assert list(both["teacher_depth"]["tasks"]) == ["depth"]
    assert both["teacher_depth"]["tasks"]["depth"]["metrics"] == single["tasks"]["depth"]["metrics"]
    assert set(both["teacher_depth"]["skipped"]) == set(ALL) - {"depth"}
    # restricting tasks
    only = evaluate_model(random_model, world_table, EvalConfig(tasks=["segmentation"], batch_size=12, use_ray=False))
    assert list(only["tasks"]) == ["segmentation"]


class OracleScorer(BatchScorer):
    """A "model" whose predictions are the ground truth (deep copies), through the real scorer."""

    def predict(self, name, images, gts):
        return {t: copy.deepcopy(gts[t]) for t in self.models[name][2]}


PERFECT = {"classification": {"top1": 1.0, "top5": 1.0}, "detection": {"map50": 1.0, "map": 1.0, "map75": 1.0},
           "segmentation": {"miou": 1.0, "pixel_acc": 1.0}, "depth": {"abs_rel": 0.0, "rmse": 0.0, "delta1": 1.0},
           "normals": {"mean_angle": 0.0, "within_11_25": 100.0}}


def _assert_perfect(metrics):
    for t, expected in PERFECT.items():
        for k, v in expected.items():
            assert metrics[t][k] == pytest.approx(v, abs=1e-9), (t, k, metrics[t])


def test_perfect_predictions_give_perfect_metrics(world_table, random_model):
    # (a) at the merging level: predictions = ground truth through score_batch + merge_states
    tasks = build_tasks(ALL, NUM_CATEGORIES)
    fields = [f for t in tasks.values() for f in t.columns()]
    per_batch = []
    for batch in iter_table_batches([world_table], ["image_id"] + [f.name for f in fields], 5):
        gts = {t: decode_column(task, batch) for t, task in tasks.items()}
        per_batch.append((min(batch.column("image_id").to_pylist()), score_batch(tasks, copy.deepcopy(gts), gts)))
    assert len(per_batch) == 6  # 12-row files in batches of 5: 5, 5, 2 per file
    _assert_perfect(compute_metrics(tasks, merge_states(tasks, per_batch)))
    # (b) the whole evaluation path with an oracle scorer
    res = evaluate_model(random_model, world_table, EvalConfig(batch_size=5, use_ray=False), scorer=OracleScorer)
    _assert_perfect({t: e["metrics"] for t, e in res["tasks"].items()})
    assert all(e["beats_trivial"] for e in res["tasks"].values())


def test_bad_inputs_are_rejected(world_table, random_model, tmp_path, demo_config):
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate_model(random_model, world_table, EvalConfig(tasks=["colour"], use_ray=False))
    seg_only = write_world_table(demo_config, tmp_path / "seg", "teacher_segmentation", 4, ["segmentation"])
    depth_model_only = MultiTaskModel("test_resnet", build_tasks(["depth"], NUM_CATEGORIES), fpn_channels=16)
    p = save_model(str(tmp_path / "d.pt"), depth_model_only, num_classes=NUM_CATEGORIES, task_cfgs={},
                   classes=list(CATEGORIES), fpn_channels=16)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_model(p, seg_only, EvalConfig(use_ray=False))
    wrong = save_model(str(tmp_path / "w.pt"), depth_model_only, num_classes=NUM_CATEGORIES, task_cfgs={},
                       classes=list("abcde"), fpn_channels=16)
    with pytest.raises(ValueError, match="classes"):
        evaluate_model(wrong, world_table, EvalConfig(use_ray=False))


# ----------------------------------------------------------------------------- compare / metrics.json


def _entry(value, hib, trivial=None):
    return {"primary_metric": "m", "higher_is_better": hib, "value": value, "trivial_value": trivial,
            "beats_trivial": trivial is not None and (value > trivial if hib else value < trivial)}


def test_compare_pass_fail_both_directions():
    student = {"tasks": {"classification": _entry(0.491, True, 0.2), "segmentation": _entry(0.489, True, 0.1),
                         "depth": _entry(0.2039, False, 0.5), "normals": _entry(0.2041, False, 0.5),
                         "detection": _entry(0.9, True, 0.0)}}
    teachers = {"classification": {"tasks": {"classification": _entry(0.5, True)}},
                "segmentation": {"tasks": {"segmentation": _entry(0.5, True)}},
                "depth": {"tasks": {"depth": _entry(0.2, False)}},
                "normals": {"tasks": {"normals": _entry(0.2, False)}},
                "detection": {"tasks": {"detection": _entry(0.5, True)}}}
    rows = {r["task"]: r for r in compare(student, teachers)}
    assert rows["classification"]["pass"] and not rows["segmentation"]["pass"]
    assert rows["depth"]["pass"] and not rows["normals"]["pass"]
    assert rows["detection"]["pass"] and rows["detection"]["ratio"] == pytest.approx(1.8)
    assert rows["depth"]["direction"] == "lower" and rows["depth"]["criterion"] == "<= 1.02 x teacher"
    assert rows["classification"]["criterion"] == ">= 0.98 x teacher"
    assert rows["depth"]["ratio"] == pytest.approx(1.0195)
    assert list(rows) == ALL  # canonical task order
    assert not comparison_passed(list(rows.values()))
    assert comparison_passed([rows["classification"], rows["depth"]])
    assert not comparison_passed([])
    # edge cases: inf teacher error is beaten; NaN never passes; a missing task fails with a note
    assert passes(0.3, math.inf, False) and not passes(math.inf, math.inf, False)
    assert not passes(math.nan, 0.2, False) and not passes(0.5, math.nan, True)
    assert passes(0.0, 0.0, True) and passes(0.0, 0.0, False)
    missing = compare({"tasks": {}}, {"depth": {"tasks": {"depth": _entry(0.2, False)}}})
    assert not missing[0]["pass"] and "student" in missing[0]["note"]
    # a strict-JSON round trip (None = inf) still compares
    assert compare({"tasks": {"depth": _entry(None, False)}}, {"depth": {"tasks": {"depth": _entry(0.2, False)}}})[0][
        "pass"] is False


def test_metrics_json_is_strict(tmp_path):
    res = {"student": {"model": "m.pt", "tables": ["t"], "rows": 0, "tasks": {
        "depth": {"primary_metric": "abs_rel", "higher_is_better": False, "value": math.inf, "trivial_value": math.nan,
                  "beats_trivial": False, "labelled_rows": 0, "metrics": {"abs_rel": math.inf, "rmse": math.inf},
                  "trivial": {"abs_rel": math.nan}}}, "skipped": {}}}
    rows = compare(res["student"], {"depth": res["student"]})
    files = write_metrics(str(tmp_path), res, rows, extra={"n": np.int64(3), "x": np.float32(0.5)})
    data = _no_constants(open(files["metrics_json"]).read())
    assert data["models"]["student"]["tasks"]["depth"]["value"] is None
    assert data["models"]["student"]["tasks"]["depth"]["metrics"]["rmse"] is None
    assert data["passed"] is False and data["n"] == 3 and data["x"] == 0.5
    md = open(files["metrics_md"]).read()
    assert "| depth | **abs_rel** (ratio) | inf |" in md and "FAIL" in md
    assert strict_json({"a": [float("-inf"), np.float64(1.5)]}) == {"a": [None, 1.5]}


# ----------------------------------------------------------------------------- transfer


def test_transfer_table_random_vs_pretrained_backbone(demo_config, tmp_path):
    from must_ray.evaluate.transfer import beats_all, transfer_evaluate, transfer_markdown, write_transfer

    probe_tasks = ["classification", "segmentation", "depth", "normals"]
    train = write_world_table(demo_config, tmp_path / "tr", "transfer_train", 32, probe_tasks, "cluttered", 700_000)
    test = write_world_table(demo_config, tmp_path / "te", "transfer_test", 16, probe_tasks, "cluttered", 750_000)
    # pre-train a backbone on depth (default domain) for a few steps
    from must_ray.world import render_scenes

    torch.manual_seed(0)
    tasks = build_tasks(["depth"], NUM_CATEGORIES)
    model = MultiTaskModel("test_resnet", tasks, fpn_channels=16)
    scenes = render_scenes(0, list(range(50_000, 50_064)), image_size=64)
    x = images_to_tensor(np.stack([s["image"] for s in scenes]))
    target = tasks["depth"].targets([s["depth"] for s in scenes], (64, 64))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    first = None
    for step in range(40):
        idx = slice((step % 4) * 16, (step % 4) * 16 + 16)
        loss = tasks["depth"].loss(model(x[idx])["depth"], {k: v[idx] for k, v in target.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss)
    assert float(loss) < first
    pre = save_model(str(tmp_path / "pre.pt"), model.eval(), num_classes=NUM_CATEGORIES, task_cfgs={},
                     classes=list(CATEGORIES), fpn_channels=16)

    res = transfer_evaluate({"depth_pretrained": pre, "random": "random"}, train, test, domain="cluttered")
    assert res["tasks"] == probe_tasks and [r["backbone"] for r in res["rows"]] == ["depth_pretrained", "random"]
    assert res["columns"] == {"classification": "top1", "segmentation": "miou", "depth": "abs_rel",
                              "normals": "mean_angle"}
    assert res["train_rows"] == 32 and res["test_rows"] == 16
    for r in res["rows"]:
        assert set(r["values"]) == set(probe_tasks)
        assert all(math.isfinite(v) for v in r["values"].values()), r["values"]
    assert res["rows"][1]["source"] == "random:test_resnet"
    assert set(beats_all(res, "depth_pretrained")) == set(probe_tasks)
    again = transfer_evaluate({"random": "random:test_resnet"}, train, test, TransferConfig(tasks=["depth"]))
    assert again["rows"][0]["values"]["depth"] == res["rows"][1]["values"]["depth"]  # deterministic (seeded)
    cache = TransferConfig(cache_dir=str(tmp_path / "cache"))
    probed = transfer_evaluate({"depth_pretrained": pre, "random": "random"}, train, test, cache)
    reused = transfer_evaluate({"again": pre, "random": "random"}, train, test, cache)
    assert [r["cached"] for r in probed["rows"] + reused["rows"]] == [False, False, True, True]
    assert [r["values"] for r in reused["rows"]] == [r["values"] for r in res["rows"]]
    assert reused["rows"][0]["backbone"] == "again" and len(os.listdir(tmp_path / "cache")) == 2
    shutil.copy(pre, tmp_path / "other.pt")
    with open(tmp_path / "other.pt", "ab") as f:
        f.write(b"\0")  # other bytes: another backbone
    other = transfer_evaluate({"other": str(tmp_path / "other.pt")}, train, test, cache)
    assert other["rows"][0]["cached"] is False
    files = write_transfer(str(tmp_path / "rep"), res)
    _no_constants(open(files["transfer_json"]).read())
    md = transfer_markdown(res)
    assert "| depth_pretrained |" in md and "| random |" in md and "depth abs_rel ↓" in md


# ----------------------------------------------------------------------------- the job


def test_evaluate_job_writes_reports(world_table, random_model, depth_model, tmp_path):
    out = tmp_path / "reports"
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--student", random_model, "--teacher",
         f"depth={depth_model}", "--data", world_table, "--out", str(out), "--no-ray", "--set",
         "evaluate.grid_images=2", "--set", "evaluate.batch_size=12"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["job"] == "evaluate" and set(summary["comparison"]) == {"depth"}
    assert isinstance(summary["passed"], bool)
    assert set(summary["headline"]["student"]) == set(ALL)
    data = _no_constants(open(summary["metrics_json"]).read())
    assert set(data["models"]) == {"student", "teacher_depth"}
    assert (out / "metrics.md").read_text().startswith("# Evaluation")
    assert (out / "grid.png").is_file()


def test_transfer_verdict_student_against_every_teacher(tmp_path):
    from must_ray.evaluate.transfer import student_vs_teachers, transfer_markdown, write_transfer

    def row(name, top1, angle):
        return {"backbone": name, "values": {"classification": top1, "normals": angle}}
    result = {"tasks": ["classification", "normals"], "columns": {"classification": "top1", "normals": "mean_angle"},
              "higher_is_better": {"classification": True, "normals": False},
              "rows": [row("student", 0.5, 20.0), row("teacher_a", 0.4, 19.0), row("teacher_b", 0.5, 25.0),
                       row("random", 0.9, 10.0)],  # random is not a teacher: never compared
              "best": {"classification": "random", "normals": "random"},
              "probe": {"features": "backbone", "kind": "ridge"}, "train_table": "a", "test_table": "b",
              "train_rows": 4, "test_rows": 4}
    # a tie with teacher_b is not a win; teacher_a has the lower (better) angle
    assert student_vs_teachers(result) == {"classification": False, "normals": False}
    result["rows"][0]["values"] = {"classification": 0.6, "normals": 18.0}
    assert student_vs_teachers(result) == {"classification": True, "normals": True}
    assert "beats them all on classification, normals." in transfer_markdown(result)
    files = write_transfer(str(tmp_path), result)
    assert json.load(open(files["transfer_json"]))["student_beats_teachers"] == {"classification": True, "normals": True}
    assert student_vs_teachers(dict(result, rows=result["rows"][1:])) is None
