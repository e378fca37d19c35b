"""Exporters: a multi-task (pseudo-label-like) table written from the synthetic world's ground
truth goes out as COCO JSON, VOC palette masks, 16-bit depth, RGB normals and a top-k CSV, and
every file decodes back to the truth."""
from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from must_ray import table as S
from must_ray.datasets.exporters import depth_units, export_labels, file_stem
from must_ray.datasets.importers import DatasetError
from must_ray.images import decode_png, encode_png
from must_ray.tasks import build_tasks, default_task_names
from must_ray.tasks.normals import encode_normals
from tests.datasets.test_importers import NAMES, H, W, world_truth

TASKS = list(default_task_names())


def write_multitask_table(path, truth, provenance=None) -> list[dict]:
    """Rows with every task's label; row 1 lacks segmentation and depth (a partial pseudo label)."""
    tasks = build_tasks(TASKS, len(NAMES))
    rows = []
    for i, t in enumerate(truth):
        probs = np.array([0.6, 0.3, 0.1], np.float32)
        others = [c for c in range(len(NAMES)) if c != t["label"]][:2]
        labels = {
            "classification": {"label": t["label"], "topk_ids": [t["label"], *others], "topk_probs": probs},
            "detection": {"boxes": t["boxes"] / [W, H, W, H], "classes": t["classes"],
                          "scores": np.linspace(0.9, 0.5, len(t["boxes"]))},
            "segmentation": None if i == 1 else t["seg"],
            "depth": None if i == 1 else t["depth"],
            "normals": t["normals"],
        }
        row = {"image_id": f"pool/scene {i}.png", "image": encode_png(t["image"]), "source": "test",
               "height": H, "width": W}
        for name, task in tasks.items():
            row.update(task.encode(labels[name]))
        rows.append(row)
    prov = provenance if provenance is not None else {"kind": "pseudo_labels", "classes": list(NAMES)}
    pq.write_table(S.rows_to_table(rows, TASKS, prov), path)
    return rows


def test_export_all_formats_match_truth(ray_session, tmp_path):
    truth = world_truth(3, offset=950_000)
    table = tmp_path / "labels.parquet"
    write_multitask_table(table, truth)
    out = tmp_path / "out"
    summary = export_labels(str(table), str(out), ["all"], depth_scale=0.001)
    assert summary["formats"] == ["coco", "masks", "depth", "normals", "topk-csv"]
    assert summary["masks_files"] == 2 and summary["depth_files"] == 2 and summary["normals_files"] == 3
    assert summary["depth_pixels_clipped"] == 0

    mapping = {m["image_id"]: m for m in csv.DictReader(open(out / "files.csv"))}
    assert set(mapping) == {f"pool/scene {i}.png" for i in range(3)}
    doc = json.loads((out / "coco.json").read_text())
    assert [c["name"] for c in doc["categories"]] == list(NAMES) and [c["id"] for c in doc["categories"]] == [1, 2, 3, 4, 5]
    images = {im["file_name"]: im for im in doc["images"]}
    for i, t in enumerate(truth):
        iid = f"pool/scene {i}.png"
        m = mapping[iid]
        stem = m["file_stem"]
        assert stem.startswith("pool/scene_") and stem == file_stem(iid)
        # COCO: absolute xywh, category ids 1..C, scores kept
        im = images[iid]
        assert (im["width"], im["height"]) == (W, H) and int(m["coco_image_id"]) == im["id"]
        anns = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
        got = sorted((a["category_id"] - 1, *a["bbox"]) for a in anns)
        want = sorted((int(c), b[0], b[1], b[2] - b[0], b[3] - b[1]) for b, c in zip(t["boxes"], t["classes"]))
        np.testing.assert_allclose(np.asarray(got, float).reshape(-1, 5), np.asarray(want, float).reshape(-1, 5),
                                   atol=1e-4)
        assert sorted(a["score"] for a in anns) == pytest.approx(sorted(np.linspace(0.9, 0.5, len(anns))), abs=1e-6)
        # dense files
        if i == 1:
            assert m["mask"] == "" and m["depth"] == "" and not (out / "masks" / f"{stem}.png").exists()
        else:
            with Image.open(out / m["mask"]) as img:
                assert img.mode == "P" and np.array_equal(np.asarray(img), t["seg"])
            with Image.open(out / m["depth"]) as img:
                units = np.asarray(img).astype(np.int64)
            assert np.abs(units - np.rint(t["depth"] / 0.001)).max() <= 1
        with Image.open(out / m["normals"]) as img:
            assert np.array_equal(np.asarray(img), decode_png(encode_normals(t["normals"]), np.uint8))

    lines = list(csv.DictReader(open(out / "topk.csv")))
    assert len(lines) == 9 and list(lines[0]) == ["image_id", "rank", "class_id", "class_name", "prob"]
    first = [ln for ln in lines if ln["image_id"] == "pool/scene 0.png"]
    assert [ln["rank"] for ln in first] == ["1", "2", "3"]
    assert int(first[0]["class_id"]) == truth[0]["label"] and first[0]["class_name"] == NAMES[truth[0]["label"]]
    assert [float(ln["prob"]) for ln in first] == pytest.approx([0.6, 0.3, 0.1])


