"""Pipeline resumability: finished steps are skipped, a deleted output redoes its step and the
steps that read it, never the upstream ones. (The real steps are exercised end to end by the demo
run and by each step's own tests; here the step bodies are small real functions writing files.)"""
import io
import os

import pytest

from must_ray.config import load_config
from must_ray.pipeline import Step, run_pipeline, steps
from must_ray.typed_config import ConfigError


def _writer(name, calls):
    def run(cfg):
        calls.append(name)
        path = os.path.join(cfg.paths.root, name + ".out")
        with open(path, "w") as f:
            f.write(str(len(calls)))
        return {"path": path}
    return run


def _chain(calls):
    out = lambda n: (lambda c: [os.path.join(c.paths.root, n + ".out")])  # noqa: E731
    return [
        Step("world", "w", _writer("world", calls), out("world")),
        Step("teachers", "t", _writer("teachers", calls), out("teachers"), ("world",)),
        Step("student", "s", _writer("student", calls), out("student"), ("teachers",)),
        Step("evaluate", "e", _writer("evaluate", calls), out("evaluate"), ("teachers", "student")),
    ]


def test_rerun_skips_and_deleted_output_redoes_only_its_step_and_readers(tmp_path):
    cfg = load_config(None, [f"paths.root={tmp_path}"])
    calls: list[str] = []
    screen = io.StringIO()
    first = run_pipeline(cfg, pipeline=_chain(calls), progress_stream=screen)
    assert first["ran"] == ["world", "teachers", "student", "evaluate"] and first["skipped"] == []
    assert "[done] evaluate" in screen.getvalue()

    calls.clear()
    second = run_pipeline(cfg, pipeline=_chain(calls), progress_stream=io.StringIO())
    assert calls == [] and second["skipped"] == ["world", "teachers", "student", "evaluate"]
    assert second["steps"]["student"]["path"].endswith("student.out")  # summary kept from the marker

    os.remove(tmp_path / "student.out")
    third = run_pipeline(cfg, pipeline=_chain(calls), progress_stream=io.StringIO())
    assert calls == ["student", "evaluate"]
    assert third["skipped"] == ["world", "teachers"]


def test_crashed_step_resumes_there(tmp_path):
    cfg = load_config(None, [f"paths.root={tmp_path}"])
    calls: list[str] = []
    chain = _chain(calls)

    def boom(c):
        raise RuntimeError("node lost")
    crashing = chain[:2] + [Step("student", "s", boom, chain[2].outputs, ("teachers",))] + chain[3:]
    with pytest.raises(RuntimeError, match="node lost"):
        run_pipeline(cfg, pipeline=crashing, progress_stream=io.StringIO())
    calls.clear()
    result = run_pipeline(cfg, pipeline=_chain(calls), progress_stream=io.StringIO())
    assert calls == ["student", "evaluate"] and result["skipped"] == ["world", "teachers"]


def test_real_step_list_and_unknown_step(tmp_path):
    assert [s.name for s in steps()] == ["world", "teachers", "label", "student", "evaluate", "transfer"]
    cfg = load_config(None, [f"paths.root={tmp_path}"])
    with pytest.raises(ConfigError, match="--only nope: unknown step"):
        run_pipeline(cfg, only=["nope"])
