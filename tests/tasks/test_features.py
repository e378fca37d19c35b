"""The features task (feature distillation, must_ray/tasks/features.py): opt-in, compact float16
cells, a fixed orthonormal projection, per-location standardised labels, a masked cosine +
smooth-L1 loss an adaptor head can fit, and a cosine metric."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from must_ray.config import load_config
from must_ray.pipeline import step_identities, steps, trained_teacher_tasks
from must_ray.table import decode_column
from must_ray.tasks import build_task, default_task_names, registered_task_names
from must_ray.tasks.base import Crop
from must_ray.typed_config import ConfigError


def _labels(task, n=2, channels=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return task.teacher_labels(torch.randn(n, channels, 8, 8, generator=g) * 3 + 1, (64, 64))


def test_features_is_opt_in_and_trains_no_teacher(tmp_path):
    assert "features" in registered_task_names() and "features" not in default_task_names()
    plain = load_config(None, [f"paths.root={tmp_path}"])
    assert "features" not in plain.label.teachers and "teacher_features" not in plain.world.splits
    assert "features" not in plain.world.splits["test"].tasks
    named = load_config(None, [f"paths.root={tmp_path}", "label.teachers.features.kind=backbone",
                               f"label.teachers.features.path={tmp_path}/t.pt"])
    assert trained_teacher_tasks(named) == list(default_task_names())
    a, b = step_identities(plain, steps(1)), step_identities(named, steps(1))
    assert [s for s in a if a[s] != b[s]] == ["label", "student", "evaluate", "transfer"]


def test_cells_are_float16_and_round_trip_through_arrow():
    task = build_task("features", 3)
    labels = _labels(task) + [None]
    cells = [task.encode(lab) for lab in labels]
    assert len(cells[0]["features_map"]) == 4 * 4 * 64 * 2 and cells[0]["features_shape"] == [4, 4, 64]
    table = pa.Table.from_pylist(cells, schema=pa.schema(task.columns()))
    back = decode_column(task, table)
    assert back[2] is None
    for lab, got in zip(labels[:2], back[:2]):
        assert got.dtype == np.float32 and got.shape == (4, 4, 64)
        np.testing.assert_allclose(got, lab, atol=4e-3)


def test_labels_are_projected_by_a_fixed_orthonormal_map_and_standardised():
    task = build_task("features", 3, {"dim": 16})
    p = task.projection(48)
    assert p.shape == (16, 48) and torch.allclose(p @ p.T, torch.eye(16), atol=1e-5)
    assert torch.equal(p, build_task("features", 3, {"dim": 16}).projection(48))
    assert not torch.allclose(p, build_task("features", 3, {"dim": 16, "projection_seed": 1}).projection(48))
    wide = task.projection(8)
    assert wide.shape == (16, 8) and torch.allclose(wide.T @ wide, torch.eye(8), atol=1e-5)
    assert torch.equal(build_task("features", 3, {"dim": 48}).projection(48), torch.eye(48))
    lab = _labels(task)[0]
    assert lab.shape == (4, 4, 16)
    np.testing.assert_allclose(lab.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(lab.std(-1), 1, atol=1e-3)
    assert task.grid((65, 30)) == (5, 2)


def test_loss_is_zero_on_the_label_masks_missing_rows_and_is_learnable():
    task = build_task("features", 3, {"dim": 8})
    labels = _labels(task, 3)
    targets = task.targets([labels[0], None, labels[2]], (64, 64))
    assert targets["features"].shape == (3, 8, 4, 4) and targets["mask"].tolist() == [True, False, True]
    perfect = targets["features"].clone()
    perfect[1] = float("nan")  # garbage in the unlabelled row cannot leak
    assert float(task.loss(perfect, targets)) == pytest.approx(0.0, abs=1e-5)
    out = torch.randn(3, 8, 4, 4, requires_grad=True)
    task.loss(out, targets).backward()
    assert out.grad[1].abs().sum() == 0 and out.grad[0].abs().sum() > 0
    assert float(task.loss(torch.randn(3, 8, 4, 4), task.targets([None] * 3, (64, 64)))) == 0.0
    with pytest.raises(ValueError, match="set tasks.features.dim"):
        task.loss(torch.randn(3, 4, 4, 4), targets)

    from must_ray.models.multitask import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("test_resnet")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(images)
    head = task.build_head(backbone.feature_info.channels(), backbone.feature_info.reduction())
    targets = task.targets(task.teacher_labels(feats[2] * 0.5 + feats[2].roll(1, 1), (64, 64)), (64, 64))
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = task.loss(head(feats), targets)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_augment_metric_and_config():
    task = build_task("features", 3)
    lab = _labels(task)[0]
    flip = Crop(flip=True)
    assert np.array_equal(task.augment(task.augment(lab, flip, (64, 64)), flip, (64, 64)), lab)
    assert task.augment(lab, Crop(0.0, 0.0, 0.5, 0.5), (32, 32)).shape == (2, 2, 64)
    assert task.metric_compute(task.metric_update(task.metric_state(), [lab], [lab]))["cosine"] == pytest.approx(1.0)
    other = _labels(task, seed=1)[0]
    whole = task.metric_update(task.metric_state(), [lab, other], [other, other])
    parts = task.metric_merge(task.metric_update(task.metric_state(), [lab], [other]),
                              task.metric_update(task.metric_state(), [other], [other]))
    assert task.metric_compute(whole) == pytest.approx(task.metric_compute(parts))
    assert task.metric_compute(whole)["cosine"] < 0.9
    for key, value, match in (("stride", 0, "stride must be >= 1"), ("dim", 1, r"dim must be in \[2, 4096\]"),
                              ("l1_weight", -1, "l1_weight must be >= 0")):
        with pytest.raises(ConfigError, match=f"tasks.features.{match}"):
            load_config(None, [f"tasks.features.{key}={value}"])


def test_a_missing_feature_teacher_fails_the_pipeline_before_any_step(tmp_path):
    from must_ray.pipeline import run_pipeline

    cfg = load_config(None, [f"paths.root={tmp_path}/run", "label.teachers.features.kind=backbone",
                             f"label.teachers.features.path={tmp_path}/missing.pt"])
    with pytest.raises(ConfigError, match=r"^label.teachers.features.path: file not found: .*missing.pt \(kind=back"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "world").exists()
