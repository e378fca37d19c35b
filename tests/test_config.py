"""Config loading: defaults, YAML, --set overrides, and fail-fast errors naming the key."""
import pickle
import subprocess
import sys

import pytest

from must_ray.config import config_from_dict, load_config, parse_override
from must_ray.typed_config import ConfigError, config_to_dict
from tests.conftest import REPO


def test_every_shipped_config_loads():
    configs = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        cfg = load_config(path)
        assert cfg.world.image_size >= 16, path


def test_yaml_merges_into_defaults_and_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tasks:\n  detection: {score_threshold: 0.5}\nworld: {image_size: 32}\n")
    cfg = load_config(path, ["world.splits.test.num=7", "tasks.depth.max_depth=10", "paths.root=/x/y"])
    assert cfg.tasks["detection"].score_threshold == 0.5
    assert set(cfg.tasks) == {"classification", "detection", "segmentation", "depth", "normals", "features"}
    assert cfg.world.image_size == 32 and cfg.world.splits["test"].num == 7
    assert cfg.tasks["depth"].max_depth == 10.0 and isinstance(cfg.tasks["depth"].max_depth, float)
    assert cfg.paths.resolve("labels") == "/x/y/labels"
    assert cfg.paths.resolve("world").startswith("/x/y")
    # round trip through a plain dict
    assert config_to_dict(config_from_dict(config_to_dict(cfg))) == config_to_dict(cfg)


def test_each_task_owns_its_config_class():
    from must_ray.tasks import get_task_class

    cfg = load_config(None, ["tasks.classification.topk=3"])
    for name, task_cfg in cfg.tasks.items():
        assert type(task_cfg) is get_task_class(name).config_class, name
    assert cfg.tasks["classification"].topk == 3 and not hasattr(cfg.tasks["detection"], "topk")
    again = pickle.loads(pickle.dumps(cfg))  # what Ray ships to its workers
    assert type(again.tasks) is type(cfg.tasks) and again.tasks == cfg.tasks


def test_config_imports_no_task():
    """The config stack reads the task registry, never a task module (nor torch)."""
    code = ("import sys, must_ray.config; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('must_ray.tasks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["world.imag_size=32"], "world.imag_size: unknown key"),
        (["world.image_size=big"], "world.image_size: expected an integer"),
        (["world.image_size=3.5"], "world.image_size: expected an integer"),
        (["world.image_size=8"], "world.image_size must be in [16, 1024]"),
        (["tasks.detection.score_threshold=2"], "tasks.detection.score_threshold must be in [0, 1]"),
        (["tasks.detection.nms_iou=true"], "tasks.detection.nms_iou: expected a number"),
        (["tasks.segmentaton.topk=2"], "tasks.segmentaton: unknown task"),
        (["tasks.detection.topk=3"],
         "tasks.detection.topk: unknown key; valid keys here: loss_weight, max_boxes, nms_iou, score_threshold"),
        (["tasks.classification.topk=0"], "tasks.classification.topk must be >= 1"),
        (["tasks.normals.loss_weight=-1"], "tasks.normals.loss_weight must be >= 0"),
        (["tasks.depth=3"], "tasks.depth: expected a mapping for DepthConfig"),
        (["transfer.tasks=[detection]"], "transfer.tasks: detection has no light probe"),
        (["task_modules=[no_such_pkg.edges]"], "task_modules[0]: cannot import task module 'no_such_pkg.edges'"),
        (["task_modules=no_such_pkg"], "task_modules: expected a list"),
        (["world.splits.test.tasks=[depth, colour]"], "world.splits.test.tasks: unknown task 'colour'"),
        (["world.splits.test.domain=underwater"], "world.splits.test.domain: 'underwater' is not one of"),
        (["world.min_objects=6", "world.max_objects=3"], "world.min_objects/max_objects"),
        (["paths=3"], "paths: expected a mapping"),
        (["teacher.per_task={depth: {schedule: {max_stepz: 5}}}"],
         "teacher.per_task.depth.schedule.max_stepz: unknown key"),
        (["teacher.per_task={depth: {optimizer: {lr: -1}}}"], "teacher.per_task.depth.optimizer.lr must be > 0"),
        (["teacher.per_task={depth: {lr: 1}}"], "teacher.per_task.depth.lr: unknown key"),
        (["student.optimizer.lr=0"], "student.optimizer.lr must be > 0"),
        (["student.schedule.max_steps=0"], "student.schedule.max_steps must be >= 1 or null"),
        (["student.scaling.num_workers=[2, 1]"], "student.scaling.num_workers must be [min, max]"),
        (["student.global_batch_size=2", "student.scaling.num_workers=[1, 4]"],
         "student.global_batch_size (2) must be >= the max number of workers"),
        (["student.input.crop_scale_min=0"], "student.input.crop_scale_min must be in [0.05, 1]"),
        (["student.checkpoint.every_steps=0"], "student.checkpoint.every_steps must be >= 1"),
        (["student.checkpoint.run_name=a/b"], "student.checkpoint.run_name must be a non-empty name"),
        (["student.loss.weighting=learned"], "student.loss.weighting: 'learned' is not one of"),
        (["teacher.per_task={colour: {}}"], "teacher.per_task.colour: unknown task"),
        (["student.per_task={depth: {optimizer: {lr: 1}}}"], "student.per_task: only teachers"),
        (["student.concurrent_runs=2"], "student.concurrent_runs must be"),
        (["student.loss.weights={normals: -1}"], "student.loss.weights.normals must be >= 0"),
        (["student.loss.weights={colour: 1}"], "student.loss.weights.colour: unknown task"),
        (["novalue"], "expected dotted.key=value"),
    ],
)
def test_bad_values_fail_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value)


