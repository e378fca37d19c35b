"""A sixth task plugs in from outside must_ray: ``tests/edges_task.py`` (object boundaries derived
from the world's instance buffer) is named in the config's ``task_modules``. Its run through every
step (world -> teacher -> pseudo labels -> student -> evaluation -> grid picture -> transfer probe)
happens inside the demo pipeline test (tests/test_demo_pipeline.py, one pipeline for six tasks);
here: a pickled config brings the module along to a fresh process, the exporters name a task they
have no format for, and the registry's task names come from the config."""
import pickle
import subprocess
import sys

import pytest

from must_ray.config import load_config
from must_ray.datasets.exporters import resolve_formats, tasks_without_format
from must_ray.datasets.importers import DatasetError
from must_ray.tasks import get_task_class, registered_task_names
from tests.conftest import PLUGIN_TASK_MODULE as PLUGIN
from tests.conftest import REPO


def test_loading_a_config_registers_its_task_modules(sandboxed_registry):
    assert "edges" not in registered_task_names()
    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml",
                      [f"task_modules=[{PLUGIN}]", "tasks.edges.threshold=0.4"])
    edges = get_task_class("edges")
    assert edges.__module__ == PLUGIN and type(cfg.tasks["edges"]) is edges.config_class
    assert cfg.tasks["edges"].threshold == 0.4 and "edges" in cfg.label.teachers


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