def test_format_selection_and_errors(tmp_path):
    truth = world_truth(2, offset=950_000)
    table = tmp_path / "t.parquet"
    rows = write_multitask_table(table, truth, provenance={"kind": "pseudo_labels"})  # no class vocabulary
    # topk without a vocabulary: names class_<i>; COCO-only export needs no Ray
    out = tmp_path / "o"
    summary = export_labels(str(table), str(out), ["topk-csv", "coco"])
    assert summary["formats"] == ["topk-csv", "coco"]
    assert {ln["class_name"] for ln in csv.DictReader(open(out / "topk.csv"))} <= {f"class_{i}" for i in range(5)}

    # original COCO ids by class name, from a COCO file (pseudo labels carry names, not COCO ids)
    (tmp_path / "instances.json").write_text(json.dumps({"categories": [{"id": 10 * (i + 1), "name": f"class_{i}"}
                                                                        for i in range(5)]}))
    export_labels(str(table), str(tmp_path / "c"), ["coco"], coco_categories=str(tmp_path / "instances.json"))
    doc = json.loads((tmp_path / "c" / "coco.json").read_text())
    assert {a["category_id"] for a in doc["annotations"]} <= {10, 20, 30, 40, 50}

    only_depth = tmp_path / "depth_only.parquet"
    pq.write_table(S.rows_to_table([{k: r[k] for k in r if not k.startswith(("seg", "det", "cls", "normals"))}
                                    for r in rows], ["depth"], {"classes": []}), only_depth)
    with pytest.raises(DatasetError, match=r"--format coco needs detection columns, but .*depth_only.parquet has depth"):
        export_labels(str(only_depth), str(tmp_path / "x"), ["coco"])

    clash = tmp_path / "clash.parquet"
    pq.write_table(S.rows_to_table([dict(rows[0], image_id="a/b.png"), dict(rows[1], image_id="a/b.jpg")], TASKS),
                   clash)
    with pytest.raises(DatasetError, match=r"'a/b.png' and 'a/b.jpg' both map to the file name 'a/b'"):
        export_labels(str(clash), str(tmp_path / "y"), ["coco"])


def test_file_stem_is_safe_and_injective():
    assert file_stem("cat/001.jpg") == "cat/001"
    assert file_stem("2007_000032") == "2007_000032"
    odd = ["s3://bucket/x y.jpg", "../../etc/passwd", "a/./b.png", "ä.png", "x" * 300, ".hidden.png"]
    stems = [file_stem(s) for s in odd]
    assert len(set(stems)) == len(stems)
    for s in stems:
        parts = s.split("/")
        assert all(p and p not in (".", "..") and not p.startswith(".") for p in parts), s
        assert all(ch.isalnum() and ch.isascii() or ch in "._-/" for ch in s), s
        assert len(s) < 200
    assert file_stem("a b.png") != file_stem("a_b.png")  # changed ids get a hash suffix


def test_depth_units_rescale_and_clip():
    raw = np.array([[0, 1000, 65535]], np.uint16)
    png = encode_png(raw)
    same, clipped = depth_units(png, float(np.float32(0.001)), 0.001)
    assert np.array_equal(same, raw) and clipped == 0  # float32 row scale == 0.001: exact copy
    kitti, clipped = depth_units(png, 0.001, 1 / 256)
    assert kitti.tolist() == [[0, 256, 16777]] and clipped == 0
    fine, clipped = depth_units(png, 0.001, 0.0001)  # 65.5 m at 0.1 mm does not fit
    assert fine.tolist() == [[0, 10000, 65535]] and clipped == 1
