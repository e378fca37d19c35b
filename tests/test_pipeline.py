"""Pipeline resumability and staleness: finished steps are skipped, a deleted output redoes its
step and the steps that read it, a changed config value reruns exactly the steps that read it and
those downstream, ``--force`` reruns a step and its dependents, and every decision says why. (The
real steps are exercised end to end by the demo run and by each step's own tests; here the step
bodies are small real functions writing files, with the real steps' identities.)"""
import dataclasses
import io
import json
import os

import pytest

from must_ray.config import load_config
from must_ray.pipeline import Step, run_pipeline, step_identities, steps
from must_ray.typed_config import ConfigError


def _writer(name, calls, record=None):
    def run(cfg):
        calls.append(record(cfg) if record else name)
        path = os.path.join(cfg.paths.root, name + ".out")
        with open(path, "w") as f:
            f.write(str(len(calls)))
        return {"path": path}
    return run


def _out(name):
    return lambda c: [os.path.join(c.paths.root, name + ".out")]


def _chain(calls):
    return [
        Step("world", "w", _writer("world", calls), _out("world")),
        Step("teachers", "t", _writer("teachers", calls), _out("teachers"), ("world",)),
        Step("student", "s", _writer("student", calls), _out("student"), ("teachers",)),
        Step("evaluate", "e", _writer("evaluate", calls), _out("evaluate"), ("teachers", "student")),
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


def _changed(before, after):
    return sorted(n for n in before if before[n] != after[n])


def test_identity_holds_exactly_the_config_values_each_step_reads(tmp_path):
    base = [f"paths.root={tmp_path}"]
    ids = step_identities(load_config(None, base), steps())
    assert len(set(ids.values())) == len(ids)

    def after(*sets):
        return _changed(ids, step_identities(load_config(None, base + list(sets)), steps()))

    assert after("tasks.detection.score_threshold=0.5") == ["evaluate", "label", "student", "transfer"]
    assert after("tasks.classification.temperature=2.0") == ["evaluate", "label", "student", "transfer"]
    assert after("evaluate.tolerance=0.05") == ["evaluate"]
    assert after("transfer.train_num=64") == ["transfer"]
    assert after("teacher.per_task.depth.optimizer.lr=0.01") == ["evaluate", "label", "student", "teachers",
                                                                 "transfer"]
    assert after("student.optimizer.lr=0.01") == ["evaluate", "student", "transfer"]
    assert after("world.image_size=48") == list(sorted(ids))
    # a key a newer version adds, at its default, leaves the identity alone; away from it, it counts
    from must_ray.pipeline import reads_payload
    assert reads_payload(lambda c: {"new": c.rounds}, load_config(None, base)) == {}
    assert reads_payload(lambda c: {"new": c.rounds}, load_config(None, base + ["rounds=2"])) == {"new": 2}
    # how fast or where a step runs is not what it produces
    assert after("evaluate.use_ray=false", "label.actors=[1, 2]", "teacher.concurrent_runs=2",
                 "student.checkpoint.every_steps=7", "ray.num_cpus=1") == []


def _real_chain(calls):
    """The real steps (names, inputs, identities, fresh-start config) with bodies that write a file
    and record (step, whether it was told to start afresh)."""
    return [dataclasses.replace(s, run=_writer(s.name, calls, lambda c, n=s.name: (n, c.label.overwrite)),
                                outputs=_out(s.name)) for s in steps()]


def test_changed_config_reruns_exactly_the_steps_that_read_it_and_says_why(tmp_path):
    base = [f"paths.root={tmp_path}"]
    calls: list = []
    run_pipeline(load_config(None, base), pipeline=_real_chain(calls), progress_stream=io.StringIO())
    assert [c[0] for c in calls] == [s.name for s in steps()]

    calls.clear()
    screen = io.StringIO()
    thr = load_config(None, base + ["tasks.detection.score_threshold=0.5"])
    result = run_pipeline(thr, pipeline=_real_chain(calls), progress_stream=screen)
    assert result["ran"] == ["label", "student", "evaluate", "transfer"]
    assert result["skipped"] == ["world", "teachers"]
    assert "config changed: tasks.detection.score_threshold 0.3 -> 0.5" in result["reasons"]["label"]
    assert result["reasons"]["student"] == "input label reruns"
    assert "[skip] teachers  up to date" in screen.getvalue() and "--force teachers" in screen.getvalue()
    assert ("label", True) in calls  # a relabel under a new identity starts afresh, never resumes old shards

    calls.clear()
    ev = load_config(None, base + ["tasks.detection.score_threshold=0.5", "evaluate.tolerance=0.05"])
    result = run_pipeline(ev, pipeline=_real_chain(calls), progress_stream=io.StringIO())
    assert result["ran"] == ["evaluate"] and "evaluate.tolerance 0.02 -> 0.05" in result["reasons"]["evaluate"]
    only = run_pipeline(ev, only=["evaluate"], pipeline=_real_chain(calls), progress_stream=io.StringIO())
    assert only["skipped"] == ["evaluate"]

    def nonce():
        return json.loads((tmp_path / "_pipeline" / "student.started.json").read_text())["force_nonce"]
    assert nonce() == ""
    calls.clear()
    forced = run_pipeline(ev, force=["student"], pipeline=_real_chain(calls), progress_stream=io.StringIO())
    assert forced["ran"] == ["student", "evaluate", "transfer"]
    assert forced["reasons"]["student"] == "forced (--force)"
    first = nonce()  # a forced student names a new Ray Train run instead of re-exporting the old one
    run_pipeline(load_config(None, base + ["student.optimizer.lr=0.01"]), pipeline=_real_chain([]),
                 progress_stream=io.StringIO())
    assert first and nonce() == first


def test_only_refuses_to_build_on_an_out_of_date_input(tmp_path):
    base = [f"paths.root={tmp_path}"]
    run_pipeline(load_config(None, base), pipeline=_real_chain([]), progress_stream=io.StringIO())
    stale = load_config(None, base + ["student.optimizer.lr=0.01", "evaluate.tolerance=0.05"])
    with pytest.raises(ConfigError, match="--only evaluate: its input step student is out of date "
                                          r"\(config changed: student.optimizer.lr"):
        run_pipeline(stale, only=["evaluate"], pipeline=_real_chain([]), progress_stream=io.StringIO())
    with pytest.raises(ConfigError, match="--force nope: unknown step"):
        run_pipeline(stale, force=["nope"], pipeline=_real_chain([]), progress_stream=io.StringIO())


def test_a_crashed_relabel_resumes_its_own_shards(tmp_path):
    base = [f"paths.root={tmp_path}"]
    run_pipeline(load_config(None, base), pipeline=_real_chain([]), progress_stream=io.StringIO())
    thr = load_config(None, base + ["tasks.detection.score_threshold=0.5"])
    crashing = _real_chain([])

    def boom(cfg):
        raise RuntimeError("node lost")
    crashing[2] = dataclasses.replace(crashing[2], run=boom)
    with pytest.raises(RuntimeError):
        run_pipeline(thr, pipeline=crashing, progress_stream=io.StringIO())
    calls: list = []
    run_pipeline(thr, pipeline=_real_chain(calls), progress_stream=io.StringIO())
    assert calls[0] == ("label", False)  # same identity as the crashed attempt: resume, do not wipe


def test_a_uri_paths_root_is_refused_before_any_work_with_the_keys_that_can_be_uris():
    from must_ray.pipeline import plan_request

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "demo.yaml"),
                      ["paths.root=s3://my-bucket/run1"])
    with pytest.raises(ConfigError, match=r"^paths\.root='s3://my-bucket/run1'.*paths\.labels=s3://") as exc:
        plan_request(cfg)
    assert "\n" not in str(exc.value)


