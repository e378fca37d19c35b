"""The demo pipeline end to end, CI-sized: every real step (world -> five teachers -> pseudo labels
-> student -> evaluation -> transfer) on the demo config, shrunk to 32-pixel scenes of one or two
objects and short schedules so it fits the suite. Asserts the report files exist and parse, every
teacher and the student beat the trivial baselines on all five tasks, and that rerunning does no
work."""
import io
import json

import pytest

from must_ray.config import load_config
from must_ray.pipeline import run_pipeline
from tests.conftest import REPO

TASKS = ["classification", "detection", "segmentation", "depth", "normals"]

# 32-pixel scenes make every step ~4x cheaper than the demo's 64. Classification (the shape of the
# largest object, learnt from scratch) is the data-hungry task: its teacher gets a large labelled
# split and its own longer recipe (teacher.per_task), trained beside the other four (two teacher
# runs at a time); the student's pool is large enough for it to generalise from the pseudo labels.
CI_SIZED = [
    "world.image_size=32", "world.min_objects=1", "world.max_objects=2",
    *[f"world.splits.teacher_{t}.num=512" for t in TASKS if t != "classification"],
    "world.splits.teacher_classification.num=4096",
    "world.splits.unlabeled.num=3072", "world.splits.test.num=512",
    "teacher.schedule.max_steps=150", "teacher.schedule.warmup_steps=15", "teacher.report_every_steps=50",
    "teacher.concurrent_runs=2", "teacher.scaling.cpus_per_worker=0.75",  # two one-thread teachers at a time
    "teacher.per_task={classification: {schedule: {max_steps: 700}, global_batch_size: 64, ema_decay: 0.99, "
    "input: {crop_scale_min: 1.0}}}",
    "student.schedule.max_steps=400", "student.global_batch_size=64", "student.ema_decay=0.98",
    "student.report_every_steps=100",
    "label.shard_size=1024",
    "transfer.train_num=64", "transfer.test_num=64",
]


@pytest.mark.slow
def test_demo_pipeline_end_to_end_then_rerun_does_nothing(ray_session, tmp_path):
    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml", [f"paths.root={tmp_path}", *CI_SIZED])
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
    assert transfer  # strict JSON, parsed
    rows = {r["task"]: r for r in metrics["comparison"]}
    assert sorted(rows) == sorted(TASKS)
    print("\n" + (reports / "metrics.md").read_text().split("\n## student\n")[0])
    losing = {t: r for t, r in rows.items() if not r["student_beats_trivial"]}
    assert not losing, f"student does not beat the trivial baseline on {losing}"
    for task in TASKS:
        teacher = metrics["models"][f"teacher_{task}"]["tasks"][task]
        assert teacher["beats_trivial"], (task, teacher)

    # Done: a rerun does no work (each step finds its outputs; tests/test_pipeline.py covers
    # deleted outputs and crashes with small real step functions).
    again = run_pipeline(cfg, progress_stream=io.StringIO())
    assert again["ran"] == [] and len(again["skipped"]) == 6
