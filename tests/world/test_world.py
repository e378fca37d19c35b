"""The synthetic world renderer: buffer and label forms, determinism, and that every label agrees
with the others and with the geometry (boxes tight, segmentation inside boxes, normals = depth
gradient). The renderer returns raw buffers only; the labels are each task's ``world_label``."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from must_ray.tasks import build_tasks, default_task_names
from must_ray.world import (
    CATEGORIES,
    DOMAINS,
    MIN_VISIBLE_PIXELS,
    NUM_CATEGORIES,
    render_batch,
    render_scenes,
    sample_scene,
)
from must_ray.world.labels import render_labelled, scene_labels

SEED = 7
SIZE = 64
BUFFERS = {"image", "depth", "normals", "instances", "instance_categories", "instance_pixels", "instance_boxes",
           "instance_visible", "meta"}


@pytest.fixture(scope="module")
def scenes():
    return render_labelled(SEED, range(48), image_size=SIZE)


def _arrays(scene):
    """Every array of a scene dict, flattened to (name, array) pairs."""
    out = []
    for key, value in scene.items():
        if isinstance(value, dict):
            out += [(f"{key}.{k}", v) for k, v in value.items() if isinstance(v, np.ndarray)]
        elif isinstance(value, np.ndarray):
            out.append((key, value))
    return out


def test_the_renderer_returns_raw_buffers_only():
    for s in render_scenes(SEED, range(8), SIZE):
        assert set(s) == BUFFERS  # no task's label: tasks derive them (Task.world_label)
        n = s["meta"]["num_objects"]
        assert s["instance_categories"].dtype == np.int32 and s["instance_categories"].shape == (n,)
        assert s["instance_categories"].tolist() == [CATEGORIES.index(o["category"]) for o in s["meta"]["objects"]]
        inst = s["instances"]
        assert np.array_equal(s["instance_pixels"], np.bincount(inst[inst >= 0], minlength=n))
        assert np.array_equal(s["instance_visible"], s["instance_pixels"] >= MIN_VISIBLE_PIXELS)
        assert s["instance_boxes"].dtype == np.float32 and s["instance_boxes"].shape == (n, 4)


def test_label_forms(scenes):
    for s in scenes[:8]:
        assert s["image"].dtype == np.uint8 and s["image"].shape == (SIZE, SIZE, 3)
        c = s["classification"]
        assert isinstance(c["label"], int) and 0 <= c["label"] < NUM_CATEGORIES
        assert c["topk_ids"].dtype == np.int32 and c["topk_ids"].tolist() == [c["label"]]
        assert c["topk_probs"].dtype == np.float32 and c["topk_probs"].tolist() == [1.0]
        det = s["detection"]
        n = len(det["classes"])
        assert det["boxes"].dtype == np.float32 and det["boxes"].shape == (n, 4)
        assert det["classes"].dtype == np.int32 and det["scores"].dtype == np.float32
        assert np.all(det["scores"] == 1.0) and np.all((det["boxes"] >= 0) & (det["boxes"] <= 1))
        assert np.all(det["boxes"][:, 2:] > det["boxes"][:, :2])
        assert s["segmentation"].dtype == np.uint8 and s["segmentation"].shape == (SIZE, SIZE)
        assert s["segmentation"].max() <= NUM_CATEGORIES
        assert s["depth"].dtype == np.float32 and s["depth"].shape == (SIZE, SIZE)
        assert s["normals"].dtype == np.float32 and s["normals"].shape == (SIZE, SIZE, 3)
        assert s["instances"].dtype == np.int32 and s["instances"].shape == (SIZE, SIZE)
        assert s["meta"]["num_objects"] == len(s["meta"]["objects"]) and s["meta"]["domain"] == "default"
        json.dumps(s["meta"])  # plain Python types only
    assert CATEGORIES == ("sphere", "box", "cylinder", "cone", "torus")


def test_determinism_and_batch_independence(scenes):
    again = render_labelled(SEED, [11, 3, 40, 0], image_size=SIZE)  # other order, other batch
    tasks = build_tasks(default_task_names(), NUM_CATEGORIES)
    alone = [{**b, **scene_labels(b, tasks)} for b in render_batch([sample_scene(SEED, 40)], SIZE)]  # batch of one
    for a, idx in list(zip(again, [11, 3, 40, 0])) + [(alone[0], 40)]:
        ref = scenes[idx]
        for (name, x), (_, y) in zip(_arrays(a), _arrays(ref)):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (idx, name)
        assert a["meta"] == ref["meta"] and a["classification"]["label"] == ref["classification"]["label"]
    assert scenes[0]["image"].tobytes() != scenes[1]["image"].tobytes()
    other_seed = render_scenes(SEED + 1, [0], SIZE)[0]
    assert other_seed["image"].tobytes() != scenes[0]["image"].tobytes()


def test_scene_does_not_depend_on_image_size():
    small, big = render_scenes(SEED, [5], 32)[0], render_scenes(SEED, [5], 96)[0]
    assert small["meta"]["objects"] == big["meta"]["objects"]
    assert small["meta"]["camera"]["position"] == big["meta"]["camera"]["position"]


def test_boxes_are_tight(scenes):
    for s in scenes:
        inst, det = s["instances"], s["detection"]
        cats = [CATEGORIES.index(o["category"]) for o in s["meta"]["objects"]]
        counts = np.bincount(inst[inst >= 0], minlength=len(cats))
        with_box = [k for k in range(len(cats)) if counts[k] >= 4]
        assert len(with_box) == len(det["boxes"])
        for k, box, cls in zip(with_box, det["boxes"], det["classes"]):
            ys, xs = np.nonzero(inst == k)
            expect = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert np.array_equal(np.rint(box * SIZE).astype(int), expect)
            assert np.allclose(box * SIZE, expect, atol=1e-4)
            assert cls == cats[k]


def test_segmentation_agrees_with_boxes_and_instances(scenes):
    for s in scenes:
        seg, inst, det = s["segmentation"], s["instances"], s["detection"]
        cats = np.array([CATEGORIES.index(o["category"]) for o in s["meta"]["objects"]] + [-1])
        assert np.array_equal(seg, (cats[inst] + 1).astype(np.uint8))  # inst -1 -> cats[-1] = -1 -> 0
        counts = np.bincount(inst[inst >= 0], minlength=len(cats))
        covered = np.zeros_like(seg, dtype=bool)
        for box, c in zip(np.rint(det["boxes"] * SIZE).astype(int), det["classes"]):
            x0, y0, x1, y1 = box
            inside = seg[y0:y1, x0:x1] == c + 1
            assert inside.any()
            covered[y0:y1, x0:x1] |= inside
        # Every labelled pixel lies in a box of its class, unless its instance is too small for one.
        uncovered = (seg > 0) & ~covered
        assert np.all(counts[inst[uncovered]] < 4)


def _normals_from_depth(s):
    """Camera-frame normals from the cross product of neighbouring back-projected points."""
    d = s["depth"].astype(np.float64)
    t = math.tan(math.radians(s["meta"]["camera"]["fov_deg"]) / 2)
    c = ((np.arange(SIZE) + 0.5) * 2 / SIZE - 1) * t
    pts = np.stack([c[None, :] * d, -c[:, None] * d, -d], axis=-1)
    n = np.cross(pts[2:, 1:-1] - pts[:-2, 1:-1], pts[1:-1, 2:] - pts[1:-1, :-2])  # down x right = toward viewer
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def test_normals_agree_with_depth_gradient(scenes):
    room, objects = [], []
    for s in scenes[:24]:
        n, inst = s["normals"], s["instances"]
        centre_n, centre_i = n[1:-1, 1:-1], inst[1:-1, 1:-1]
        smooth = np.ones(centre_i.shape, dtype=bool)  # 3x3 on one surface: same instance, no crease
        for a in range(3):
            for b in range(3):
                smooth &= inst[a:a + SIZE - 2, b:b + SIZE - 2] == centre_i
                smooth &= (n[a:a + SIZE - 2, b:b + SIZE - 2] * centre_n).sum(-1) > math.cos(math.radians(25))
        cos = np.clip((_normals_from_depth(s) * centre_n).sum(-1), -1, 1)
        err = np.degrees(np.arccos(cos))
        room.append(err[smooth & (centre_i < 0)])
        objects.append(err[smooth & (centre_i >= 0)])
    room, objects = np.concatenate(room), np.concatenate(objects)
    assert room.size > 10000 and objects.size > 1000
    assert np.median(room) < 0.5 and np.percentile(room, 99) < 2.0
    assert np.median(objects) < 3.0


def test_depth_and_normals_are_valid(scenes):
    nz_positive = []
    for s in scenes:
        d, n = s["depth"], s["normals"]
        assert np.all(d > 0) and np.all(d < 20) and np.all(np.isfinite(d))
        assert np.allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-4)
        t = math.tan(math.radians(s["meta"]["camera"]["fov_deg"]) / 2)
        c = ((np.arange(SIZE) + 0.5) * 2 / SIZE - 1) * t
        ray = np.stack(np.broadcast_arrays(c[None, :], -c[:, None], -1.0), axis=-1)
        assert np.all((n * ray).sum(-1) <= 1e-6)  # every normal faces the camera
        nz_positive.append(n[..., 2] > 0)
    # n_z > 0 except on surfaces seen nearly edge-on towards the image border
    assert np.mean(nz_positive) > 0.98


def test_classification_is_largest_instance(scenes):
    for s in scenes:
        inst = s["instances"]
        cats = [CATEGORIES.index(o["category"]) for o in s["meta"]["objects"]]
        counts = np.bincount(inst[inst >= 0], minlength=len(cats))
        assert counts.max() > 0
        assert s["classification"]["label"] == cats[int(counts.argmax())]


def test_domains():
    stats = {}
    for domain in DOMAINS:
        out = render_scenes(3, range(24), 48, domain)
        assert len(out) == 24 and all(s["meta"]["domain"] == domain for s in out)
        stats[domain] = (np.mean([s["meta"]["num_objects"] for s in out]),
                         np.mean([s["image"].mean() for s in out]))
    assert stats["cluttered"][0] > stats["default"][0] + 1
    assert stats["dim"][1] < stats["default"][1] < stats["bright"][1]
    with pytest.raises(ValueError):
        render_scenes(0, [0], 32, "foggy")


def test_object_count_bounds():
    out = render_scenes(1, range(20), 32, min_objects=1, max_objects=1)
    assert all(s["meta"]["num_objects"] == 1 for s in out)
    assert render_scenes(1, [], 32) == []


def test_speed():
    render_scenes(0, range(4), SIZE)
    start = time.perf_counter()
    render_scenes(0, range(64), SIZE)
    rate = 64 / (time.perf_counter() - start)
    assert rate > 50, f"{rate:.0f} images/s"
