"""Importers: fixtures in each standard format are written here from the synthetic world's ground
truth (so the true labels are known), imported with Ray Data, checked against the truth, exported
back and compared with the original annotations; malformed inputs give errors naming the file or
quarantine rows, never a silent skip."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from must_ray import table as S
from must_ray.datasets.importers import DatasetError, import_dataset, plan_import
from must_ray.images import decode_png
from must_ray.tasks import build_task
from must_ray.tasks.normals import decode_normals, encode_normals
from tests.conftest import REPO

H, W = 40, 56  # non-square, so a swapped width/height cannot pass
NAMES = ("sphere", "box", "cylinder", "cone", "torus")  # must_ray.world.CATEGORIES
COCO_IDS = (7, 3, 42, 11, 5)  # arbitrary COCO category id of each world category
CONTIGUOUS = {cid: i for i, cid in enumerate(sorted(COCO_IDS))}  # COCO id -> our id (ascending COCO id)


# ----------------------------------------------------------------------------- ground truth


def world_truth(n: int = 5, offset: int = 900_000) -> list[dict]:
    """``n`` world scenes cropped to H x W, with tight pixel boxes recomputed after the crop."""
    from must_ray.world import CATEGORIES
    from must_ray.world.labels import render_labelled

    assert tuple(CATEGORIES) == NAMES
    out = []
    for s in render_labelled(0, range(offset, offset + n), image_size=64):
        inst, seg = s["instances"][:H, :W], s["segmentation"][:H, :W]
        boxes, classes = [], []
        for k in np.unique(inst[inst >= 0]):
            ys, xs = np.nonzero(inst == k)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            classes.append(int(seg[ys[0], xs[0]]) - 1)
        counts = np.bincount(seg.reshape(-1), minlength=len(NAMES) + 1)[1:]
        out.append({
            "image": np.ascontiguousarray(s["image"][:H, :W]), "seg": np.ascontiguousarray(seg),
            "boxes": np.asarray(boxes, np.float64).reshape(-1, 4), "classes": np.asarray(classes, np.int64),
            "depth": np.ascontiguousarray(s["depth"][:H, :W]), "normals": np.ascontiguousarray(s["normals"][:H, :W]),
            "label": int(counts.argmax()),
        })
    assert sum(len(t["boxes"]) for t in out) >= 3
    return out


@pytest.fixture(scope="module")
def truth():
    return world_truth()


def save_image(path, arr: np.ndarray, fmt: str = "PNG", **kw) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)


def read_table(path) -> tuple[list[dict], dict]:
    return pq.read_table(path).to_pylist(), S.read_provenance(str(path))


def read_quarantine(out) -> list[dict]:
    return pq.read_table(f"{out}_quarantine").to_pylist()


# ----------------------------------------------------------------------------- COCO (detection)


def write_coco(root, truth) -> tuple[str, list[dict]]:
    """A COCO fixture: image i -> ``imgs/sub/img_i.(png|jpg)``; the last image has no annotation;
    image 0 also has a crowd annotation. Returns (json path, the non-crowd annotations)."""
    images, anns = [], []
    for i, t in enumerate(truth):
        ext, fmt = ("jpg", "JPEG") if i == 1 else ("png", "PNG")
        fname = f"sub/img_{i}.{ext}"
        save_image(os.path.join(root, "imgs", fname), t["image"], fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        images.append({"id": 1000 + 7 * i, "file_name": fname, "width": W, "height": H})
        if i == len(truth) - 1:
            continue
        for (x0, y0, x1, y1), c in zip(t["boxes"], t["classes"]):
            anns.append({"id": len(anns) + 1, "image_id": 1000 + 7 * i, "category_id": COCO_IDS[c],
                         "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "iscrowd": 0,
                         "area": float((x1 - x0) * (y1 - y0))})
    real = list(anns)
    anns.append({"id": 999, "image_id": 1000, "category_id": COCO_IDS[0], "bbox": [0, 0, W, H], "iscrowd": 1,
                 "area": W * H})
    cats = [{"id": cid, "name": NAMES[c], "supercategory": "shape"} for c, cid in enumerate(COCO_IDS)]
    path = os.path.join(root, "instances_fixture.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return path, real


def add_bad_coco_images(path, root) -> None:
    """Append three unusable images: a missing file, an undecodable one, one whose real size
    differs from the JSON's."""
    with open(path) as f:
        data = json.load(f)
    with open(os.path.join(root, "imgs", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    save_image(os.path.join(root, "imgs", "wrong_size.png"), np.zeros((H, W, 3), np.uint8))
    data["images"] += [{"id": 1, "file_name": "missing.png", "width": W, "height": H},
                       {"id": 2, "file_name": "broken.png", "width": W, "height": H},
                       {"id": 3, "file_name": "wrong_size.png", "width": 64, "height": 64}]
    data["annotations"].append({"id": 5000, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0})
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.fixture(scope="module")
def coco_import(ray_session, truth, tmp_path_factory):
    """The COCO fixture (plus three unusable images) imported once; shared by the round-trip and
    the training test."""
    root = tmp_path_factory.mktemp("coco")
    ann_path, real_anns = write_coco(root, truth)
    add_bad_coco_images(ann_path, root)
    out = str(root / "table")
    summary = import_dataset("coco", out, annotations=ann_path, images=str(root / "imgs"))
    return {"root": root, "ann_path": ann_path, "real_anns": real_anns, "out": out, "summary": summary}


def test_coco_import_export_round_trip_with_quarantine(coco_import, truth):
    from must_ray.datasets.exporters import export_labels
    from must_ray.tasks.detection import make_label

    tmp_path, out, summary, real_anns = (coco_import[k] for k in ("root", "out", "summary", "real_anns"))
    n = len(truth)
    assert summary["rows"] == n and summary["quarantined"] == 3 and summary["records"] == n + 3
    assert summary["quarantine_reasons"] == {"missing_image": 1, "bad_image": 1, "image_size_mismatch": 1}
    assert summary["crowd_boxes_dropped"] == 1 and summary["images_without_boxes"] == 3
    quarantine = {q["image_id"]: q for q in read_quarantine(out)}
    assert set(quarantine) == {"missing.png", "broken.png", "wrong_size.png"}
    assert quarantine["missing.png"]["path"].endswith("imgs/missing.png")
    assert "not found" in quarantine["missing.png"]["detail"]
    assert "64x64" in quarantine["wrong_size.png"]["detail"] and "56x40" in quarantine["wrong_size.png"]["detail"]

    rows, prov = read_table(out)
    assert S.validate_table(pq.read_table(out)) == ["detection"]
    assert prov["kind"] == "import" and prov["format"] == "coco"
    assert prov["classes"] == [NAMES[COCO_IDS.index(cid)] for cid in sorted(COCO_IDS)]
    assert prov["source_class_ids"] == sorted(COCO_IDS)
    task = build_task("detection", num_classes=len(NAMES))
    by_id = {r["image_id"]: r for r in rows}
    for i, t in enumerate(truth):
        fname = f"sub/img_{i}.{'jpg' if i == 1 else 'png'}"
        row = by_id[fname]
        assert (row["height"], row["width"]) == (H, W)
        with open(tmp_path / "imgs" / fname, "rb") as f:
            assert row["image"] == f.read()  # original bytes (PNG and JPEG)
        label = task.decode(row)
        if i == n - 1:
            assert row["det_boxes"] == [] and len(label["boxes"]) == 0  # no annotation: empty, not null
            continue
        want = make_label(t["boxes"] / [W, H, W, H], [CONTIGUOUS[COCO_IDS[c]] for c in t["classes"]])
        np.testing.assert_allclose(label["boxes"], want["boxes"], atol=1e-6)
        assert label["classes"].tolist() == want["classes"].tolist()

    # export -> the original annotations back (COCO ids, absolute xywh within 1e-4)
    exp = tmp_path / "export"
    res = export_labels(out, str(exp), ["coco"])
    assert res["coco_images"] == n and res["coco_annotations"] == len(real_anns)
    doc = json.loads((exp / "coco.json").read_text())
    assert sorted((c["id"], c["name"]) for c in doc["categories"]) == sorted(zip(COCO_IDS, NAMES))
    file_of = {im["id"]: im["file_name"] for im in doc["images"]}
    assert all((im["width"], im["height"]) == (W, H) for im in doc["images"])
    orig_file = {1000 + 7 * i: f"sub/img_{i}.{'jpg' if i == 1 else 'png'}" for i in range(n)}

    def key(a, files):
        return files[a["image_id"]], a["category_id"], a["bbox"][0], a["bbox"][1]

    got = sorted(doc["annotations"], key=lambda a: key(a, file_of))
    want = sorted(real_anns, key=lambda a: key(a, orig_file))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert file_of[g["image_id"]] == orig_file[w["image_id"]] and g["category_id"] == w["category_id"]
        np.testing.assert_allclose(g["bbox"], w["bbox"], atol=1e-4)
        assert g["score"] == 1.0
    results = json.loads((exp / "coco_results.json").read_text())
    assert len(results) == len(real_anns) and {"image_id", "category_id", "bbox", "score"} <= set(results[0])


def test_coco_dataset_errors_name_the_file(tmp_path, truth):
    """Dataset-level inconsistencies fail in the driver, before any image is read."""
    ann_path, _ = write_coco(tmp_path, truth[:2])
    base = json.loads(open(ann_path).read())

    def plan_with(mutate):
        data = json.loads(json.dumps(base))
        mutate(data)
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(data))
        return lambda: plan_import("coco", annotations=str(p), images=str(tmp_path / "imgs"))

    cases = [
        (lambda d: d["annotations"][0].update(category_id=999), r"bad\.json: annotation 1 .* category id 999"),
        (lambda d: d["annotations"][0].update(image_id=424242), r"bad\.json: annotation 1 points at image id 424242"),
        (lambda d: d["images"].append(dict(d["images"][0], id=77)), r"bad\.json: .*share file_name"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"bad\.json: annotation 1 has bbox"),
        (lambda d: d.pop("categories"), r"bad\.json: the file has no 'categories'"),
    ]
    for mutate, pattern in cases:
        with pytest.raises(DatasetError, match=pattern):
            plan_with(mutate)()
    with pytest.raises(DatasetError, match="annotation file not found: .*nope.json"):
        plan_import("coco", annotations=str(tmp_path / "nope.json"))


# ----------------------------------------------------------------------------- VOC (segmentation)


def palette_mask(arr: np.ndarray) -> Image.Image:
    from must_ray.datasets.importers.voc import voc_palette

    img = Image.fromarray(arr)
    img.putpalette(voc_palette().reshape(-1).tolist())
    return img


def write_voc(root, truth) -> tuple[dict[str, np.ndarray], str]:
    """VOC layout: JPEGImages/<key>.jpg, SegmentationClass/<key>.png (palette, 255 borders),
    a class file with background first, and a split file that also lists broken keys."""
    masks = {}
    for i, t in enumerate(truth):
        key = f"2024_{i:06d}"
        save_image(os.path.join(root, "JPEGImages", key + ".jpg"), t["image"], "JPEG", quality=90)
        mask = t["seg"].copy()
        mask[0, :] = 255  # an ignore band, as VOC's object borders
        masks[key] = mask
        os.makedirs(os.path.join(root, "SegmentationClass"), exist_ok=True)
        dest = os.path.join(root, "SegmentationClass", key + ".png")
        if i == 1:  # an RGB-painted mask (VOC colours) instead of a palette PNG
            from must_ray.datasets.importers.voc import voc_palette

            Image.fromarray(voc_palette()[mask]).save(dest)
        else:
            palette_mask(mask).save(dest)
    seg_dir = os.path.join(root, "SegmentationClass")
    img_dir = os.path.join(root, "JPEGImages")
    save_image(os.path.join(img_dir, "bad_size.jpg"), truth[0]["image"])
    palette_mask(np.zeros((H + 1, W), np.uint8)).save(os.path.join(seg_dir, "bad_size.png"))
    save_image(os.path.join(img_dir, "bad_value.jpg"), truth[0]["image"])
    bad = truth[0]["seg"].copy()
    bad[5, 5] = 17
    palette_mask(bad).save(os.path.join(seg_dir, "bad_value.png"))
    palette_mask(truth[0]["seg"]).save(os.path.join(seg_dir, "no_image.png"))
    save_image(os.path.join(img_dir, "no_label.jpg"), truth[0]["image"])
    save_image(os.path.join(img_dir, "unlisted.jpg"), truth[0]["image"])
    split = os.path.join(root, "val.txt")
    with open(split, "w") as f:
        f.write("\n".join(list(masks) + ["bad_size", "bad_value", "no_image", "no_label"]) + "\n")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("background\n" + "\n".join(NAMES) + "\n")
    return masks, split


def test_voc_import_export_masks_exact(ray_session, truth, tmp_path):
    from must_ray.datasets.exporters import export_labels

    masks, split = write_voc(tmp_path, truth)
    out = str(tmp_path / "table")
    summary = import_dataset("voc", out, images=str(tmp_path / "JPEGImages"), labels=str(tmp_path / "SegmentationClass"),
                             split_file=split, classes=str(tmp_path / "classes.txt"))
    assert summary["rows"] == len(masks) and summary["quarantined"] == 4
    assert summary["quarantine_reasons"] == {"label_size_mismatch": 1, "bad_label": 1, "missing_image": 1,
                                             "missing_label": 1}
    q = {r["image_id"]: r for r in read_quarantine(out)}
    assert q["bad_size.jpg"]["path"].endswith("SegmentationClass/bad_size.png")
    assert "56x41" in q["bad_size.jpg"]["detail"] and "56x40" in q["bad_size.jpg"]["detail"]
    assert "[17]" in q["bad_value.jpg"]["detail"]
    assert q["no_label.jpg"]["path"].endswith("SegmentationClass/no_label.png")
    assert q["no_image"]["reason"] == "missing_image"

    rows, prov = read_table(out)
    assert prov["classes"] == list(NAMES)  # background dropped: our class c = VOC index c + 1
    task = build_task("segmentation", num_classes=len(NAMES))
    for row in rows:
        key = row["image_id"][:-4]
        assert np.array_equal(task.decode(row), masks[key]), key

    exp = tmp_path / "export"
    res = export_labels(out, str(exp), ["masks"])
    assert res["masks_files"] == len(masks)
    for key, mask in masks.items():
        with Image.open(exp / "masks" / f"{key}.png") as img:
            assert img.mode == "P"
            assert img.getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # VOC colour map
            assert np.array_equal(np.asarray(img), mask)
    mapping = list(csv.DictReader(open(exp / "files.csv")))
    assert {m["image_id"]: m["mask"] for m in mapping} == {f"{k}.jpg": f"masks/{k}.png" for k in masks}


def test_voc_without_split_pairs_by_name_and_counts_unlabelled(tmp_path, truth):
    write_voc(tmp_path, truth[:2])
    plan = plan_import("voc", images=str(tmp_path / "JPEGImages"), labels=str(tmp_path / "SegmentationClass"))
    assert plan.classes[:3] == ["aeroplane", "bicycle", "bird"] and len(plan.classes) == 20  # VOC default
    ids = [r["image_id"] for r in plan.records]
    assert "2024_000000.jpg" in ids and "no_image" in ids  # every mask is a record; no image -> quarantine
    assert plan.counts["images_without_label"] == 2  # no_label.jpg, unlisted.jpg: counted, not imported
    assert json.loads(next(r for r in plan.records if r["image_id"] == "no_image")["error"])[0] == "missing_image"


# ----------------------------------------------------------------------------- depth


def test_depth_nyu_exact_and_kitti_within_one_unit(ray_session, truth, tmp_path):
    from must_ray.datasets.exporters import export_labels
    from must_ray.tasks.depth import DepthConfig

    nyu, kitti = {}, {}
    for i, t in enumerate(truth):
        key = f"d{i}"
        save_image(str(tmp_path / "rgb" / f"{key}.png"), t["image"])
        units = np.rint(t["depth"] / 0.001).astype(np.uint16)
        units[:3, :5] = 0  # invalid
        nyu[key] = units
        save_image(str(tmp_path / "nyu" / f"{key}.png"), units)
        k_units = np.rint(t["depth"] * 256).astype(np.uint16)
        k_units[::3, ::2] = 0  # sparse, as KITTI's projected LiDAR
        kitti[key] = k_units
        save_image(str(tmp_path / "kitti" / f"{key}.png"), k_units)
    save_image(str(tmp_path / "rgb" / "small.png"), truth[0]["image"])
    save_image(str(tmp_path / "nyu" / "small.png"), np.ones((H // 2, W // 2), np.uint16))
    save_image(str(tmp_path / "rgb" / "far.png"), truth[0]["image"])
    save_image(str(tmp_path / "kitti" / "far.png"), np.full((H, W), 65535, np.uint16))  # 256 m > 65.5 m at 1 mm

    cfgs = {"depth": DepthConfig(depth_scale=0.001)}
    nyu_out = str(tmp_path / "nyu_table")
    s1 = import_dataset("depth", nyu_out, task_cfgs=cfgs, images=str(tmp_path / "rgb"), labels=str(tmp_path / "nyu"),
                        depth_scale=0.001)
    assert s1["rows"] == len(nyu) and s1["quarantine_reasons"] == {"label_size_mismatch": 1}
    rows, prov = read_table(nyu_out)
    assert prov["source_depth_scale"] == 0.001
    for row in rows:
        assert row["depth_scale"] == pytest.approx(0.001, rel=1e-6)
        assert np.array_equal(decode_png(row["depth_png"], np.uint16), nyu[row["image_id"][:-4]])  # exact

    kitti_out = str(tmp_path / "kitti_table")
    s2 = import_dataset("depth", kitti_out, task_cfgs=cfgs, images=str(tmp_path / "rgb"),
                        labels=str(tmp_path / "kitti"), depth_scale=1 / 256)
    assert s2["rows"] == len(kitti) and s2["quarantine_reasons"] == {"depth_out_of_range": 1}
    assert "far.png" in read_quarantine(kitti_out)[0]["path"]

    for table, ref, scale in ((nyu_out, nyu, 0.001), (kitti_out, kitti, 1 / 256)):
        exp = tmp_path / f"export_{scale}"
        export_labels(table, str(exp), ["depth"], depth_scale=scale)
        for key, units in ref.items():
            with Image.open(exp / "depth" / f"{key}.png") as img:
                back = np.asarray(img).astype(np.int64)
            assert back.shape == units.shape
            assert np.array_equal(back == 0, units == 0), key  # invalid stays invalid
            tol = 0 if scale == 0.001 else 1
            assert np.abs(back - units.astype(np.int64)).max() <= tol, key


# ----------------------------------------------------------------------------- normals


def test_normals_opencv_convention_round_trip(ray_session, truth, tmp_path):
    from must_ray.datasets.exporters import export_labels
    from must_ray.datasets.importers.normals import convert_rgb

    ours = {}
    for i, t in enumerate(truth):
        key = f"n{i}"
        save_image(str(tmp_path / "img" / f"{key}.png"), t["image"])
        rgb = decode_png(encode_normals(t["normals"]), np.uint8)
        ours[key] = rgb
        opencv = rgb.copy()
        opencv[..., 1:] = 255 - opencv[..., 1:]  # y down, z forward
        save_image(str(tmp_path / "cv" / f"{key}.png"), opencv)
    out = str(tmp_path / "table")
    summary = import_dataset("normals", out, images=str(tmp_path / "img"), labels=str(tmp_path / "cv"),
                             normals_convention="opencv")
    assert summary["rows"] == len(ours) and summary["quarantined"] == 0
    rows, _ = read_table(out)
    for row in rows:
        key = row["image_id"][:-4]
        assert np.array_equal(decode_png(row["normals_png"], np.uint8), ours[key])  # exact, in our frame
        n = decode_normals(row["normals_png"])
        valid = np.linalg.norm(truth[int(key[1:])]["normals"], axis=-1) > 0.5
        assert (n[valid] * truth[int(key[1:])]["normals"][valid]).sum(-1).min() > np.cos(np.radians(1))

    exp = tmp_path / "export"
    export_labels(out, str(exp), ["normals"], normals_convention="opencv")
    for key in ours:
        with Image.open(exp / "normals" / f"{key}.png") as a, Image.open(tmp_path / "cv" / f"{key}.png") as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))

    # invalid pixels: grey stays grey under the flip; black is invalid on request
    px = np.array([[[128, 128, 128], [0, 0, 0], [255, 128, 128]]], np.uint8)
    assert convert_rgb(px, "opencv").tolist() == [[[128, 128, 128], [0, 255, 255], [255, 127, 127]]]
    assert convert_rgb(px, "opengl", black_invalid=True).tolist() == [[[128, 128, 128], [128, 128, 128],
                                                                        [255, 128, 128]]]


# ----------------------------------------------------------------------------- classification


def test_imagefolder_import(ray_session, truth, tmp_path):
    root = tmp_path / "train"
    expected = {}
    for i, t in enumerate(truth):
        name = NAMES[t["label"]]
        rel = f"{name}/{i:03d}.{'jpg' if i % 2 else 'png'}"
        save_image(str(root / rel), t["image"], "JPEG" if i % 2 else "PNG")
        expected[rel] = name
    (root / "README.txt").write_text("not an image")
    (root / "loose.png").write_bytes(b"")  # not in a class folder: ignored
    (root / NAMES[truth[0]["label"]] / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = str(tmp_path / "table")
    summary = import_dataset("imagefolder", out, images=str(root))
    assert summary["rows"] == len(truth) and summary["files_ignored"] == 2
    assert summary["quarantine_reasons"] == {"bad_image": 1}
    assert read_quarantine(out)[0]["path"].endswith("broken.jpg")
    rows, prov = read_table(out)
    classes = sorted(set(expected.values()))
    assert prov["classes"] == classes
    for row in rows:
        assert classes[row["cls_label"]] == expected[row["image_id"]]
        assert row["cls_topk_ids"] == [row["cls_label"]] and row["cls_topk_probs"] == [1.0]


def test_csv_and_json_lists(ray_session, truth, tmp_path):
    img_dir = tmp_path / "images"
    lines = ["path,label"]
    for i, t in enumerate(truth):
        save_image(str(img_dir / f"{i}.png"), t["image"])
        lines.append(f"images/{i}.png,{NAMES[t['label']]}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "table")
    summary = import_dataset("csv", out, annotations=str(tmp_path / "train.csv"), classes=",".join(NAMES),
                             id_prefix="mine/")
    assert summary["rows"] == len(truth) and summary["quarantined"] == 0
    rows, prov = read_table(out)
    assert prov["classes"] == list(NAMES)
    got = {r["image_id"]: r["cls_label"] for r in rows}
    assert got == {f"mine/images/{i}.png": t["label"] for i, t in enumerate(truth)}

    # JSON Lines with integer ids, paths relative to --images (driver-side plan only)
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps({"file": f"{i}.png", "y": t["label"]})
                                                   for i, t in enumerate(truth)))
    plan = plan_import("json", annotations=str(tmp_path / "list.jsonl"), images=str(img_dir), classes=",".join(NAMES),
                       path_column="file", label_column="y")
    assert [int(r["ann"]) for r in plan.records] == [t["label"] for t in truth]
    assert plan.records[0]["path"] == str(img_dir / "0.png")
    (tmp_path / "arr.json").write_text(json.dumps([{"path": "a.png", "label": "cat"}, {"path": "b.png", "label": "dog"}]))
    assert plan_import("json", annotations=str(tmp_path / "arr.json")).classes == ["cat", "dog"]

    # errors name the list file and the entry
    (tmp_path / "bad.csv").write_text("path,label\nimages/0.png,sphere\nimages/1.png,dragon\n")
    with pytest.raises(DatasetError, match=r"bad\.csv: entry 3 \(images/1\.png\) has class 'dragon'"):
        plan_import("csv", annotations=str(tmp_path / "bad.csv"), classes=",".join(NAMES))
    (tmp_path / "ids.jsonl").write_text('{"path": "a.png", "label": 1}\n{"path": "b.png", "label": 9}\n')
    with pytest.raises(DatasetError, match=r"ids\.jsonl: entry 2 \(b\.png\) has class id 9, outside \[0, 2\)"):
        plan_import("json", annotations=str(tmp_path / "ids.jsonl"), classes="a,b")
    (tmp_path / "dup.csv").write_text("path,label\na.png,x\na.png,y\n")
    with pytest.raises(DatasetError, match="duplicate image ids"):
        plan_import("csv", annotations=str(tmp_path / "dup.csv"))


# ----------------------------------------------------------------------------- the jobs


def _run_job_in_process(script, args, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run a job's ``__main__`` in this process (the session's Ray is reused): (exit code, stdout, stderr)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [str(script), *args])
    code = 0
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_import_and_export_jobs(ray_session, truth, tmp_path, monkeypatch, capsys):
    """The one-line commands of the README: the import as a real subprocess (attached to the test
    session's Ray instance), the export and a failing import in-process."""
    ann_path, real = write_coco(tmp_path, truth)
    out = tmp_path / "coco_table"
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "import_dataset.py"), "--format", "coco",
                           "--annotations", ann_path, "--images", str(tmp_path / "imgs"), "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["job"] == "import_dataset" and summary["rows"] == len(truth) and summary["quarantined"] == 0

    exp = tmp_path / "export"
    code, stdout, err = _run_job_in_process(REPO / "jobs" / "export_labels.py",
                                            ["--table", str(out), "--format", "all", "--out", str(exp)],
                                            monkeypatch, capsys)
    assert code == 0, err[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["job"] == "export_labels" and summary["formats"] == ["coco"]
    assert summary["coco_annotations"] == len(real)
    assert (exp / "coco.json").is_file() and (exp / "files.csv").is_file()

    data = json.loads(open(ann_path).read())
    data["annotations"][0]["category_id"] = 999
    bad = tmp_path / "instances_bad.json"
    bad.write_text(json.dumps(data))
    code, _, err = _run_job_in_process(REPO / "jobs" / "import_dataset.py",
                                       ["--format", "coco", "--annotations", str(bad), "--images",
                                        str(tmp_path / "imgs"), "--out", str(tmp_path / "never")], monkeypatch, capsys)
    assert code == 1 and "import error:" in err and "instances_bad.json" in err and "999" in err
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_teacher_trains_on_imported_coco(coco_import, tmp_path):
    """The trainer takes an imported COCO table as it is: a short teacher run, whose model carries
    the COCO class names (in our contiguous id order) from the table's provenance."""
    from must_ray.config import load_config
    from must_ray.models.export import load_model
    from must_ray.train.driver import train

    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml", [
        f"paths.root={tmp_path}", f"teacher.checkpoint.storage_path={tmp_path / 'ray_results'}",
        "teacher.schedule.max_steps=2",
        "teacher.global_batch_size=4", "teacher.schedule.warmup_steps=1", "teacher.report_every_steps=1",
        "teacher.checkpoint.every_steps=2", "teacher.input.image_size=32",
    ])
    summary = train(cfg, "teacher", data=[coco_import["out"]], out_dir=str(tmp_path / "teacher"))
    coco_names = [NAMES[COCO_IDS.index(cid)] for cid in sorted(COCO_IDS)]
    assert summary["tasks"] == ["detection"] and summary["steps"] == 2 and summary["rows"] == coco_import["summary"]["rows"]
    assert summary["classes"] == coco_names and np.isfinite(summary["loss"])
    model, info = load_model(summary["model"])
    assert info["classes"] == coco_names and info["tasks"]["detection"].num_classes == len(coco_names)


def test_multi_node_cluster_needs_shared_locations(ray_session, monkeypatch):
    """Tasks on every node read the images and write the table: node-local paths are refused."""
    from must_ray.datasets.importers.common import check_shared_locations
    from must_ray.typed_config import ConfigError

    monkeypatch.delenv("MUST_RAY_ALLOW_LOCAL_PATHS", raising=False)
    check_shared_locations([("--out", "/tmp/x")])  # one node: anything goes
    monkeypatch.setenv("MUST_RAY_MULTI_NODE", "1")
    check_shared_locations([("--out", "s3://bucket/tables/coco"), ("--images", None)])
    with pytest.raises(ConfigError, match="--images='/tmp/node-local-images'"):
        check_shared_locations([("--out", "s3://bucket/t"), ("--images", "/tmp/node-local-images")])
