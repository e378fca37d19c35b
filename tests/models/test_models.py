"""MultiTaskModel (timm backbone + FPN + task heads) and the standalone model file."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from must_ray.config import load_config
from must_ray.label.teachers import resolve_teachers
from must_ray.models import (
    ModelFileError,
    MultiTaskModel,
    check_model_file,
    images_to_tensor,
    load_matching_weights,
    load_model,
    save_model,
)
from must_ray.models.export import read_model_header
from must_ray.tasks import build_tasks, default_task_names
from must_ray.tasks.depth import DepthConfig
from must_ray.typed_config import ConfigError
from tests.conftest import REPO


def _model(tasks=None, **kw):
    names = tasks or default_task_names()
    return MultiTaskModel("test_resnet", build_tasks(names, 5), fpn_channels=16, **kw)


def test_forward_every_task_and_predict():
    torch.manual_seed(0)
    model = _model().eval()
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        out = model(images_to_tensor(images))
    assert set(out) == set(default_task_names())
    tasks = build_tasks(default_task_names(), 5)
    for name, task in tasks.items():
        labels = task.predict(out[name], (64, 64))
        assert len(labels) == 2
        if task.dense:
            assert labels[0].shape[:2] == (64, 64)


def test_save_load_roundtrip_is_exact(tmp_path):
    torch.manual_seed(1)
    model = _model(["depth", "classification"]).eval()
    path = save_model(str(tmp_path / "m.pt"), model, num_classes=5, task_cfgs={"depth": DepthConfig(max_depth=9.0)},
                      classes=list("abcde"), image_size=64, fpn_channels=16)
    loaded, info = load_model(path)
    assert info["classes"] == list("abcde") and set(info["tasks"]) == {"depth", "classification"}
    assert info["tasks"]["depth"].cfg.max_depth == 9.0 and len(info["sha256"]) == 64
    x = images_to_tensor(np.full((1, 64, 64, 3), 100, np.uint8))
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a["depth"], b["depth"]) and torch.equal(a["classification"], b["classification"])


def test_partial_init_from_other_model(tmp_path):
    torch.manual_seed(2)
    teacher = _model(["depth"])
    path = save_model(str(tmp_path / "t.pt"), teacher, num_classes=5, task_cfgs={}, fpn_channels=16)
    student = _model(["depth", "segmentation"])
    counts = load_matching_weights(student, path)
    assert counts["loaded"] > 0 and counts["skipped"] > 0
    for k, v in teacher.backbone.state_dict().items():
        assert torch.equal(student.backbone.state_dict()[k], v)


def test_bad_model_file_is_rejected(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"hello": 1}, bad)
    with pytest.raises(ValueError, match="not a must-ray model file"):
        load_model(str(bad))
    with pytest.raises(ModelFileError, match="model file not found"):
        load_model(str(tmp_path / "missing.pt"))


class _NotPlainData:
    pass


def _not_model_files(tmp_path) -> dict[str, str]:
    """Files a user may give as a model by mistake, by kind."""
    real = save_model(str(tmp_path / "real.pt"), _model(["classification"]), num_classes=5, task_cfgs={})
    data = open(real, "rb").read()
    files = {
        "random bytes": np.random.default_rng(0).bytes(4096),
        "truncated": data[: len(data) // 2],
        "empty": b"",
    }
    out = {}
    for kind, content in files.items():
        out[kind] = str(tmp_path / f"{kind.replace(' ', '_')}.pt")
        open(out[kind], "wb").write(content)
    out["plain state_dict"] = str(tmp_path / "state_dict.pt")
    torch.save(_model(["classification"]).state_dict(), out["plain state_dict"])
    out["pickled object"] = str(tmp_path / "object.pt")
    torch.save({"obj": _NotPlainData()}, out["pickled object"])
    return out


def test_a_file_that_is_not_a_model_gets_one_line_naming_it(tmp_path):
    files = _not_model_files(tmp_path)
    target = _model(["classification"])
    for kind, path in files.items():
        for load in (load_model, read_model_header, lambda p: load_matching_weights(target, p),
                     lambda p: check_model_file(p, "--student")):
            with pytest.raises(ModelFileError) as err:
                load(path)
            message = str(err.value)
            assert isinstance(err.value, ConfigError), kind  # the jobs answer it with exit 2
            assert "\n" not in message and path in message and "is not a must-ray model file" in message, message
            assert "model.pt" in message and "weights_only" not in message, message
    assert str(pytest.raises(ModelFileError, check_model_file, files["empty"], "--student").value).startswith(
        f"--student: {files['empty']} is not")


def test_a_teacher_checkpoint_that_is_not_a_model_is_a_config_error(tmp_path):
    path = _not_model_files(tmp_path)["random bytes"]
    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml", [f"label.teachers.depth.path={path}"])
    with pytest.raises(ConfigError) as err:
        resolve_teachers(cfg, ["depth"], 64)
    assert str(err.value).startswith(f"label.teachers.depth: {path} is not a must-ray model file"), err.value
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_evaluate_job_answers_a_non_model_student_with_exit_2(tmp_path):
    path = _not_model_files(tmp_path)["plain state_dict"]
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--student", path, "--no-ray",
                           "--set", f"paths.root={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and f"--student: {path} is not a must-ray model file" in proc.stderr


def test_a_timm_weights_file_initialises_the_backbone(tmp_path):
    """``model.backbone_weights``: a plain timm state-dict file (a classifier's, head included) is
    what the backbone starts from, through timm's own pretrained path; a missing file is named."""
    import timm

    from must_ray.models.multitask import build_backbone

    torch.manual_seed(11)
    donor = timm.create_model("test_resnet")
    torch.save(donor.state_dict(), tmp_path / "resnet.pth")
    loaded = build_backbone("test_resnet", weights_path=str(tmp_path / "resnet.pth")).state_dict()
    shared = [k for k in loaded if k in donor.state_dict()]
    assert len(shared) > 10 and all(torch.equal(loaded[k], donor.state_dict()[k]) for k in shared)
    fresh = build_backbone("test_resnet").state_dict()
    convs = [k for k in shared if loaded[k].ndim == 4]
    assert convs and not any(torch.equal(fresh[k], loaded[k]) for k in convs)  # not the random init
    with pytest.raises(FileNotFoundError, match="backbone weights file not found"):
        build_backbone("test_resnet", weights_path=str(tmp_path / "nope.pth"))
