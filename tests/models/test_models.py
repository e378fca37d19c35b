"""MultiTaskModel (timm backbone + FPN + task heads) and the standalone model file."""
import numpy as np
import pytest
import torch

from must_ray.models import MultiTaskModel, images_to_tensor, load_matching_weights, load_model, save_model
from must_ray.tasks import build_tasks, registered_task_names
from must_ray.tasks.depth import DepthConfig


def _model(tasks=None, **kw):
    names = tasks or registered_task_names()
    return MultiTaskModel("test_resnet", build_tasks(names, 5), fpn_channels=16, **kw)


def test_forward_every_task_and_predict():
    torch.manual_seed(0)
    model = _model().eval()
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        out = model(images_to_tensor(images))
    assert set(out) == set(registered_task_names())
    tasks = build_tasks(registered_task_names(), 5)
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
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing.pt"))
