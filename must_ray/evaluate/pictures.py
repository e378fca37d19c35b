"""The label grid: a picture of what every source says about the same images.

* :func:`render_grid` — one row per image: the input, then for every task and every *source*
  (ground truth, the teachers' pseudo labels, the student's predictions ...) that task's label as
  the task draws it (:meth:`~must_ray.tasks.base.Task.draw`), upscaled ``scale`` x with nearest
  neighbour so 64x64 scenes stay crisp. A task's panels share one value range over the whole grid
  (:meth:`~must_ray.tasks.base.Task.draw_range`, e.g. depth in metres), so they compare across
  sources and rows, and one legend under the grid reads them all: every task's
  :class:`~must_ray.tasks.base.Legend` (class swatches, colour bars with their unit, keys) drawn
  by matplotlib. Nothing here knows any task by name: a plug-in task gets its panel and legend
  from its own module (or the base class's defaults for dense maps).
* :func:`collect_grid_rows` — builds those rows from an examples table (ground truth), model
  files (predictions) and label tables (pseudo labels, matched by ``image_id``).
"""
from __future__ import annotations

import io
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter
from PIL import Image, ImageDraw

from must_ray.evaluate.scoring import predict_labels
from must_ray.images import decode_image
from must_ray.models import load_model
from must_ray.table import decode_column
from must_ray.tasks import Task, build_task, registered_task_names
from must_ray.tasks._drawing import fit_text, font, text_size
from must_ray.tasks.base import Legend

#: source names read as the ground truth, whose labels set the grid's value ranges
TRUTH_SOURCES = ("ground truth", "gt", "truth")
LEGEND_DPI = 100
LEGEND_SPACING = 36  # px between two legend blocks


def upscale(rgb: np.ndarray, scale: int) -> np.ndarray:
    """uint8 RGB array upscaled ``scale`` x with nearest neighbour."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    return rgb if scale == 1 else np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


def _no_label_panel(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), (40, 40, 40))
    draw, fnt = ImageDraw.Draw(img), font(12)
    tw, th = text_size(draw, "no label", fnt)
    draw.text(((width - tw) // 2, (height - th) // 2), "no label", fill=(160, 160, 160), font=fnt, anchor="lt")
    return img


# ----------------------------------------------------------------------------- legend


def legend_block(legend: Legend, dpi: int = LEGEND_DPI) -> Image.Image:
    """One task's legend drawn by matplotlib (title, then swatches, a colour bar or a key image,
    and the note), cropped to what was drawn."""
    fig_w, fig_h = 8.0, 1.7  # inches; generous, the crop keeps only what was drawn
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="white")
    top = 1.0 - 0.3 / fig_h  # where the content starts, under the title
    fig.text(0.0, 1.0, legend.title, fontsize=11, fontweight="bold", va="top", ha="left")
    note_at = (0.0, top - 0.75 / fig_h)
    if legend.swatches:
        handles = [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="0.35", linewidth=0.6, label=name)
                   for name, c in legend.swatches]
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, top), ncols=math.ceil(len(handles) / 2),
                   frameon=False, fontsize=10, handlelength=1.3, handleheight=1.1, borderaxespad=0.0, borderpad=0.0,
                   columnspacing=1.2, handletextpad=0.5)
    elif legend.colormap:
        lo, hi = legend.value_range or (0.0, 1.0)
        bar_w, bar_h = 3.0, 0.2
        cax = fig.add_axes((0.005, top - bar_h / fig_h, bar_w / fig_w, bar_h / fig_h))
        bar = fig.colorbar(ScalarMappable(Normalize(lo, hi), legend.colormap), cax=cax, orientation="horizontal")
        unit = f" {legend.unit}" if legend.unit else ""
        bar.ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{unit}"))
        bar.ax.tick_params(labelsize=9)
        note_at = ((bar_w + 0.2) / fig_w, top - bar_h / 2 / fig_h)
    elif legend.image is not None:
        side = 0.8
        ax = fig.add_axes((0.0, top - side / fig_h, side / fig_w * legend.image.shape[1] / legend.image.shape[0],
                           side / fig_h))
        ax.imshow(legend.image, interpolation="nearest")
        ax.set_axis_off()
        note_at = ((side + 0.12) / fig_w, top - side / 2 / fig_h)
    if legend.note:
        fig.text(*note_at, legend.note, fontsize=9, va="center", ha="left", color="0.2")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.04, facecolor="white")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def legend_strip(legends: Sequence[Legend], width: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """The legends' blocks side by side, wrapped onto more lines to stay within ``width`` pixels
    (a block wider than that gets a line of its own). Returns the strip and, per block, its
    ``title`` and ``box`` (x, y, w, h) in the strip."""
    blocks = [legend_block(lg) for lg in legends]
    boxes: list[tuple[int, int, int, int]] = []
    x = y = line_h = 0
    for b in blocks:
        if x and x + b.width > width:
            x, y, line_h = 0, y + line_h + 8, 0
        boxes.append((x, y, b.width, b.height))
        x += b.width + LEGEND_SPACING
        line_h = max(line_h, b.height)
    strip = Image.new("RGB", (max((bx + bw for bx, _, bw, _ in boxes), default=1), y + line_h or 1), "white")
    for b, (bx, by, _, _) in zip(blocks, boxes):
        strip.paste(b, (bx, by))
    return strip, [{"title": lg.title, "box": box} for lg, box in zip(legends, boxes)]


# ----------------------------------------------------------------------------- the grid


def grid_columns(rows: Sequence[Mapping[str, Any]], tasks: Optional[Sequence[str]] = None,
                 sources: Optional[Sequence[str]] = None) -> list[tuple[str, str]]:
    """The ``(source, task)`` columns of a grid: tasks in canonical order, sources in order of first
    appearance; a column is kept when at least one row has a label for it."""
    seen_sources: list[str] = []
    have: set[tuple[str, str]] = set()
    for r in rows:
        for src, labels in r.get("labels", {}).items():
            if src not in seen_sources:
                seen_sources.append(src)
            for t, lab in (labels or {}).items():
                if lab is not None:
                    have.add((src, t))
    srcs = list(sources) if sources is not None else seen_sources
    all_tasks = {t for _, t in have}
    order = [t for t in registered_task_names() if t in all_tasks] + sorted(all_tasks - set(registered_task_names()))
    task_list = [t for t in (tasks if tasks is not None else order) if t in all_tasks]
    return [(s, t) for t in task_list for s in srcs if (s, t) in have]


def reference_labels(rows: Sequence[Mapping[str, Any]], task: str) -> list[Any]:
    """The labels of ``task`` that set its value range in the grid: the ground truth's (a source
    named as in :data:`TRUTH_SOURCES`) when it has any, else every source's."""
    def labels_of(keep) -> list[Any]:
        return [lab.get(task) for r in rows for src, lab in r.get("labels", {}).items()
                if keep(src) and lab and lab.get(task) is not None]

    return labels_of(lambda s: s.lower() in TRUTH_SOURCES) or labels_of(lambda s: True)


