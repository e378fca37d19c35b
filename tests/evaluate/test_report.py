"""Pictures: the label grid (panels as each task draws them, one value range per task, the legend
under the grid), the tasks' drawing hooks and the matplotlib training curves."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
from PIL import Image

from must_ray.evaluate.curves import plot_curves, read_curves
from must_ray.evaluate.pictures import grid_columns, render_grid, upscale
from must_ray.tasks import build_task
from must_ray.tasks._drawing import SEG_PALETTE, box_rect, class_colour, colormap_lut, robust_range
from must_ray.tasks._layers import DenseTask
from must_ray.tasks.base import Legend, Task
from must_ray.world import CATEGORIES
from must_ray.world.labels import render_labelled

TASKS = ("classification", "detection", "segmentation", "depth", "normals")


def _rows():
    scenes = render_labelled(0, [900_000, 900_001], tasks=TASKS, image_size=64)
    rows = []
    for s in scenes:
        gt = {t: s[t] for t in TASKS}
        student = {"classification": {"label": 1, "topk_ids": np.array([1, 0]), "topk_probs": np.array([0.7, 0.2])},
                   "depth": s["depth"] * 1.1, "segmentation": None}
        rows.append({"image": s["image"], "labels": {"ground truth": gt, "student": student}})
    # a known box on the first row: class 2, away from the image border
    rows[0]["labels"]["ground truth"]["detection"] = {
        "boxes": np.array([[0.25, 0.5, 0.75, 0.875]], np.float32), "classes": np.array([2], np.int32),
        "scores": np.ones(1, np.float32)}
    return rows


def _colours(img: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in img.reshape(-1, 3)}


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
    # the classification panel: the image above the caption band, darker inside it
    cx, cy = lay["origins"][0][1 + cols.index(("ground truth", "classification"))]
    panel, plain = img[cy:cy + ph, cx:cx + pw].astype(int), upscale(rows[0]["image"], 3).astype(int)
    assert np.array_equal(panel[:ph // 2], plain[:ph // 2])
    assert panel[-8:].mean() < 0.6 * plain[-8:].mean()


def test_grid_depth_shares_the_ground_truth_range(tmp_path):
    rows = _rows()
    lay = render_grid(rows, str(tmp_path / "grid.png"), class_names=CATEGORIES, scale=1)
    img = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    truth = [r["labels"]["ground truth"]["depth"] for r in rows]
    lo, hi = lay["value_ranges"]["depth"]
    assert (lo, hi) == robust_range(truth, positive=True)  # both rows, ground truth only
    cols = [tuple(c) for c in lay["columns"]]
    gx, gy = lay["origins"][1][1 + cols.index(("ground truth", "depth"))]
    sx, sy = lay["origins"][1][1 + cols.index(("student", "depth"))]
    d = truth[1]
    t = np.clip((d - lo) / (hi - lo), 0, 1)
    expected = colormap_lut("viridis_r")[np.round(t * 255).astype(int)]
    expected[d <= 0] = 0
    assert np.array_equal(img[gy:gy + 64, gx:gx + 64], expected)
    # the student's depth is 10% farther everywhere: drawn on the same scale it is darker (viridis_r)
    assert img[sy:sy + 64, sx:sx + 64].astype(int).sum() < img[gy:gy + 64, gx:gx + 64].astype(int).sum()


def test_grid_legend_names_classes_and_depth_in_metres(tmp_path):
    rows = _rows()
    lay = render_grid(rows, str(tmp_path / "grid.png"), class_names=CATEGORIES, scale=3)
    img = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    blocks = {b["title"]: b["box"] for b in lay["legend"]}
    assert list(blocks) == ["segmentation", "depth", "normals"]  # boxes and captions name themselves
    panels_bottom = max(y for row in lay["origins"] for _, y in row) + lay["panel_size"][1]
    for x, y, w, h in blocks.values():
        assert y > panels_bottom and x + w <= img.shape[1] and y + h <= img.shape[0]
    x, y, w, h = blocks["segmentation"]
    swatches = _colours(img[y:y + h, x:x + w])
    assert class_colour(-1) in swatches and all(class_colour(c) in swatches for c in range(len(CATEGORIES)))
    x, y, w, h = blocks["depth"]
    bar = img[y:y + h, x:x + w].reshape(-1, 1, 3).astype(int)
    lut = colormap_lut("viridis_r").astype(int)
    for end in (lut[0], lut[-1]):  # both ends of the colour bar are drawn
        assert np.abs(bar - end).sum(axis=-1).min() <= 16
    legend = build_task("depth", len(CATEGORIES)).legend(CATEGORIES, lay["value_ranges"]["depth"])
    assert (legend.unit, legend.value_range) == ("m", lay["value_ranges"]["depth"])
    no_legend = render_grid(rows, str(tmp_path / "plain.png"), class_names=CATEGORIES, scale=3, legend=False)
    assert no_legend["legend"] == [] and no_legend["size"][1] < lay["size"][1]


def test_tasks_draw_themselves():
    image = np.zeros((2, 2, 3), np.uint8)
    seg = build_task("segmentation", 3)
    rgb = seg.draw(np.array([[0, 1], [2, 255]], np.uint8), image)
    assert tuple(rgb[1, 1]) == (0, 0, 0) and tuple(rgb[0, 1]) == class_colour(0) and len(_colours(rgb)) == 4
    names = [n for n, _ in seg.legend(["a", "b", "c"]).swatches]
    assert names == ["background", "a", "b", "c", "ignore"]
    depth = build_task("depth", 3)
    d = depth.draw(np.array([[1.0, 2.0], [3.0, 0.0]]), image, value_range=(1.0, 3.0))
    assert tuple(d[1, 1]) == (0, 0, 0) and d[0, 0].sum() > d[1, 0].sum()  # near is bright, invalid black
    normals = build_task("normals", 3)
    n = normals.draw(np.array([[[0, 0, 1.0], [0, 0, 0]]]), np.zeros((1, 2, 3), np.uint8))
    assert tuple(n[0, 0]) == (128, 128, 255) and tuple(n[0, 1]) == (0, 0, 0)
    assert normals.legend().image is not None
    # a label of another resolution than the image fills the panel (nearest)
    big = seg.draw(np.array([[0, 1], [2, 255]], np.uint8), np.zeros((4, 4, 3), np.uint8))
    assert big.shape == (4, 4, 3) and np.array_equal(big[::2, ::2], rgb)


class _Edges(DenseTask):
    """A plug-in dense task that defines no drawing of its own."""

    name = "toy_edges"
    target_key = "edges"
    label_dtype = np.float32

    @classmethod
    def columns(cls):
        return [pa.field("toy_edges_png", pa.binary(), nullable=True)]

    def encode(self, label):
        return {}

    def decode(self, cells):
        return None

    def metric_state(self):
        return 0

    def metric_update(self, state, preds, gts):
        return state

    def metric_merge(self, a, b):
        return a + b

    def metric_compute(self, state):
        return {}


def test_a_dense_task_without_drawing_gets_viridis_and_a_colour_bar():
    task = _Edges(3)
    labels = [np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)]
    lo, hi = task.draw_range(labels)
    assert 0.0 <= lo < 0.1 and 0.9 < hi <= 1.0
    rgb = task.draw(labels[0], np.zeros((8, 8, 3), np.uint8), value_range=(0.0, 1.0))
    lut = colormap_lut("viridis")
    assert rgb.shape == (8, 8, 3) and tuple(rgb[0, 0]) == tuple(lut[0]) and tuple(rgb[-1, -1]) == tuple(lut[-1])
    legend = task.legend((), (lo, hi))
    assert isinstance(legend, Legend) and legend.colormap == "viridis" and legend.value_range == (lo, hi)
    assert Task.legend(task, (), None) is None  # nothing to read without a range


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
    assert info["legend"] == ["teacher_depth", "student"]  # the missing run is not in the legend
    assert info["log_panels"] == ["loss_depth"]  # exp(-190 / 60) spans > 20x; the others do not
    img = np.asarray(Image.open(out).convert("RGB"))
    assert (img.shape[1], img.shape[0]) == tuple(info["size"])
    non_white = (img != 255).any(axis=-1).mean()
    assert 0.02 < non_white < 0.6
    colours = _colours(img)
    assert info["colours"] == {"teacher_depth": (31, 119, 180), "student": (255, 127, 14)}  # tab10
    assert all(c in colours for c in info["colours"].values())  # both runs drawn
    empty = plot_curves({"x": paths["missing"]}, str(tmp_path / "empty.png"))
    assert empty["panels"] == [] and empty["legend"] == [] and (tmp_path / "empty.png").is_file()
