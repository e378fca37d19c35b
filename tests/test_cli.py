"""What every job shares: ``--help`` without the heavy imports, the closing table, the flags
several jobs have, and Ray's log noise off by default."""
import argparse
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from must_ray.cli import headline_rows, parse_scale, print_table, train_flag_overrides
from must_ray.typed_config import ConfigError

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "timm", "torchvision", "matplotlib")

# Runs each job's --help in one interpreter and prints "<job> <heavy modules it imported>".
HELP_PROBE = """
import contextlib, io, runpy, sys
heavy = {heavy!r}
for job in sys.argv[1:]:
    before = set(sys.modules)
    sys.argv = [job, "--help"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            runpy.run_path(job, run_name="__main__")
        except SystemExit:
            pass
    new = sorted(m for m in heavy if m in sys.modules and m not in before)
    print(job, ",".join(new) or "-", "usage:" in out.getvalue())
"""


def test_every_jobs_help_imports_no_torch_ray_or_timm():
    jobs = sorted(str(p) for p in (REPO / "jobs").glob("*.py"))
    out = subprocess.run([sys.executable, "-c", HELP_PROBE.format(heavy=HEAVY), *jobs], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True).stdout.split("\n")
    lines = [line.split() for line in out if line]
    assert [job for job, _, _ in lines] == jobs
    assert {job: heavy for job, heavy, _ in lines if heavy != "-"} == {}
    assert all(usage == "True" for _, _, usage in lines)


def test_closing_table_lists_scalars_and_report_paths():
    rows = headline_rows({"job": "evaluate", "metrics_md": "/r/metrics.md", "rows": 256, "loss": 0.123456,
                          "passed": False, "headline": {"student": 0.5, "nested": {"x": 1}}, "big": list(range(20))})
    assert rows == [("headline.student", "0.5"), ("job", "evaluate"), ("loss", "0.1235"),
                    ("metrics_md", "/r/metrics.md"), ("passed", "no"), ("rows", "256")]
    screen = io.StringIO()
    print_table(rows, screen)
    assert "  metrics_md        /r/metrics.md\n" in screen.getvalue()


def test_shared_flags():
    assert parse_scale("1/256") == pytest.approx(1 / 256) and parse_scale("0.001") == 0.001
    with pytest.raises(argparse.ArgumentTypeError):
        parse_scale("0")
    args = argparse.Namespace(steps=5, epochs=None, workers="1,4", batch_size=None, run_name="r", gpu=False)
    assert train_flag_overrides(args, "student") == ["student.schedule.max_steps=5",
                                                     "student.scaling.num_workers=[1, 4]",
                                                     "student.checkpoint.run_name=r"]
    with pytest.raises(ConfigError, match="--workers"):
        train_flag_overrides(argparse.Namespace(**{**vars(args), "workers": "a"}), "student")


def test_quiet_ray_turns_ray_data_noise_off_and_verbose_keeps_it():
    from ray.data import DataContext

    from must_ray.ray_logs import SETUP_HOOK, quiet_ray, quiet_worker

    ctx = DataContext.get_current()
    saved = (ctx.print_on_execution_start, ctx.enable_progress_bars)
    try:
        ctx.print_on_execution_start = ctx.enable_progress_bars = True
        assert quiet_ray(True, local=False) is None and ctx.print_on_execution_start
        assert quiet_ray(False, local=False) == {"worker_process_setup_hook": SETUP_HOOK}
        assert not ctx.print_on_execution_start and not ctx.enable_progress_bars
    finally:
        ctx.print_on_execution_start, ctx.enable_progress_bars = saved
    address = os.environ.pop("RAY_ADDRESS", None)
    try:
        quiet_worker()
        assert "RAY_ADDRESS" not in os.environ  # a driver (this process) keeps choosing its own cluster
    finally:
        if address is not None:
            os.environ["RAY_ADDRESS"] = address
    import ray.train.v2._internal.execution.context as train_context
    import ray.train.v2._internal.execution.controller.placement_group_cleaner as pg_cleaner
    assert logging.getLogger(train_context.__file__).getEffectiveLevel() == logging.WARNING
    assert logging.getLogger(pg_cleaner.__name__).getEffectiveLevel() == logging.ERROR


def test_pipeline_closing_table():
    import runpy

    headline = runpy.run_path(str(REPO / "jobs" / "pipeline.py"))["headline"]
    rows = dict(headline({
        "ran": ["evaluate"], "skipped": ["world", "teachers"], "must_passed": False, "wall_s": 12.3,
        "student_vs_teachers": {"depth": {"student": 0.21, "teacher": 0.2, "ratio": 1.05, "pass": False}},
        "transfer": {"student": {"depth": 0.3}}, "metrics_md": "/r/metrics.md",
        "transfer_files": {"transfer_md": "/r/transfer.md"}}))
    assert rows["depth: student / teacher"] == "0.21 / 0.2  ratio 1.050  FAIL"
    assert rows["ran"] == "evaluate" and rows["skipped (up to date)"] == "world, teachers"
    assert rows["metrics.md"] == "/r/metrics.md" and rows["transfer.md"] == "/r/transfer.md"
    assert rows["MuST criterion met"] == "no" and rows["transfer student"] == "depth 0.3"
