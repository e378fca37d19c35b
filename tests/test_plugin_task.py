"""A sixth task plugs in from outside must_ray: ``tests/edges_task.py`` (object boundaries derived
from the world's instance buffer) is named in the config's ``task_modules`` and runs through every
step, world -> teacher -> pseudo labels -> student -> evaluation -> grid picture -> transfer probe,
beside a built-in task, at tiny sizes. Nothing under ``must_ray/`` knows the task: the Ray Data
render and label actors, the Ray Train workers and the scoring actors all find it through the
registry (the session's Ray workers import from the repository root, tests/conftest.py)."""
import io
import json
import pickle
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from must_ray import task_registry
from must_ray.config import load_config
from must_ray.datasets.exporters import resolve_formats, tasks_without_format
from must_ray.datasets.importers import DatasetError
from must_ray.evaluate.pictures import collect_grid_rows, render_grid
from must_ray.label.teachers import default_teacher_path
from must_ray.pipeline import run_pipeline, student_model_path
from must_ray.table import table_classes, table_tasks
from must_ray.tasks import get_task_class, registered_task_names
from tests.conftest import REPO

PLUGIN = "tests.edges_task"
TASKS = ["depth", "edges"]
GRID_IMAGES, GRID_SCALE = 3, 2

TINY = [
    f"task_modules=[{PLUGIN}]", "tasks.edges.threshold=0.4",
    "world.image_size=32", "world.min_objects=1", "world.max_objects=2",
    "world.splits.teacher_depth.num=64", "world.splits.teacher_edges.num=64",
    "world.splits.unlabeled.num=64", "world.splits.test.num=16", f"world.splits.test.tasks={TASKS}",
    f"label.tasks={TASKS}", "label.shard_size=64", "label.actors=[1, 1]",
    "teacher.global_batch_size=16", "teacher.schedule.max_steps=6", "teacher.schedule.warmup_steps=2",
    "teacher.report_every_steps=3", "teacher.concurrent_runs=2", "teacher.scaling.cpus_per_worker=0.75",
    "student.global_batch_size=16", "student.schedule.max_steps=6", "student.schedule.warmup_steps=2",
    "student.report_every_steps=3", "student.ema_decay=0.0",
    f"evaluate.grid_images={GRID_IMAGES}", f"evaluate.grid_scale={GRID_SCALE}",
    "transfer.tasks=[edges]", "transfer.train_num=16", "transfer.test_num=8",
]


@pytest.fixture
def sandboxed_registry(monkeypatch):
    """The plug-in registers into a copy of the registry, forgotten (with its module) afterwards, so
    the rest of the session sees the five built-in tasks only."""
    registered_task_names()  # the built-in tasks, into the copy
    monkeypatch.setattr(task_registry, "_REGISTRY", dict(task_registry._REGISTRY))
    assert PLUGIN not in sys.modules
    yield
    sys.modules.pop(PLUGIN, None)


def test_a_task_from_the_tests_folder_runs_through_every_step(ray_session, sandboxed_registry, tmp_path):
    assert "edges" not in registered_task_names()
    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml", [f"paths.root={tmp_path}", *TINY])
    edges = get_task_class("edges")  # registered by loading the config
    assert edges.__module__ == PLUGIN and type(cfg.tasks["edges"]) is edges.config_class
    assert cfg.tasks["edges"].threshold == 0.4

    result = run_pipeline(cfg, progress_stream=io.StringIO())
    assert result["ran"] == ["world", "teachers", "label", "student", "evaluate", "transfer"]

    labels = pq.read_table(cfg.paths.resolve("labels"))
    assert table_tasks([cfg.paths.resolve("labels")]) == TASKS
    assert labels.num_rows == 64 and labels.column("edges_png").null_count == 0

    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    student = metrics["models"]["student"]["tasks"]["edges"]
    assert {"f1", "iou"} <= set(student["metrics"]) and 0.0 <= student["value"] <= 1.0
    assert "edges" in metrics["models"]["teacher_edges"]["tasks"]
    assert sorted(r["task"] for r in metrics["comparison"]) == TASKS

    # the grid: input + (ground truth, teachers, student) x (depth, edges) per row, drawn by each
    # task's own draw hook (edges: the default one of a dense task)
    grid_png = tmp_path / "reports" / "grid.png"
    test_table = str(tmp_path / "world" / "test")
    models = {"teachers": [default_teacher_path(cfg, t) for t in TASKS], "student": student_model_path(cfg)}
    layout = render_grid(collect_grid_rows(test_table, GRID_IMAGES, models=models), str(tmp_path / "again.png"),
                         class_names=table_classes([test_table], required=False), scale=GRID_SCALE)
    assert layout["columns"] == [[s, t] for t in TASKS for s in ("ground truth", "teachers", "student")]
    assert layout["rows"] == GRID_IMAGES and len(layout["origins"][0]) == 1 + 2 * 3
    with Image.open(grid_png) as img:
        assert img.format == "PNG" and img.size[0] == layout["size"][0]

    transfer = json.loads((tmp_path / "reports" / "transfer.json").read_text())
    assert transfer["tasks"] == ["edges"] and transfer["columns"] == {"edges": "f1"}
    assert {r["backbone"] for r in transfer["rows"]} == {"student", "teacher_depth", "teacher_edges", "random"}
    assert all(0.0 <= r["values"]["edges"] <= 1.0 for r in transfer["rows"])


def test_a_pickled_config_brings_its_task_modules_along(sandboxed_registry):
    """What a Ray worker receiving a config (or only its ``tasks`` section) sees: unpickling imports
    the modules of the tasks it holds, so the plug-in is registered there without any import."""
    cfg = load_config(None, [f"task_modules=[{PLUGIN}]"])
    code = ("import pickle, sys; tasks = pickle.loads(sys.stdin.buffer.read()); "
            "from must_ray.tasks import registered_task_names; "
            "print(type(tasks['edges']).__name__, 'edges' in registered_task_names())")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(cfg.tasks), capture_output=True,
                         timeout=120, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split() == ["EdgesConfig", "True"]


def test_exporters_name_a_task_they_have_no_format_for():
    assert tasks_without_format(["depth", "edges"]) == ["edges"]
    assert resolve_formats(["all"], ["depth", "edges"], "t") == ["depth"]
    with pytest.raises(DatasetError, match=r"t: nothing to export \(no export format for edges; formats: coco"):
        resolve_formats(["all"], ["edges"], "t")
