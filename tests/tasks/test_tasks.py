"""The five task modules: codecs, augmentation, heads, masked losses, predictions and metrics.

Everything runs on real code paths (no mocks): labels go through Parquet-ready cells and pyarrow
tables, heads sit on a real timm ``test_resnet`` at 64x64, and the metrics are checked against
hand-computed values.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from must_ray import table as S
from must_ray.images import encode_png
from must_ray.tasks import (
    TaskConfig,
    build_task,
    get_task_class,
    probe_task_names,
    register_task,
    registered_task_names,
)
from must_ray.tasks.base import Crop
from must_ray.tasks.classification import ClassificationConfig
from must_ray.tasks.depth import DepthConfig
from must_ray.tasks.detection import DetectionConfig, average_precision, center_heatmap, center_targets
from must_ray.tasks.segmentation import SegmentationConfig
from must_ray.typed_config import ConfigError

TASKS = ("classification", "detection", "segmentation", "depth", "normals")
C = 3  # object categories
H = W = 64


# ----------------------------------------------------------------------------- fixtures / helpers


def make_scene(seed: int = 0, h: int = H, w: int = W) -> dict:
    """Ground truth of all five tasks for a toy scene: a floor/wall background and three
    axis-aligned rectangles, object ``i`` of category ``i`` (so a category's mask is one object).
    Objects face the camera tilted right (normal (0.6, 0, 0.8)), stand at 2 + i metres, the
    background recedes from 3 to 9 metres; the top-left corner is invalid for depth/normals/seg."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((h, w), np.uint8)
    depth = np.broadcast_to(np.linspace(9.0, 3.0, h, dtype=np.float32)[:, None], (h, w)).copy()
    normals = np.zeros((h, w, 3), np.float32)
    normals[..., 1] = 1.0
    boxes, classes, areas = [], [], []
    band = w // C
    for c in range(C):  # object c lives in vertical band c: no occlusion, boxes = mask extents
        bw, bh = rng.integers(4, band + 1), rng.integers(6, 24)
        x0, y0 = c * band + rng.integers(0, band - bw + 1), rng.integers(0, h - bh)
        seg[y0:y0 + bh, x0:x0 + bw] = c + 1
        depth[y0:y0 + bh, x0:x0 + bw] = 2.0 + c
        normals[y0:y0 + bh, x0:x0 + bw] = (0.6, 0.0, 0.8)
    for c in range(C):
        ys, xs = np.nonzero(seg == c + 1)
        if len(xs):
            boxes.append([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])
            classes.append(c)
            areas.append(len(xs))
    seg[:3, :3] = 255
    depth[:3, :3] = 0.0
    normals[:3, :3] = 0.0
    label = classes[int(np.argmax(areas))]
    return {
        "classification": {"label": label, "topk_ids": np.array([label], np.int32), "topk_probs": np.array([1.0], np.float32)},
        "detection": {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "classes": np.array(classes, np.int32),
                      "scores": np.ones(len(classes), np.float32)},
        "segmentation": seg,
        "depth": depth,
        "normals": normals,
    }


@pytest.fixture(scope="module")
def tasks():
    return {n: build_task(n, C) for n in TASKS}


@pytest.fixture(scope="module")
def backbone():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", features_only=True, pretrained=False).eval()
    return model


@pytest.fixture(scope="module")
def feats(backbone):
    torch.manual_seed(1)
    with torch.no_grad():
        return [f.detach() for f in backbone(torch.randn(2, 3, H, W))]


def _image_row(i: int) -> dict:
    return {"image_id": f"img{i}", "image": encode_png(np.zeros((4, 4, 3), np.uint8)), "source": "test",
            "height": H, "width": W}


def assert_label_equal(task: str, a, b, exact: bool = True) -> None:
    if task == "classification":
        assert a["label"] == b["label"]
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
        np.testing.assert_array_equal(a["topk_probs"], b["topk_probs"])
        assert a["topk_ids"].dtype == np.int32 and a["topk_probs"].dtype == np.float32
    elif task == "detection":
        for k in ("boxes", "classes", "scores"):
            np.testing.assert_array_equal(a[k], b[k]) if exact else np.testing.assert_allclose(a[k], b[k], atol=1e-6)
        assert a["boxes"].dtype == np.float32 and a["classes"].dtype == np.int32 and a["boxes"].shape[1:] == (4,)
    else:
        np.testing.assert_array_equal(a, b)


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from must_ray.tasks.normals import angular_error_deg

    return angular_error_deg(a, b)


# ----------------------------------------------------------------------------- registry / columns


def test_registry_and_columns():
    assert registered_task_names()[:5] == TASKS
    expected = {
        "classification": [("cls_label", pa.int32()), ("cls_topk_ids", pa.list_(pa.int32())),
                           ("cls_topk_probs", pa.list_(pa.float32()))],
        "detection": [("det_boxes", pa.list_(pa.float32())), ("det_classes", pa.list_(pa.int32())),
                      ("det_scores", pa.list_(pa.float32()))],
        "segmentation": [("seg_png", pa.binary())],
        "depth": [("depth_png", pa.binary()), ("depth_scale", pa.float32())],
        "normals": [("normals_png", pa.binary())],
    }
    for name, cols in expected.items():
        cls = get_task_class(name)
        fields = cls.columns()
        assert [(f.name, f.type) for f in fields] == cols
        assert all(f.nullable for f in fields)
        assert cls.presence_column() == cols[0][0]
        assert cls.dense == (name in ("segmentation", "depth", "normals"))
        task = build_task(name, C)
        assert task.primary_metric in task.metric_compute(task.metric_state())


def test_each_task_owns_its_validated_config():
    for name in TASKS:
        cls = get_task_class(name)
        assert issubclass(cls.config_class, TaskConfig) and isinstance(build_task(name, C).cfg, cls.config_class)
    assert build_task("detection", C, {"max_boxes": 4}).cfg == DetectionConfig(max_boxes=4)
    with pytest.raises(ConfigError, match=r"tasks\.detection\.topk: unknown key; valid keys here: loss_weight, "):
        build_task("detection", C, {"topk": 3})
    with pytest.raises(ConfigError, match=r"tasks\.depth: expected a mapping of DepthConfig knobs"):
        build_task("depth", C, DetectionConfig())
    with pytest.raises(ConfigError, match=r"tasks\.classification\.temperature must be > 0"):
        build_task("classification", C, ClassificationConfig(temperature=0.0))


def test_register_task_checks_the_class():
    class Nameless(get_task_class("depth")):
        name = ""

    class NoConfig(get_task_class("depth")):
        name = "no_config"
        config_class = dict

    for bad, why in ((Nameless, "has no name"), (NoConfig, "config_class must be a dataclass subclassing TaskConfig")):
        with pytest.raises(ValueError, match=why):
            register_task(bad)
    assert "no_config" not in registered_task_names()


def test_probe_targets_follow_each_task(tasks):
    scene = make_scene(1)
    assert probe_task_names() == ("classification", "segmentation", "depth", "normals")
    assert tasks["detection"].probe is None
    y, valid = tasks["classification"].probe_target(scene["classification"])
    assert y.shape == (C,) and y[scene["classification"]["label"]] == 1 and y.sum() == 1 and bool(valid)
    grid = (32, 32)  # keeps a cell of make_scene's invalid 3x3 corner
    for name, k in (("segmentation", C + 1), ("depth", 1), ("normals", 3)):
        y, valid = tasks[name].probe_target(tasks[name].augment(scene[name], Crop(), grid))
        assert y.shape == (*grid, k) and valid.shape == grid and valid.dtype == bool, name
        assert valid.any() and not valid.all(), name
    depth = tasks["depth"].augment(scene["depth"], Crop(), grid)
    y, valid = tasks["depth"].probe_target(depth)
    assert np.allclose(np.exp(y[valid, 0]), depth[valid])  # the head's log-depth space


# ----------------------------------------------------------------------------- codecs


def _roundtrip_through_table(task_names, rows_cells):
    rows = [{**_image_row(i), **cells} for i, cells in enumerate(rows_cells)]
    table = S.rows_to_table(rows, task_names)
    assert S.validate_table(table) == list(task_names)
    return table


@pytest.mark.parametrize("name", TASKS)
def test_encode_decode_roundtrip(name, tasks):
    task = tasks[name]
    labels = [make_scene(s)[name] for s in range(3)]
    if name == "detection":
        labels.append({"boxes": np.zeros((0, 4), np.float32), "classes": np.zeros(0, np.int32),
                       "scores": np.zeros(0, np.float32)})
    cells = [task.encode(lab) for lab in labels] + [task.encode(None)]
    assert cells[-1] == task.null_cells()
    table = _roundtrip_through_table([name], cells)
    pyrows = table.to_pylist()  # lists as Python lists, binaries as bytes
    pdrows = table.to_pandas().to_dict("records")  # lists as numpy arrays (as Ray Data hands them over)
    for rows in (pyrows, pdrows):
        decoded = [task.decode({f.name: r[f.name] for f in task.columns()}) for r in rows]
        assert decoded[-1] is None
        for lab, dec in zip(labels, decoded[:-1]):
            if name in ("classification", "detection", "segmentation"):
                assert_label_equal(name, dec, lab)
            elif name == "depth":
                assert dec.dtype == np.float32 and dec.shape == lab.shape
                assert np.array_equal(dec > 0, lab > 0)
                assert np.abs(dec - lab).max() <= task.cfg.depth_scale * 0.5 + 1e-6
            else:
                assert dec.dtype == np.float32 and dec.shape == lab.shape
                valid = np.linalg.norm(lab, axis=-1) > 0.5
                assert np.array_equal(np.linalg.norm(dec, axis=-1) > 0.5, valid)
                assert _angles(dec[valid], lab[valid]).max() < 1.0
    if name == "detection":  # no boxes is an empty label, not a missing one
        assert pyrows[3]["det_boxes"] == [] and pyrows[4]["det_boxes"] is None


def test_decode_accepts_numpy_lists_and_pyarrow_scalars(tasks):
    cls_cells = {"cls_label": np.int32(2), "cls_topk_ids": np.array([2, 0], np.int32),
                 "cls_topk_probs": np.array([0.75, 0.25], np.float32)}
    lab = tasks["classification"].decode(cls_cells)
    assert lab["label"] == 2 and lab["topk_ids"].tolist() == [2, 0] and lab["topk_probs"].tolist() == [0.75, 0.25]
    det_cells = {"det_boxes": pa.scalar([0.0, 0.25, 0.5, 0.75], pa.list_(pa.float32())),
                 "det_classes": np.array([1]), "det_scores": [0.5]}
    lab = tasks["detection"].decode(det_cells)
    assert lab["boxes"].tolist() == [[0.0, 0.25, 0.5, 0.75]] and lab["classes"].tolist() == [1]
    seg = make_scene(0)["segmentation"]
    cell = tasks["segmentation"].encode(seg)["seg_png"]
    assert np.array_equal(tasks["segmentation"].decode({"seg_png": memoryview(cell)}), seg)
    # depth decodes with the row's own scale, not the decoding task's config
    coarse = build_task("depth", C, DepthConfig(depth_scale=0.01))
    depth = make_scene(0)["depth"]
    cells = coarse.encode(depth)
    dec = build_task("depth", 1).decode(cells)
    assert np.abs(dec - depth).max() <= 0.005 + 1e-6
    assert all(tasks[n].decode(tasks[n].null_cells()) is None for n in TASKS)


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("name", TASKS)
def test_perfect_prediction_gives_perfect_metric(name, tasks):
    task = tasks[name]
    gts = [make_scene(s)[name] for s in range(3)] + [None]
    preds = list(gts[:3]) + [make_scene(9)[name]]  # the last row has no ground truth: skipped
    m = task.metric_compute(task.metric_update(task.metric_state(), preds, gts))
    expected = {
        "classification": {"top1": 1.0},
        "detection": {"map50": 1.0, "map": 1.0},
        "segmentation": {"miou": 1.0, "pixel_acc": 1.0},
        "depth": {"abs_rel": 0.0, "delta1": 1.0},
        "normals": {"mean_angle": 0.0, "within_11_25": 100.0},
    }[name]
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-6), (k, m)


