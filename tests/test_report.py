"""Pictures: the label grid (box edges in the class colour, panel layout) and training curves."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from must_ray.evaluate.pictures import (
    SEG_PALETTE,
    box_rect,
    class_colour,
    colorize_depth,
    colorize_normals,
    colorize_segmentation,
    grid_columns,
    nice_ticks,
    plot_curves,
    read_curves,
    render_grid,
)
from must_ray.world import CATEGORIES, render_scenes


def _rows():
    scenes = render_scenes(0, [900_000, 900_001], image_size=64)
    rows = []
    for s in scenes:
        gt = {t: s[t] for t in ("classification", "detection", "segmentation", "depth", "normals")}
        student = {"classification": {"label": 1, "topk_ids": np.array([1, 0]), "topk_probs": np.array([0.7, 0.2])},
                   "depth": s["depth"] * 1.1, "segmentation": None}
        rows.append({"image": s["image"], "labels": {"ground truth": gt, "student": student}})
    # a known box on the first row: class 2, away from the image border
    rows[0]["labels"]["ground truth"]["detection"] = {
        "boxes": np.array([[0.25, 0.5, 0.75, 0.875]], np.float32), "classes": np.array([2], np.int32),
        "scores": np.ones(1, np.float32)}
    return rows


def test_grid_layout_and_box_colour(tmp_path):
    rows = _rows()
    out = tmp_path / "grid.png"
    lay = render_grid(rows, str(out), class_names=CATEGORIES, scale=3, title="test")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert (img.shape[1], img.shape[0]) == tuple(lay["size"])
    cols = [tuple(c) for c in lay["columns"]]
    assert cols == [("ground truth", "classification"), ("student", "classification"), ("ground truth", "detection"),
                    ("ground truth", "segmentation"), ("ground truth", "depth"), ("student", "depth"),
                    ("ground truth", "normals")]
    assert cols == grid_columns(rows)
    pw, ph = lay["panel_size"]
    assert (pw, ph) == (192, 192)
    # 1 input column + 7 label columns, 4 px gaps
    assert lay["size"][0] == 4 + 8 * (192 + 4)
    # the detection panel of row 0: the bottom and left edges of the box are in the class colour
    x0, y0 = lay["origins"][0][1 + cols.index(("ground truth", "detection"))]
    bx0, by0, bx1, by1 = box_rect([0.25, 0.5, 0.75, 0.875], pw, ph)
    colour = class_colour(2)
    assert tuple(img[y0 + by1, x0 + (bx0 + bx1) // 2]) == colour
    assert tuple(img[y0 + (by0 + by1) // 2, x0 + bx0]) == colour
    assert tuple(img[y0 + by1 - 1, x0 + (bx0 + bx1) // 2]) == colour  # 2 px wide stroke
    # the input column is the image upscaled x3 (nearest)
    ix, iy = lay["origins"][1][0]
    assert np.array_equal(img[iy:iy + ph:3, ix:ix + pw:3], rows[1]["image"])
    # the segmentation panel of row 0 is the palette of its mask
    sx, sy = lay["origins"][0][1 + cols.index(("ground truth", "segmentation"))]
    seg = rows[0]["labels"]["ground truth"]["segmentation"]
    assert np.array_equal(img[sy:sy + ph:3, sx:sx + pw:3], SEG_PALETTE[seg])


def test_colour_maps():
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    rgb = colorize_segmentation(mask)
    assert tuple(rgb[1, 1]) == (0, 0, 0) and tuple(rgb[0, 1]) == class_colour(0) and len({tuple(c) for c in
                                                                                        rgb.reshape(-1, 3)}) == 4
    d = colorize_depth(np.array([[1.0, 2.0], [3.0, 0.0]]), 1.0, 3.0)
    assert tuple(d[1, 1]) == (0, 0, 0) and d[0, 0].sum() > d[1, 0].sum()  # near is bright, invalid black
    n = colorize_normals(np.array([[[0, 0, 1.0], [0, 0, 0]]]))
    assert tuple(n[0, 0]) == (128, 128, 255) and tuple(n[0, 1]) == (0, 0, 0)
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0] and nice_ticks(0, 300) == [0, 100, 200, 300]


def test_curves_png(tmp_path):
    paths = {}
    for name, speed in (("teacher_depth", 60.0), ("student", 100.0)):
        p = tmp_path / name / "metrics.jsonl"
        p.parent.mkdir()
        with open(p, "w") as f:
            for step in range(0, 200, 10):
                rec = {"step": step, "loss": 3 * np.exp(-step / speed) + 0.1, "loss_depth": np.exp(-step / speed),
                       "lr": 1e-3, "images_per_s": 50.0}
                if name == "student":
                    rec["loss_segmentation"] = 2 * np.exp(-step / speed)
                    rec["loss_normals"] = None  # a task without labels in the window
                f.write(json.dumps(rec) + "\n")
            f.write("not json\n")
        paths[name] = str(p)
    paths["missing"] = str(tmp_path / "nope.jsonl")
    curves = read_curves(paths["student"])
    assert set(curves) == {"loss", "loss_depth", "loss_segmentation"} and len(curves["loss"]) == 20
    out = tmp_path / "curves.png"
    info = plot_curves(paths, str(out), title="losses")
    assert info["panels"] == ["loss", "loss_segmentation", "loss_depth"]
    assert info["points"] == 20 * 5
    img = np.asarray(Image.open(out).convert("RGB"))
    assert (img.shape[1], img.shape[0]) == tuple(info["size"])
    non_white = (img != 255).any(axis=-1).mean()
    assert 0.02 < non_white < 0.6
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # both runs drawn
    empty = plot_curves({"x": paths["missing"]}, str(tmp_path / "empty.png"))
    assert empty["panels"] == [] and (tmp_path / "empty.png").is_file()
