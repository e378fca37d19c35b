"""The training input pipeline (must_ray.train.collate): tables -> Ray Data, and the collate that decodes,
augments consistently across tasks and stacks targets."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from must_ray.images import encode_png
from must_ray.table import rows_to_table, table_classes, table_rows, table_tasks
from must_ray.tasks import build_tasks
from must_ray.tasks.base import Crop
from must_ray.tasks.depth import DepthConfig
from must_ray.train.collate import TrainCollate, crop_image, sample_crop, split_batch
from must_ray.train.dataset import read_tables

CLASSES = ["a", "b", "c"]
ALL = ["classification", "detection", "segmentation", "depth", "normals"]


def _scene(i: int = 0):
    """A 64x64 scene: one red rectangle of category 2 at x in [8, 24), y in [16, 40) on grey, with
    depth growing left to right and one constant normal."""
    img = np.full((64, 64, 3), 90, np.uint8)
    img[16:40, 8:24] = (220, 20, 20)
    seg = np.zeros((64, 64), np.uint8)
    seg[16:40, 8:24] = 3
    depth = np.tile((1.0 + np.arange(64) / 16.0).astype(np.float32), (64, 1))
    normals = np.zeros((64, 64, 3), np.float32)
    normals[...] = (0.6, 0.0, 0.8)
    labels = {
        "classification": {"label": 2},
        "detection": {"boxes": [[8 / 64, 16 / 64, 24 / 64, 40 / 64]], "classes": [2]},
        "segmentation": seg, "depth": depth, "normals": normals,
    }
    return img, labels


def _table(rows_labels, tasks, path=None, classes=CLASSES):
    """An examples table of (image, {task: label or None}) pairs, optionally written to ``path``."""
    objs = build_tasks(tasks, len(classes), {})
    rows = []
    for i, (img, labels) in enumerate(rows_labels):
        row = {"image_id": f"img/{i}", "image": encode_png(img), "source": "test", "height": img.shape[0],
               "width": img.shape[1]}
        for t in tasks:
            row.update(objs[t].encode(labels.get(t)))
        rows.append(row)
    table = rows_to_table(rows, tasks, provenance={"kind": "test", "tasks": tasks, "classes": classes})
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path / "part-0.parquet")
    return table


class _FixedCrop(TrainCollate):
    def __init__(self, crop, *a, **kw):
        super().__init__(*a, **kw)
        self.fixed = crop

    def crop_for(self, image_id):
        return self.fixed


@pytest.mark.parametrize("crop", [Crop(), Crop(flip=True), Crop(0.0, 0.125, 0.75, 0.875, flip=True),
                                  Crop(0.1, 0.2, 0.6, 0.9, flip=False)])
def test_collate_moves_every_label_with_the_image(crop):
    img, labels = _scene()
    table = _table([(img, labels)], ALL)
    out_size = 32
    collate = _FixedCrop(crop, ALL, len(CLASSES), {}, image_size=out_size, augment=True)
    images, targets = split_batch(collate(table))
    assert images.shape == (1, out_size, out_size, 3) and images.dtype == torch.uint8
    red = images[0, ..., 0].numpy() > 150
    seg = targets["segmentation"]["labels"][0].numpy()
    # image and mask agree except on a one-pixel border (bilinear image vs nearest mask)
    assert np.mean(red == (seg == 3)) > 0.95
    # the box is the mask's bounding box, in normalised output coordinates
    ys, xs = np.nonzero(seg == 3)
    box = targets["detection"]["boxes"][0, 0].numpy() * out_size
    assert targets["detection"]["valid"][0, 0]
    np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.01)
    # depth grows to the right, or to the left after a flip; normals' x flips sign with the image
    d = targets["depth"]["depth"][0].numpy()
    assert (d[:, -1] > d[:, 0]).all() != crop.flip
    nx = targets["normals"]["normals"][0, 0].numpy()
    np.testing.assert_allclose(nx, -0.6 if crop.flip else 0.6, atol=0.01)
    # image-level labels do not move
    assert targets["classification"]["probs"][0].argmax() == 2
    assert all(bool(targets[t]["mask"][0]) for t in ALL)


def test_collate_masks_rows_without_labels_and_is_reproducible():
    img, labels = _scene()
    rows = [(img, labels), (img, {"depth": labels["depth"]}), (img, {})]
    table = _table(rows, ALL)
    collate = TrainCollate(ALL, len(CLASSES), {}, image_size=48, augment=True, seed=3, epoch=1)
    a = collate(table)
    _, targets = split_batch(a)
    assert targets["depth"]["mask"].tolist() == [True, True, False]
    for t in ("classification", "detection", "segmentation", "normals"):
        assert targets[t]["mask"].tolist() == [True, False, False], t
    assert (targets["segmentation"]["labels"][1:] == 255).all()  # unlabelled rows: ignore everywhere
    b = TrainCollate(ALL, len(CLASSES), {}, image_size=48, augment=True, seed=3, epoch=1)(table)
    assert all(torch.equal(a[k], b[k]) for k in a)  # crops keyed by (seed, epoch, image_id)
    c = TrainCollate(ALL, len(CLASSES), {}, image_size=48, augment=True, seed=3, epoch=2)(table)
    assert not torch.equal(a["image"], c["image"])
    # without augmentation every image is just resized
    plain = TrainCollate(["segmentation"], len(CLASSES), {}, image_size=64, augment=False)(table)
    assert torch.equal(plain["image"][0], torch.from_numpy(img))


def test_sample_crop_stays_inside_the_image():
    rng = np.random.default_rng(0)
    crops = [sample_crop(rng, 0.3) for _ in range(500)]
    for c in crops:
        assert 0.0 <= c.x0 < c.x1 <= 1.0 + 1e-9 and 0.0 <= c.y0 < c.y1 <= 1.0 + 1e-9
        assert (c.x1 - c.x0) * (c.y1 - c.y0) >= 0.3 * 0.74  # area >= min scale (less clipping slack)
    assert 0.3 < np.mean([c.flip for c in crops]) < 0.7
    img = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    assert np.array_equal(crop_image(img, Crop(flip=True), (16, 16)), img[:, ::-1])


def test_read_tables_conforms_and_unions(ray_session, tmp_path):
    img, labels = _scene()
    _table([(img, labels)] * 5, ["depth"], tmp_path / "depth")
    _table([(img, labels)] * 3, ["segmentation", "classification"], tmp_path / "seg")
    paths = [str(tmp_path / "depth"), str(tmp_path / "seg")]
    assert table_tasks(paths) == ["classification", "segmentation", "depth"]
    assert table_classes(paths) == CLASSES and table_rows(paths[0]) == 5
    ds = read_tables(paths, ["segmentation", "depth"], read_cpus=0.25)
    rows = ds.take_all()
    assert len(rows) == 8
    assert sum(r["depth_png"] is not None for r in rows) == 5
    assert sum(r["seg_png"] is not None for r in rows) == 3
    assert all("cls_label" not in r for r in rows)  # not a task of this run
    _table([(img, labels)], ["depth"], tmp_path / "other", classes=["x", "y", "z"])
    with pytest.raises(ValueError, match="disagree"):
        table_classes(paths + [str(tmp_path / "other")])


def test_collate_uses_task_configs():
    """A task's config reaches its codec (e.g. the depth scale when a row has none)."""
    collate = TrainCollate(["depth"], 2, {"depth": DepthConfig(max_depth=50.0, depth_scale=0.002)}, image_size=16)
    assert collate.tasks["depth"].cfg.depth_scale == 0.002