def render_grid(rows: Sequence[Mapping[str, Any]], out_png: str, *, tasks: Optional[Sequence[str]] = None,
                sources: Optional[Sequence[str]] = None, class_names: Sequence[str] = (), scale: int = 3,
                gap: int = 4, title: Optional[str] = None, legend: bool = True) -> dict[str, Any]:
    """Draw the label grid, with its legend underneath (unless ``legend`` is false), and save it
    as ``out_png``.

    ``rows``: one dict per image, ``{"image": uint8 (H, W, 3), "labels": {source: {task: label}},
    "id": optional str}`` (labels in the task's native form, ``None`` = none). Columns: the input
    image, then for each task each source that has it (:func:`grid_columns`), under a two-line
    header (source, task). Returns the layout: ``path``, ``size`` (w, h), ``scale``, ``columns``,
    ``panel_size`` (w, h of the largest image), ``origins`` (per row, per column incl. the input
    column, the panel's top-left pixel), ``value_ranges`` (per task) and ``legend`` (per block its
    ``title`` and ``box`` (x, y, w, h) on the picture) — enough to find any drawn pixel."""
    if not rows:
        raise ValueError("render_grid needs at least one row")
    cols = grid_columns(rows, tasks, sources)
    drawers: dict[str, Task] = {t: build_task(t, len(class_names)) for t in dict.fromkeys(t for _, t in cols)}
    ranges = {t: task.draw_range(reference_labels(rows, t)) for t, task in drawers.items()}
    legends = [lg for t, task in drawers.items() if (lg := task.legend(class_names, ranges[t])) is not None]
    pw = max(np.asarray(r["image"]).shape[1] for r in rows) * scale
    ph = max(np.asarray(r["image"]).shape[0] for r in rows) * scale
    hfont = font(13)
    line_h = text_size(ImageDraw.Draw(Image.new("RGB", (1, 1))), "Hg", hfont)[1] + 5
    title_h = line_h + 6 if title else 0
    header_h = 2 * line_h + 6
    ncols = 1 + len(cols)
    grid_w = gap + ncols * (pw + gap)
    panels_bottom = title_h + header_h + len(rows) * (ph + gap)
    strip, blocks = legend_strip(legends, grid_w - 4 * gap) if legend and legends else (None, [])
    width = max(grid_w, strip.width + 4 * gap) if strip else grid_w
    height = panels_bottom + (strip.height + 6 * gap if strip else gap)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 3), title, fill=(0, 0, 0), font=hfont, anchor="lt")
    for ci, lines in enumerate([("input", "")] + cols):
        x = gap + ci * (pw + gap)
        for li, text in enumerate(lines):
            text = fit_text(draw, text, hfont, pw)
            tw, _ = text_size(draw, text, hfont)
            draw.text((x + (pw - tw) // 2, title_h + 3 + li * line_h), text, fill=(0, 0, 0), font=hfont, anchor="lt")
    origins: list[list[tuple[int, int]]] = []
    for ri, row in enumerate(rows):
        image = upscale(row["image"], scale)
        y = title_h + header_h + ri * (ph + gap)
        row_origins = [(gap + ci * (pw + gap), y) for ci in range(ncols)]
        canvas.paste(Image.fromarray(image), row_origins[0])
        for (src, t), origin in zip(cols, row_origins[1:]):
            label = (row.get("labels", {}).get(src) or {}).get(t)
            panel = _no_label_panel(image.shape[1], image.shape[0]) if label is None else Image.fromarray(
                drawers[t].draw(label, image, class_names=class_names, value_range=ranges[t]))
            canvas.paste(panel, origin)
        origins.append(row_origins)
    legend_origin = (2 * gap, panels_bottom + 3 * gap)
    if strip:
        draw.line((gap, panels_bottom + gap, width - gap, panels_bottom + gap), fill=(200, 200, 200))
        canvas.paste(strip, legend_origin)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    canvas.save(out_png)
    return {"path": out_png, "size": canvas.size, "scale": scale, "columns": [list(c) for c in cols],
            "panel_size": (pw, ph), "origins": origins, "rows": len(rows), "value_ranges": ranges,
            "legend": [{"title": b["title"], "box": (b["box"][0] + legend_origin[0], b["box"][1] + legend_origin[1],
                                                     b["box"][2], b["box"][3])} for b in blocks]}


# ----------------------------------------------------------------------------- rows


def collect_grid_rows(table_path: str, n: int = 8, *, models: Optional[Mapping[str, str | Sequence[str]]] = None,
                      label_tables: Optional[Mapping[str, str]] = None, truth: bool = True,
                      truth_name: str = "ground truth", device: str = "cpu") -> list[dict[str, Any]]:
    """Rows for :func:`render_grid` from the first ``n`` images of the examples table
    ``table_path``: its own labels as ``truth_name`` (if ``truth``), each model's predictions
    (``models``: ``{source name: model file or list of files}`` — e.g. ``{"teachers": [five
    teacher files], "student": path}``; files listed under one source are merged task by task),
    and each label table's rows with the same ``image_id`` (``label_tables``: ``{source name:
    table}``, e.g. the pseudo labels when ``table_path`` is the unlabelled pool)."""
    table = pads.dataset(table_path, format="parquet").head(n)
    ids = table.column("image_id").to_pylist()
    images = [decode_image(b) for b in table.column("image").to_pylist()]
    rows = [{"id": i, "image": im, "labels": {}} for i, im in zip(ids, images)]

    def add(source: str, task: str, labels: Sequence[Any]) -> None:
        for r, lab in zip(rows, labels):
            r["labels"].setdefault(source, {})
            if lab is not None or task not in r["labels"][source]:
                r["labels"][source][task] = lab

    def labels_in(tbl: pa.Table) -> dict[str, list[Any]]:
        tasks = (build_task(t, 1) for t in registered_task_names())
        return {task.name: decode_column(task, tbl) for task in tasks if task.presence_column() in tbl.column_names}

    if truth:
        for t, labs in labels_in(table).items():
            add(truth_name, t, labs)
    for source, paths in (models or {}).items():
        for path in ([paths] if isinstance(paths, str) else list(paths)):
            model, info = load_model(path, map_location=device)
            for t, labs in predict_labels(model, info["tasks"], images, info.get("image_size"), device).items():
                add(source, t, labs)
    for source, path in (label_tables or {}).items():
        lt = pads.dataset(path, format="parquet").to_table(filter=pads.field("image_id").isin(ids))
        order = {i: k for k, i in enumerate(lt.column("image_id").to_pylist())}
        present = [order[i] for i in ids if i in order]
        if not present:
            continue
        sub = lt.take(pa.array(present, pa.int64()))
        position = {i: k for k, i in enumerate(sub.column("image_id").to_pylist())}
        for t, labs in labels_in(sub).items():
            add(source, t, [labs[position[i]] if i in position else None for i in ids])
    return rows


__all__ = ["collect_grid_rows", "grid_columns", "legend_block", "legend_strip", "reference_labels", "render_grid",
           "upscale"]