def test_a_key_at_the_wrong_level_names_where_it_lives():
    with pytest.raises(ConfigError, match=r"student\.lr: unknown key \(did you mean student\.optimizer\.lr\?\)"):
        config_from_dict({}, ["student.lr=0.1"])
    with pytest.raises(ConfigError, match=r"teacher\.max_steps: unknown key \(did you mean teacher\.schedule\.max_steps"):
        config_from_dict({"teacher": {"max_steps": 3}})
    with pytest.raises(ConfigError, match=r"student\.nonsense: unknown key; valid keys here"):
        config_from_dict({}, ["student.nonsense=1"])


def test_teacher_per_task_recipe_merges_over_the_teacher_section():
    from must_ray.config import teacher_config

    cfg = load_config(None, ["teacher.schedule.max_steps=100", "teacher.model.fpn_channels=32",
                             "teacher.schedule.warmup_steps=7",
                             "teacher.per_task={classification: {schedule: {max_steps: 900}, "
                             "model: {fpn_channels: 48}}}"])
    cls = teacher_config(cfg, "classification").teacher
    assert cls.schedule.max_steps == 900 and cls.schedule.warmup_steps == 7  # nested keys merge key by key
    assert cls.model.fpn_channels == 48 and cls.model.backbone == cfg.teacher.model.backbone
    assert cls.per_task == {} and cls.optimizer.lr == cfg.teacher.optimizer.lr
    assert teacher_config(cfg, "depth") is cfg  # no per-task changes: the config itself


def test_bad_yaml_file_errors(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("wrold: {seed: 1}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: wrold: unknown key"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=[x, y]") == ("a", ["x", "y"])
    assert parse_override("a=s3://b/c") == ("a", "s3://b/c")


def test_job_rejects_bad_key_before_work(tmp_path):
    """A job with a typo'd key exits 2 with the key in the message and writes nothing."""
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "make_world.py"), "--split", "test", "--num", "4", "--out", str(out),
         "--set", "world.image_sise=32"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "world.image_sise: unknown key" in proc.stderr
    assert not out.exists()


def test_job_help_explains():
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "make_world.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--config", "--set", "--split", "--num", "--out", "--image-dir"):
        assert flag in proc.stdout
