"""The demo pipeline end to end, CI-sized: every real step (world -> six teachers -> pseudo labels
-> student -> evaluation -> transfer) on the demo config, shrunk to 32-pixel scenes of one or two
objects and short schedules so it fits the suite. The sixth task plugs in from outside must_ray
(``tests/edges_task.py``, named in ``task_modules``; nothing under ``must_ray/`` knows it): the Ray
Data render and label actors, the Ray Train workers and the scoring actors all find it through the
registry (the session's Ray workers import from the repository root, tests/conftest.py). Asserts
the report files exist and parse, every built-in teacher and the student beat the trivial
baselines on the five built-in tasks, the plug-in task went through every step (its own metric,
its grid columns drawn by its own hook, its transfer probe), that the trained teachers' bf16 labels
agree with their fp32 labels, and that rerunning does no work."""
import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.precision import agreement_checks, teacher_precision
from must_ray.config import load_config
from must_ray.evaluate.pictures import collect_grid_rows, render_grid
from must_ray.label.teachers import default_teacher_path
from must_ray.pipeline import run_pipeline, student_model_path
from must_ray.table import table_classes, table_tasks
from must_ray.tasks import get_task_class, registered_task_names
from tests.conftest import PLUGIN_TASK_MODULE, REPO

TASKS = ["classification", "detection", "segmentation", "depth", "normals"]
ALL_TASKS = [*TASKS, "edges"]
GRID_IMAGES = 2

# 32-pixel scenes make every step ~4x cheaper than the demo's 64. Classification (the shape of the
# largest object, learnt from scratch) is the data-hungry task: its teacher gets a large labelled
# split and its own longer recipe (teacher.per_task), trained beside the other five (two teacher
# runs at a time); the student's pool is large enough for it to generalise from the pseudo labels.
CI_SIZED = [
    f"task_modules=[{PLUGIN_TASK_MODULE}]", "tasks.edges.threshold=0.4",
    "world.image_size=32", "world.min_objects=1", "world.max_objects=2",
    *[f"world.splits.teacher_{t}.num=512" for t in ALL_TASKS if t != "classification"],
    "world.splits.teacher_classification.num=4096",
    "world.splits.unlabeled.num=2048", "world.splits.test.num=512", f"world.splits.test.tasks={ALL_TASKS}",
    "teacher.schedule.max_steps=120", "teacher.schedule.warmup_steps=12", "teacher.report_every_steps=50",
    "teacher.concurrent_runs=2", "teacher.scaling.cpus_per_worker=0.75",  # two one-thread teachers at a time
    "teacher.per_task={classification: {schedule: {max_steps: 500}, global_batch_size: 64, ema_decay: 0.99, "
    "input: {crop_scale_min: 1.0}}}",
    "student.schedule.max_steps=300", "student.global_batch_size=64", "student.ema_decay=0.98",
    "student.report_every_steps=100",
    "label.shard_size=1024",
    "transfer.train_num=64", "transfer.test_num=64",
]


@pytest.mark.slow
def test_demo_pipeline_with_a_plugin_task_end_to_end_then_rerun_does_nothing(ray_session, sandboxed_registry,
                                                                              tmp_path):
    assert "edges" not in registered_task_names()
    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml", [f"paths.root={tmp_path}", *CI_SIZED])
    assert get_task_class("edges").__module__ == PLUGIN_TASK_MODULE  # registered by loading the config
    screen = io.StringIO()
    first = run_pipeline(cfg, progress_stream=screen)
    assert first["ran"] == ["world", "teachers", "label", "student", "evaluate", "transfer"]
    assert "[done] transfer" in screen.getvalue()

    reports = tmp_path / "reports"
    for name in ("metrics.md", "transfer.md", "grid.png", "curves.png"):
        assert (reports / name).stat().st_size > 0, name
    assert (reports / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((reports / "metrics.json").read_text())
    transfer = json.loads((reports / "transfer.json").read_text())
    rows = {r["task"]: r for r in metrics["comparison"]}
    assert sorted(rows) == sorted(ALL_TASKS)
    print("\n" + (reports / "metrics.md").read_text().split("\n## student\n")[0])
    losing = {t: rows[t] for t in TASKS if not rows[t]["student_beats_trivial"]}
    assert not losing, f"student does not beat the trivial baseline on {losing}"
    for task in TASKS:
        teacher = metrics["models"][f"teacher_{task}"]["tasks"][task]
        assert teacher["beats_trivial"], (task, teacher)

    # the plug-in task, through every step
    labels = pq.read_table(cfg.paths.resolve("labels"), columns=["edges_png"])
    assert table_tasks([cfg.paths.resolve("labels")]) == ALL_TASKS
    assert labels.num_rows == 2048 and labels.column("edges_png").null_count == 0
    student = metrics["models"]["student"]["tasks"]["edges"]
    assert {"f1", "iou"} <= set(student["metrics"]) and 0.0 <= student["value"] <= 1.0
    assert "edges" in metrics["models"]["teacher_edges"]["tasks"]
    test_table = str(tmp_path / "world" / "test")
    models = {"teachers": [default_teacher_path(cfg, t) for t in ALL_TASKS], "student": student_model_path(cfg)}
    layout = render_grid(collect_grid_rows(test_table, GRID_IMAGES, models=models), str(tmp_path / "again.png"),
                         class_names=table_classes([test_table], required=False), scale=1)
    assert layout["columns"] == [[s, t] for t in ALL_TASKS for s in ("ground truth", "teachers", "student")]
    with Image.open(tmp_path / "again.png") as img:
        assert img.format == "PNG" and layout["rows"] == GRID_IMAGES
    assert "edges" in transfer["tasks"] and transfer["columns"]["edges"] == "f1"
    assert {r["backbone"] for r in transfer["rows"]} == {"student", "random", *[f"teacher_{t}" for t in ALL_TASKS]}
    assert all(0.0 <= r["values"]["edges"] <= 1.0 for r in transfer["rows"])

    # bf16 labels of the trained teachers agree with their fp32 labels (what precision: auto relies
    # on where the CPU has native bf16 units), in each task's own metric
    bf16 = teacher_precision(cfg, num_images=64, rounds=1)
    assert sorted(bf16["agreement"]) == sorted(ALL_TASKS)
    missed = [c for c in agreement_checks(bf16["agreement"]) if not c["met"]]
    assert len(agreement_checks(bf16["agreement"])) == len(TASKS) and not missed, (missed, bf16["agreement"])

    # Done: a rerun does no work (each step finds its outputs; tests/test_pipeline.py covers
    # deleted outputs and crashes with small real step functions).
    again = run_pipeline(cfg, progress_stream=io.StringIO())
    assert again["ran"] == [] and len(again["skipped"]) == 6