def test_a_split_s_identity_is_its_own_config_and_a_teacher_s_holds_its_own_split_only(tmp_path):
    """A teacher's identity depends on its own world split, not on the pool or another teacher's
    split, so a new pool size keeps every teacher (the world step then re-renders the pool only:
    the experiment test runs that). ``--force world`` renews them all."""
    from must_ray.pipeline import split_identity, teacher_identity

    base = [f"paths.root={tmp_path}"]
    cfg = load_config(None, base)
    bigger = load_config(None, base + ["world.splits.unlabeled.num=4096"])
    assert split_identity(bigger, "unlabeled") != split_identity(cfg, "unlabeled")
    assert split_identity(bigger, "test") == split_identity(cfg, "test")
    assert all(teacher_identity(bigger, t) == teacher_identity(cfg, t) for t in ("detection", "depth"))
    depth_split = load_config(None, base + ["world.splits.teacher_depth.num=9"])
    assert teacher_identity(depth_split, "depth") != teacher_identity(cfg, "depth")
    assert teacher_identity(depth_split, "detection") == teacher_identity(cfg, "detection")
    assert split_identity(load_config(None, base + ["world.image_size=48"]), "test") != split_identity(cfg, "test")
    before = split_identity(cfg, "test"), teacher_identity(cfg, "depth")
    (tmp_path / "_pipeline").mkdir()
    (tmp_path / "_pipeline" / "world.started.json").write_text(json.dumps({"force_nonce": "abc"}))
    after = split_identity(cfg, "test"), teacher_identity(cfg, "depth")
    assert after[0] != before[0] and after[1] != before[1]


def test_rounds_add_a_relabel_and_a_fresh_student_per_round_and_score_the_last(tmp_path):
    from must_ray.pipeline import final_student_path, round_config

    cfg = load_config(None, [f"paths.root={tmp_path}", "rounds=3", "student.checkpoint.run_name=mine"])
    names = [s.name for s in steps(3)]
    assert names == ["world", "teachers", "label", "student", "label_r2", "student_r2", "label_r3", "student_r3",
                     "evaluate", "transfer"]
    by_name = {s.name: s for s in steps(3)}
    assert by_name["label_r3"].needs == ("student_r2",) and by_name["evaluate"].needs[-1] == "student_r3"
    r2, r3 = round_config(cfg, 2), round_config(cfg, 3)
    assert {t.path for t in r2.label.teachers.values()} == {str(tmp_path / "student" / "model.pt")}
    assert {t.kind for t in r3.label.teachers.values()} == {"checkpoint"}
    assert {t.path for t in r3.label.teachers.values()} == {str(tmp_path / "student_r2" / "model.pt")}
    assert r3.paths.resolve("labels") == str(tmp_path / "labels_r3") and r3.student.checkpoint.run_name == "mine_r3"
    assert final_student_path(cfg) == str(tmp_path / "student_r3" / "model.pt")
    assert round_config(cfg, 1) is cfg

    ids = step_identities(cfg, steps(3))
    lr = step_identities(load_config(None, [f"paths.root={tmp_path}", "rounds=3", "student.checkpoint.run_name=mine",
                                            "student.optimizer.lr=0.01"]), steps(3))
    assert _changed(ids, lr) == ["evaluate", "label_r2", "label_r3", "student", "student_r2", "student_r3", "transfer"]
    with pytest.raises(ConfigError, match=r"rounds must be in \[1, 10\]"):
        load_config(None, ["rounds=0"])