@pytest.mark.parametrize("name", TASKS)
def test_metric_merge_equals_single_pass(name, tasks):
    task = tasks[name]
    gts = [make_scene(s)[name] for s in range(4)]
    preds = [make_scene(s + 10)[name] for s in range(4)]
    whole = task.metric_compute(task.metric_update(task.metric_state(), preds, gts))
    a = task.metric_update(task.metric_state(), preds[:1], gts[:1])
    b = task.metric_update(task.metric_state(), preds[1:], gts[1:])
    merged = task.metric_compute(task.metric_merge(a, b))
    assert merged == pytest.approx(whole)
    # the trivial baseline is valid input and no better than perfect
    trivial = task.trivial_prediction(gts + [None])
    assert trivial[-1] is None
    task.metric_compute(task.metric_update(task.metric_state(), trivial, gts + [None]))


def test_map_hand_computed(tasks):
    task = tasks["detection"]
    gt = {"boxes": np.array([[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0]], np.float32), "classes": np.array([0, 0])}
    pred = {
        "boxes": np.array([[0.0, 0.0, 0.4, 0.4],     # IoU 1 with gt 0
                           [0.0, 0.6, 0.3, 0.9],     # IoU 0 with both
                           [0.5, 0.5, 1.0, 0.86]],   # IoU 0.72 with gt 1
                          np.float32),
        "classes": np.array([0, 0, 0]), "scores": np.array([0.9, 0.8, 0.7], np.float32),
    }
    m = task.metric_compute(task.metric_update(task.metric_state(), [pred], [gt]))
    # IoU <= 0.7: precisions 1, 1/2, 2/3 at recalls 1/2, 1/2, 1 -> envelope 1 up to recall 0.5
    # (51 of the 101 points), 2/3 above (50 points).
    ap_low = (51 * 1.0 + 50 * 2 / 3) / 101
    ap_high = 51 / 101  # IoU >= 0.75: only recall 0.5 is reached
    assert m["map50"] == pytest.approx(ap_low)
    assert m["map"] == pytest.approx((5 * ap_low + 5 * ap_high) / 10)
    # a second class with ground truth but no detection averages in as AP 0; detections of a
    # class without ground truth are ignored
    gt2 = {"boxes": np.array([[0.1, 0.1, 0.2, 0.2]], np.float32), "classes": np.array([1])}
    stray = {"boxes": np.array([[0.1, 0.1, 0.2, 0.2]], np.float32), "classes": np.array([2]), "scores": np.array([0.9])}
    state = task.metric_update(task.metric_state(), [pred, stray], [gt, gt2])
    assert task.metric_compute(state)["map50"] == pytest.approx(ap_low / 2)
    # duplicates: the second detection of a matched object is a false positive
    assert average_precision(np.array([1.0, 0.0]), 1) == pytest.approx(1.0)
    assert average_precision(np.array([0.0, 1.0]), 1) == pytest.approx(0.5)
    # a missing prediction counts as no detections
    assert task.metric_compute(task.metric_update(task.metric_state(), [None], [gt]))["map50"] == 0.0


def test_miou_hand_computed():
    gt = np.array([[0, 0, 1], [1, 1, 255]], np.uint8)
    pred = np.array([[0, 1, 1], [1, 0, 0]], np.uint8)
    for num_classes in (1, 3):  # classes absent from gt and prediction do not count
        task = build_task("segmentation", num_classes)
        m = task.metric_compute(task.metric_update(task.metric_state(), [pred], [gt]))
        # class 0: tp 1, union 2 + 2 - 1 = 3; class 1: tp 2, union 3 + 3 - 2 = 4
        assert m["miou"] == pytest.approx((1 / 3 + 1 / 2) / 2)
        assert m["pixel_acc"] == pytest.approx(3 / 5)
    # an ignored (255) prediction is a miss of the true class, not a hit of any other
    task = build_task("segmentation", 1)
    m = task.metric_compute(task.metric_update(task.metric_state(), [np.array([[255, 1]], np.uint8)],
                                               [np.array([[1, 1]], np.uint8)]))
    assert m["miou"] == pytest.approx(0.5) and m["pixel_acc"] == pytest.approx(0.5)


def test_depth_and_normals_hand_computed(tasks):
    depth = tasks["depth"]
    gt = np.array([[2.0, 4.0, 0.0]], np.float32)
    pred = np.array([[2.2, 2.0, 5.0]], np.float32)
    m = depth.metric_compute(depth.metric_update(depth.metric_state(), [pred], [gt]))
    assert m["abs_rel"] == pytest.approx((0.1 + 0.5) / 2)
    assert m["delta1"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(math.sqrt((0.04 + 4.0) / 2))
    m = depth.metric_compute(depth.metric_update(depth.metric_state(), [np.zeros_like(gt)], [gt]))
    assert m["delta1"] == 0.0 and m["abs_rel"] == pytest.approx(1.0, abs=1e-5)

    normals = tasks["normals"]
    gt = np.zeros((2, 2, 3), np.float32)
    gt[..., 2] = 1.0
    gt[1, 1] = 0.0  # invalid: not scored
    pred = np.zeros((2, 2, 3), np.float32)
    pred[..., 0] = 1.0
    m = normals.metric_compute(normals.metric_update(normals.metric_state(), [pred], [gt]))
    assert m["mean_angle"] == pytest.approx(90.0)
    assert m["median_angle"] == pytest.approx(90.0, abs=0.05)
    assert m["within_11_25"] == 0.0
    pred[0, 0] = (0.0, math.sin(math.radians(10)), math.cos(math.radians(10)))
    m = normals.metric_compute(normals.metric_update(normals.metric_state(), [pred], [gt]))
    assert m["mean_angle"] == pytest.approx((10 + 90 + 90) / 3)
    assert m["within_11_25"] == pytest.approx(100 / 3)


def test_normals_zero_prediction_counts_as_90_degrees(tasks):
    """atan2(0, 0) = 0: a zero (directionless) predicted vector must not score as a perfect hit."""
    normals = tasks["normals"]
    gt = np.zeros((3, 4, 3), np.float32)
    gt[..., 2] = 1.0
    gt[0, :2] = (0.0, 1.0, 0.0)
    m = normals.metric_compute(normals.metric_update(normals.metric_state(), [np.zeros_like(gt)], [gt]))
    assert m["mean_angle"] == pytest.approx(90.0) and m["median_angle"] == pytest.approx(90.0, abs=0.05)
    assert m["within_11_25"] == 0.0 and m["within_30"] == 0.0
    assert _angles(np.zeros(3), np.array([0.0, 0.0, 1.0])) == pytest.approx(90.0)
    assert _angles(np.array([0.0, 0.0, 2.0]), np.array([0.0, 0.0, 1.0])) == pytest.approx(0.0)
    raw = torch.zeros(1, 3, 3, 4)  # a head that outputs nothing: postprocess keeps it zero
    pred = normals.postprocess(raw)[0]
    m = normals.metric_compute(normals.metric_update(normals.metric_state(), [pred], [gt]))
    assert m["mean_angle"] == pytest.approx(90.0) and m["within_11_25"] == 0.0


def test_classification_metric_and_trivial(tasks):
    task = tasks["classification"]
    gts = [{"label": 1}, {"label": 1}, {"label": 2}, None]
    preds = [{"label": 1, "topk_ids": [1, 2]}, {"label": 2, "topk_ids": [2, 1]}, None, {"label": 0}]
    m = task.metric_compute(task.metric_update(task.metric_state(), preds, gts))
    assert m["top1"] == pytest.approx(1 / 3) and m["top5"] == pytest.approx(2 / 3)
    trivial = task.trivial_prediction(gts)
    assert [t["label"] for t in trivial[:3]] == [1, 1, 1] and trivial[3] is None


def test_trivial_predictions_dense(tasks):
    seg = [np.array([[0, 1, 1], [2, 255, 255]], np.uint8), np.array([[1]], np.uint8)]
    out = tasks["segmentation"].trivial_prediction(seg)
    assert out[0].shape == (2, 3) and out[1].shape == (1, 1) and (out[0] == 1).all()
    depth = [np.array([[1.0, 0.0], [3.0, 0.0]], np.float32)]
    assert np.allclose(tasks["depth"].trivial_prediction(depth)[0], 2.0)
    n = np.zeros((1, 2, 3), np.float32)
    n[0, 0] = (1, 0, 0)
    n[0, 1] = (0, 1, 0)
    out = tasks["normals"].trivial_prediction([n])[0]
    assert np.allclose(out, np.array([1, 1, 0]) / math.sqrt(2), atol=1e-6)
    assert tasks["detection"].trivial_prediction([make_scene(0)["detection"]])[0]["boxes"].shape == (0, 4)


# ----------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("name", TASKS)
def test_flip_twice_is_identity(name, tasks):
    task = tasks[name]
    label = make_scene(3)[name]
    flip = Crop(flip=True)
    once = task.augment(label, flip, (H, W))
    twice = task.augment(once, flip, (H, W))
    assert_label_equal(name, twice, label, exact=False)
    assert task.augment(None, flip, (H, W)) is None
    if name in ("segmentation", "depth", "normals"):
        assert not np.array_equal(once, label)


def test_crop_flip_moves_all_labels_together(tasks):
    scene = make_scene(5)
    crop = Crop(0.1, 0.2, 0.8, 0.9, flip=True)
    out = {n: tasks[n].augment(scene[n], crop, (48, 40)) for n in TASKS}
    seg, depth, normals, det = out["segmentation"], out["depth"], out["normals"], out["detection"]
    assert seg.shape == (48, 40) and depth.shape == (48, 40) and normals.shape == (48, 40, 3)
    assert out["classification"] == scene["classification"]
    for box, c in zip(det["boxes"], det["classes"]):
        ys, xs = np.nonzero(seg == c + 1)
        mask_box = np.array([xs.min() / 40, ys.min() / 48, (xs.max() + 1) / 40, (ys.max() + 1) / 48])
        np.testing.assert_allclose(box, mask_box, atol=1.01 / 40)
        assert np.allclose(depth[seg == c + 1], 2.0 + c)
        # surfaces facing right face left in the mirror
        assert np.allclose(normals[seg == c + 1], (-0.6, 0.0, 0.8))
    # invalid pixels (seg 255) stay invalid together in every dense label
    invalid = seg == 255
    assert np.array_equal(depth == 0, invalid) and np.array_equal(np.linalg.norm(normals, axis=-1) == 0, invalid)
    # objects whose visible part leaves the window are dropped
    visible = {c for c in range(C) if (seg == c + 1).sum() > 0}
    assert set(det["classes"].tolist()) <= visible


def test_detection_augment_drops_and_flips_boxes(tasks):
    task = tasks["detection"]
    label = {"boxes": np.array([[0.0, 0.0, 0.2, 0.2], [0.4, 0.4, 0.6, 0.6], [0.45, 0.1, 0.55, 0.3]], np.float32),
             "classes": np.array([0, 1, 2])}
    out = task.augment(label, Crop(0.5, 0.0, 1.0, 1.0, flip=True), (64, 64))
    # box 0 is outside; box 1 keeps half its area -> kept; box 2 keeps half -> kept
    assert out["classes"].tolist() == [1, 2]
    np.testing.assert_allclose(out["boxes"][0], [0.8, 0.4, 1.0, 0.6], atol=1e-6)
    np.testing.assert_allclose(out["boxes"][1], [0.9, 0.1, 1.0, 0.3], atol=1e-6)
    out = task.augment(label, Crop(0.53, 0.0, 1.0, 1.0), (64, 64))
    assert out["classes"].tolist() == [1]  # box 1 keeps 35% of its area, box 2 only 20%
    tiny = {"boxes": np.array([[0.5, 0.5, 0.505, 0.505]], np.float32), "classes": np.array([0])}
    assert len(task.augment(tiny, Crop(0.0, 0.0, 1.0, 1.0, flip=True), (64, 64))["boxes"]) == 0


# ----------------------------------------------------------------------------- predict


def test_detection_predict_two_peaks():
    task = build_task("detection", 2)
    hm = torch.full((1, 2, 16, 16), -10.0)
    size = torch.zeros((1, 2, 16, 16))
    off = torch.full((1, 2, 16, 16), 0.5)
    hm[0, 0, 4, 3] = 2.0     # sigmoid 0.881
    hm[0, 1, 10, 12] = 0.0   # sigmoid 0.5
    hm[0, 0, 1, 1] = -2.0    # sigmoid 0.119 < score_threshold 0.3
    size[0, :, 4, 3] = math.log(2.0)  # 2 cells = 8 px
    size[0, 0, 10, 12], size[0, 1, 10, 12] = math.log(1.0), math.log(4.0)
    (pred,) = task.predict({"heatmap": hm, "size": size, "offset": off}, (H, W))
    assert pred["classes"].tolist() == [0, 1]
    np.testing.assert_allclose(pred["scores"], [1 / (1 + math.exp(-2)), 0.5], rtol=1e-5)
    np.testing.assert_allclose(pred["boxes"][0], np.array([2.5, 3.5, 4.5, 5.5]) / 16, atol=1e-6)
    np.testing.assert_allclose(pred["boxes"][1], np.array([12.0, 8.5, 13.0, 12.5]) / 16, atol=1e-6)
    assert pred["boxes"].dtype == np.float32 and pred["classes"].dtype == np.int32

    # class-wise NMS: two peaks of one class with heavily overlapping boxes -> the better one
    hm = torch.full((1, 2, 16, 16), -10.0)
    hm[0, 0, 8, 6], hm[0, 0, 8, 8] = 3.0, 1.0
    hm[0, 1, 8, 8] = 1.0  # other class, same box: kept
    size = torch.full((1, 2, 16, 16), math.log(8.0))
    (pred,) = task.predict({"heatmap": hm, "size": size, "offset": off}, (H, W))
    assert sorted(pred["classes"].tolist()) == [0, 1] and pred["scores"][0] > 0.9
    assert (pred["boxes"] >= 0).all() and (pred["boxes"] <= 1).all()  # clipped

    # at most max_boxes, best first
    task = build_task("detection", 2, DetectionConfig(max_boxes=3))
    hm = torch.full((1, 2, 16, 16), -10.0)
    for i in range(6):
        hm[0, 0, 2 * i + 1, 2] = float(i)
    (pred,) = task.predict({"heatmap": hm, "size": torch.zeros(1, 2, 16, 16), "offset": off}, (H, W))
    assert len(pred["boxes"]) == 3 and list(pred["scores"]) == sorted(pred["scores"], reverse=True)


def test_detection_targets_are_representable_small_objects(tasks):
    """Ideal head outputs built from the targets decode back to the boxes: 2x2-pixel objects and
    objects in neighbouring grid cells survive the stride-4 grid."""
    task = tasks["detection"]
    px = 1 / 64
    label = {"boxes": np.array([[10 * px, 10 * px, 12 * px, 12 * px],   # 2x2 px
                                [14 * px, 10 * px, 17 * px, 13 * px],   # neighbouring cell
                                [30 * px, 20 * px, 62 * px, 60 * px]], np.float32),
             "classes": np.array([0, 0, 2])}
    t = task.targets([label, None], (H, W))
    grid = (16, 16)
    heat = center_heatmap(t["boxes"], t["classes"], t["valid"], C, grid)
    assert heat.shape == (2, C, 16, 16) and int((heat == 1).sum()) == 3 and heat[1].sum() == 0
    ct = center_targets(t["boxes"], t["valid"], grid)
    hm = torch.where(heat >= 1, 10.0, -10.0)
    size = torch.zeros(2, 2, 256)
    off = torch.zeros(2, 2, 256)
    for j in range(3):
        size[0, :, ct["ind"][0, j]] = ct["log_size"][0, j]
        off[0, :, ct["ind"][0, j]] = ct["offset"][0, j]
    outputs = {"heatmap": hm, "size": size.view(2, 2, 16, 16), "offset": off.view(2, 2, 16, 16)}
    pred = task.predict(outputs, (H, W))
    order = np.argsort(pred[0]["boxes"][:, 0])
    np.testing.assert_allclose(pred[0]["boxes"][order], label["boxes"], atol=1e-5)
    assert pred[0]["classes"][order].tolist() == [0, 0, 2] and len(pred[1]["boxes"]) == 0
    # and the ideal outputs have a lower loss than the initial-bias ones
    assert task.loss(outputs, t) < task.loss({k: torch.zeros_like(v) - (k == "heatmap") * 2.2 for k, v in outputs.items()}, t)


def test_classification_predict_temperature_topk():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    for temperature, topk in ((1.0, 2), (4.0, 3), (0.5, 10)):
        task = build_task("classification", 4, ClassificationConfig(temperature=temperature, topk=topk))
        preds = task.predict(logits, (H, W))
        for p, row in zip(preds, logits):
            k = min(topk, 4)
            assert len(p["topk_ids"]) == k and p["topk_ids"].dtype == np.int32
            assert p["label"] == int(row.argmax()) == p["topk_ids"][0]
            assert np.all(np.diff(p["topk_probs"]) <= 0) and p["topk_probs"].sum() <= 1 + 1e-6
            expected = torch.softmax(row / temperature, 0).sort(descending=True).values[:k].numpy()
            np.testing.assert_allclose(p["topk_probs"], expected, rtol=1e-5)
    # a higher temperature flattens the distribution
    hot = build_task("classification", 4, ClassificationConfig(temperature=4.0)).predict(logits, (H, W))[0]
    cold = build_task("classification", 4, ClassificationConfig(temperature=1.0)).predict(logits, (H, W))[0]
    assert hot["topk_probs"][0] < cold["topk_probs"][0]


def test_dense_predict_postprocessing():
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 1, :, :2] = 5.0  # confident class 1 on the left
    logits[0, 2, :, 2:] = 0.5  # unsure class 2 on the right (p ~ 0.45)
    seg = build_task("segmentation", 2, SegmentationConfig(confidence_threshold=0.6)).predict(logits, (4, 4))[0]
    assert seg.dtype == np.uint8 and (seg[:, :2] == 1).all() and (seg[:, 2:] == 255).all()
    seg = build_task("segmentation", 2).predict(logits, (8, 8))[0]  # threshold 0: no ignore
    assert seg.shape == (8, 8) and (seg[:, :3] == 1).all() and (seg[:, 5:] == 2).all()  # bilinear border

    depth_task = build_task("depth", C, DepthConfig(max_depth=10.0))
    out = torch.tensor([[[[math.log(2.0), 50.0], [-50.0, 0.0]]]])
    d = depth_task.predict(out, (2, 2))[0]
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, [[2.0, 10.0], [depth_task.cfg.depth_scale, 1.0]], rtol=1e-5)

    n = build_task("normals", C).predict(torch.randn(2, 3, 5, 5), (10, 10))
    assert n[0].shape == (10, 10, 3) and np.allclose(np.linalg.norm(n[0], axis=-1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- heads and losses


def _outputs(task, head, feats):
    out = head(feats)
    tensors = out.values() if isinstance(out, dict) else [out]
    for t in tensors:
        t.retain_grad()
    return out, list(tensors)


@pytest.mark.parametrize("name", TASKS)
def test_head_on_timm_backbone_feeds_loss_and_predict(name, tasks, backbone, feats):
    task = tasks[name]
    torch.manual_seed(0)
    head = task.build_head(backbone.feature_info.channels(), backbone.feature_info.reduction())
    out, _ = _outputs(task, head, feats)
    labels = [make_scene(0)[name], make_scene(1)[name]]
    loss = task.loss(out, task.targets(labels, (H, W)))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    head.eval()
    with torch.no_grad():
        preds = task.predict(head(feats), (H, W))
    assert len(preds) == 2
    for p in preds:  # predictions are labels: they encode, decode and score
        back = task.decode(task.encode(p))
        assert back is not None
        if name in ("segmentation", "depth", "normals"):
            assert np.asarray(p).shape[:2] == (H, W)
    task.metric_compute(task.metric_update(task.metric_state(), preds, labels))


@pytest.mark.parametrize("name", TASKS)
def test_head_on_fpn_pyramid(name, tasks):
    """The model's FPN neck feeds equal channels at strides 4..32."""
    task = tasks[name]
    pyramid = [torch.randn(2, 16, H // s, W // s) for s in (4, 8, 16, 32)]
    head = task.build_head([16] * 4, [4, 8, 16, 32])
    out = head(pyramid)
    loss = task.loss(out, task.targets([make_scene(2)[name], None], (H, W)))
    loss.backward()
    assert torch.isfinite(loss)
    assert len(task.predict(out, (H, W))) == 2


@pytest.mark.parametrize("name", TASKS)
def test_loss_masking(name, tasks, backbone, feats):
    task = tasks[name]
    torch.manual_seed(0)
    head = task.build_head(backbone.feature_info.channels(), backbone.feature_info.reduction())

    # no labelled row: a differentiable zero, zero gradient everywhere, every parameter reached
    out, _ = _outputs(task, head, feats)
    loss = task.loss(out, task.targets([None, None], (H, W)))
    assert loss.requires_grad and float(loss.detach()) == 0.0
    loss.backward()
    for p in head.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0

    # one labelled, one unlabelled row: the unlabelled row's outputs get exactly zero gradient
    head.zero_grad()
    out, tensors = _outputs(task, head, feats)
    targets = task.targets([make_scene(0)[name], None], (H, W))
    loss = task.loss(out, targets)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for t in tensors:
        assert torch.count_nonzero(t.grad[1]) == 0
        assert torch.count_nonzero(t.grad[0]) > 0
    # and the loss equals that of the labelled row alone (unlabelled rows contribute nothing)
    with torch.no_grad():
        out2 = head(feats)
        single = {k: v[:1] for k, v in out2.items()} if isinstance(out2, dict) else out2[:1]
        t1 = task.targets([make_scene(0)[name]], (H, W))
        assert float(task.loss(out2, targets)) == pytest.approx(float(task.loss(single, t1)), rel=1e-5)

    # garbage in the unlabelled row cannot leak into the loss
    bad = {k: v.clone() for k, v in out2.items()} if isinstance(out2, dict) else out2.clone()
    for t in (bad.values() if isinstance(bad, dict) else [bad]):
        t[1] = float("nan")
    assert float(task.loss(bad, targets)) == pytest.approx(float(task.loss(single, t1)), rel=1e-5)


@pytest.mark.parametrize("name", TASKS)
def test_loss_decreases_when_training_the_head(name, tasks, backbone, feats):
    """A few Adam steps on fixed features fit the labels: the losses are learnable."""
    task = tasks[name]
    torch.manual_seed(0)
    head = task.build_head(backbone.feature_info.channels(), backbone.feature_info.reduction())
    targets = task.targets([make_scene(0)[name], make_scene(1)[name]], (H, W))
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = task.loss(head(feats), targets)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_soft_targets(tasks):
    task = tasks["classification"]
    t = task.targets([{"label": 1, "topk_ids": [1, 2], "topk_probs": [0.3, 0.1]}, None,
                      {"label": 0, "topk_ids": [0], "topk_probs": [0.0]}], (H, W))
    np.testing.assert_allclose(t["probs"].numpy(), [[0, 0.75, 0.25], [0, 0, 0], [1, 0, 0]], atol=1e-6)
    assert t["mask"].tolist() == [True, False, True]
    # a perfectly confident prediction of a one-hot label has (almost) zero loss
    logits = torch.tensor([[-20.0, 20.0, -20.0]])
    assert float(task.loss(logits, task.targets([{"label": 1}], (H, W)))) < 1e-6
