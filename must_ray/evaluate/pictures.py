"""Pictures of a run, drawn with Pillow only: the label grid and the training curves.

* :func:`render_grid` — one row per image: the input, then for every task and every *source*
  (ground truth, the teachers' pseudo labels, the student's predictions ...) that task's label
  drawn: boxes with class names on the image, segmentation colour-mapped with a fixed palette
  (255 = ignore is black), depth through a viridis-like LUT (near = bright, one range per row so
  the panels of a row compare), normals as RGB ``(n + 1) / 2`` (invalid black), classification as
  a caption (top-1 name and probability) under the image. Images are upscaled ``scale`` x with
  nearest neighbour, so 64x64 scenes stay crisp.
* :func:`collect_grid_rows` — builds those rows from an examples table (ground truth), model
  files (predictions) and label tables (pseudo labels, matched by ``image_id``).
* :func:`plot_curves` — training curves from each run's ``metrics.jsonl`` (one JSON object per
  report with ``step``): one panel per loss key (every key starting with ``loss``: the trainer's
  ``loss`` and ``loss_<task>``; nested ``{"loss": {"depth": x}}`` reads as ``loss/depth``; null
  values skipped), one line per run, axes with ticks, a legend; log-scale y when the losses span
  more than 20x.
* :func:`markdown_table` — re-exported from :mod:`must_ray.evaluate.scoring` for reports.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from must_ray.io import md_table as markdown_table
from must_ray.tasks import registered_task_names

# ----------------------------------------------------------------------------- colour maps

#: segmentation / detection palette: index 0 = background, c + 1 = category c; 255 = ignore (black)
_BASE_COLOURS = [
    (60, 60, 72), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
    (255, 215, 180), (0, 0, 128), (128, 128, 128),
]


def _palette() -> np.ndarray:
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(_BASE_COLOURS)] = _BASE_COLOURS
    rng = np.random.default_rng(12345)  # fixed: the same colours in every run
    pal[len(_BASE_COLOURS):255] = rng.integers(64, 256, (255 - len(_BASE_COLOURS), 3))
    pal[255] = (0, 0, 0)
    return pal


SEG_PALETTE = _palette()
IGNORE_COLOUR = (0, 0, 0)
INVALID_COLOUR = (0, 0, 0)

# viridis sampled at 9 points, linearly interpolated to 256 entries
_VIRIDIS_POINTS = [(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129),
                   (92, 200, 99), (170, 220, 50), (253, 231, 37)]


def _lut(points: Sequence[tuple[int, int, int]]) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    x = np.linspace(0, 1, len(pts))
    t = np.linspace(0, 1, 256)
    return np.stack([np.interp(t, x, pts[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


VIRIDIS = _lut(_VIRIDIS_POINTS)

#: line colours of runs in :func:`plot_curves` (tab10)
RUN_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def class_colour(c: int) -> tuple[int, int, int]:
    """Colour of object category ``c`` (the same in boxes and segmentation masks)."""
    return tuple(int(v) for v in SEG_PALETTE[(int(c) + 1) % 255])


def colorize_segmentation(mask: np.ndarray) -> np.ndarray:
    """uint8 class map (0 = background, c + 1 = category c, 255 = ignore) -> RGB."""
    return SEG_PALETTE[np.asarray(mask).astype(np.uint8)]


def depth_range(depths: Iterable[Optional[np.ndarray]]) -> tuple[float, float]:
    """A robust (2nd, 98th percentile) range of the valid values of the given depth maps."""
    vals = [np.asarray(d, dtype=np.float64) for d in depths if d is not None]
    vals = [v[np.isfinite(v) & (v > 0)] for v in vals]
    vals = np.concatenate(vals) if vals else np.zeros(0)
    if not vals.size:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [2, 98])
    return float(lo), float(max(hi, lo + 1e-6))


def colorize_depth(depth: np.ndarray, lo: Optional[float] = None, hi: Optional[float] = None) -> np.ndarray:
    """Metric depth (0 = invalid, black) -> RGB through :data:`VIRIDIS`, near = bright (yellow),
    far = dark (purple); ``lo``/``hi`` default to the map's own robust range."""
    d = np.asarray(depth, dtype=np.float64)
    if lo is None or hi is None:
        lo, hi = depth_range([d])
    valid = np.isfinite(d) & (d > 0)
    t = 1.0 - np.clip((d - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    rgb = VIRIDIS[np.where(valid, np.round(t * 255), 0).astype(np.int64)]
    rgb[~valid] = INVALID_COLOUR
    return rgb


def colorize_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals (H, W, 3) -> RGB ``(n + 1) / 2``; zero (invalid) vectors are black."""
    n = np.asarray(normals, dtype=np.float64)
    rgb = np.clip(np.round((n + 1.0) * 127.5), 0, 255).astype(np.uint8)
    rgb[np.linalg.norm(n, axis=-1) < 0.5] = INVALID_COLOUR
    return rgb


# ----------------------------------------------------------------------------- drawing helpers


def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (a bitmap fallback without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, fnt) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=fnt)
    return x1 - x0, y1 - y0


def upscale(rgb: np.ndarray, scale: int) -> Image.Image:
    """uint8 RGB array -> PIL image upscaled ``scale`` x (nearest neighbour)."""
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    return img if scale == 1 else img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def box_rect(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel rectangle (inclusive ``x0, y0, x1, y1``) of a normalised xyxy box on a panel of
    ``width`` x ``height`` pixels: where :func:`draw_boxes` strokes its outer edge."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (int(round(x0 * width)), int(round(y0 * height)),
            max(int(round(x0 * width)), int(round(x1 * width)) - 1),
            max(int(round(y0 * height)), int(round(y1 * height)) - 1))


def draw_boxes(img: Image.Image, label: Mapping[str, Any], class_names: Sequence[str] = (),
               line_width: int = 2) -> Image.Image:
    """Draw a detection label (normalised boxes) on ``img`` in place: a ``line_width`` outline in
    the class colour, and the class name (and score below 1) on a tag in that colour."""
    draw = ImageDraw.Draw(img)
    fnt = font(10)
    boxes = np.asarray(label.get("boxes", []), dtype=np.float64).reshape(-1, 4)
    classes = np.asarray(label.get("classes", []), dtype=np.int64).reshape(-1)
    scores = np.asarray(label.get("scores", np.ones(len(boxes))), dtype=np.float64).reshape(-1)
    order = np.argsort(scores, kind="stable")  # best drawn last (on top)
    for i in order:
        colour = class_colour(classes[i])
        x0, y0, x1, y1 = box_rect(boxes[i], img.width, img.height)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line_width)
        c = int(classes[i])
        text = class_names[c] if 0 <= c < len(class_names) else str(c)
        if scores[i] < 0.995:
            text += f" {scores[i]:.2f}"
        tw, th = _text_size(draw, text, fnt)
        ty = y0 - th - 3 if y0 - th - 3 >= 0 else y0 + line_width
        tx = min(max(x0, 0), max(0, img.width - tw - 4))
        draw.rectangle((tx, ty, tx + tw + 3, ty + th + 2), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tx + 2, ty), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=fnt,
                  anchor="lt")
    return img


def _caption(img: Image.Image, text: str) -> Image.Image:
    draw = ImageDraw.Draw(img, "RGBA")
    fnt = font(12)
    tw, th = _text_size(draw, text, fnt)
    band = th + 6
    draw.rectangle((0, img.height - band, img.width, img.height), fill=(0, 0, 0, 170))
    draw.text(((img.width - tw) // 2, img.height - band + 3), text, fill=(255, 255, 255), font=fnt, anchor="lt")
    return img


def render_panel(task: str, label: Any, image: np.ndarray, scale: int = 3, class_names: Sequence[str] = (),
                 depth_lo_hi: Optional[tuple[float, float]] = None) -> Image.Image:
    """One grid cell: ``label`` of ``task`` drawn for ``image`` (uint8 RGB), ``scale`` x upscaled.
    Dense labels of another size than the image are nearest-resized to it. ``None`` -> a grey
    "no label" panel."""
    h, w = np.asarray(image).shape[:2]
    if label is None:
        img = Image.new("RGB", (w * scale, h * scale), (40, 40, 40))
        draw = ImageDraw.Draw(img)
        fnt = font(12)
        tw, th = _text_size(draw, "no label", fnt)
        draw.text(((img.width - tw) // 2, (img.height - th) // 2), "no label", fill=(160, 160, 160), font=fnt, anchor="lt")
        return img
    if task == "detection":
        return draw_boxes(upscale(image, scale), label, class_names)
    if task == "classification":
        c = int(label["label"])
        probs = np.asarray(label.get("topk_probs", [1.0]), dtype=np.float64).reshape(-1)
        ids = np.asarray(label.get("topk_ids", [c]), dtype=np.int64).reshape(-1)
        p = float(probs[list(ids).index(c)]) if c in ids else (float(probs[0]) if probs.size else 1.0)
        name = class_names[c] if 0 <= c < len(class_names) else str(c)
        return _caption(upscale(image, scale), f"{name} {p:.2f}")
    arr = np.asarray(label)
    if arr.shape[:2] != (h, w):
        from must_ray.tasks.base import Crop, resize_nearest

        arr = resize_nearest(arr, Crop(), (h, w))
    if task == "segmentation":
        rgb = colorize_segmentation(arr)
    elif task == "depth":
        lo, hi = depth_lo_hi if depth_lo_hi else depth_range([arr])
        rgb = colorize_depth(arr, lo, hi)
    elif task == "normals":
        rgb = colorize_normals(arr)
    elif arr.ndim == 2:  # an unknown dense task: grey-scale of its value range
        a = arr.astype(np.float64)
        a = (a - np.nanmin(a)) / max(float(np.nanmax(a) - np.nanmin(a)), 1e-9)
        rgb = np.repeat((a * 255).astype(np.uint8)[..., None], 3, axis=2)
    else:
        rgb = np.clip(arr, 0, 255).astype(np.uint8)
    return upscale(rgb, scale)


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


def render_grid(rows: Sequence[Mapping[str, Any]], out_png: str, *, tasks: Optional[Sequence[str]] = None,
                sources: Optional[Sequence[str]] = None, class_names: Sequence[str] = (), scale: int = 3,
                gap: int = 4, title: Optional[str] = None) -> dict[str, Any]:
    """Draw the label grid and save it as ``out_png``.

    ``rows``: one dict per image, ``{"image": uint8 (H, W, 3), "labels": {source: {task: label}},
    "id": optional str}`` (labels in the task's native form, ``None`` = none). Columns: the input
    image, then for each task each source that has it (:func:`grid_columns`), with a two-line
    header (source, task). Depth panels of a row share the ground truth's range (or the union of
    the row's depth maps). Returns the layout: ``path``, ``size`` (w, h), ``scale``, ``columns``,
    ``panel_size`` (w, h of the largest image), ``origins`` (per row, per column incl. the input
    column, the panel's top-left pixel) — enough to find any drawn pixel."""
    if not rows:
        raise ValueError("render_grid needs at least one row")
    cols = grid_columns(rows, tasks, sources)
    pw = max(np.asarray(r["image"]).shape[1] for r in rows) * scale
    ph = max(np.asarray(r["image"]).shape[0] for r in rows) * scale
    hfont = font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Hg", hfont)[1] + 4
    title_h = line_h + 6 if title else 0
    header_h = 2 * line_h + 6
    ncols = 1 + len(cols)
    width = gap + ncols * (pw + gap)
    height = title_h + header_h + len(rows) * (ph + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 3), title, fill=(0, 0, 0), font=hfont, anchor="lt")
    headers = [("input", "")] + [(s, t) for s, t in cols]
    for ci, (line1, line2) in enumerate(headers):
        x = gap + ci * (pw + gap)
        for li, text in enumerate((line1, line2)):
            if not text:
                continue
            tw, _ = _text_size(draw, text, hfont)
            while tw > pw and len(text) > 2:  # ellipsise long source names
                text = text.rstrip("…")[:-1] + "…"
                tw, _ = _text_size(draw, text, hfont)
            draw.text((x + (pw - tw) // 2, title_h + 3 + li * line_h), text, fill=(0, 0, 0), font=hfont, anchor="lt")
    origins: list[list[tuple[int, int]]] = []
    for ri, row in enumerate(rows):
        image = np.asarray(row["image"], dtype=np.uint8)
        labels = row.get("labels", {})
        y = title_h + header_h + ri * (ph + gap)
        gt_src = next((s for s in labels if s.lower() in ("ground truth", "gt", "truth")), None)
        depths = [labels[gt_src].get("depth")] if gt_src and labels[gt_src].get("depth") is not None else \
            [lab.get("depth") for lab in labels.values() if lab and lab.get("depth") is not None]
        lo_hi = depth_range(depths) if depths else None
        row_origins = []
        for ci in range(ncols):
            x = gap + ci * (pw + gap)
            row_origins.append((x, y))
            if ci == 0:
                panel = upscale(image, scale)
            else:
                src, task = cols[ci - 1]
                panel = render_panel(task, (labels.get(src) or {}).get(task), image, scale, class_names, lo_hi)
            canvas.paste(panel, (x, y))
        origins.append(row_origins)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    canvas.save(out_png)
    return {"path": out_png, "size": canvas.size, "scale": scale, "columns": [list(c) for c in cols],
            "panel_size": (pw, ph), "origins": origins, "rows": len(rows)}


def collect_grid_rows(table_path: str, n: int = 8, *, models: Optional[Mapping[str, str | Sequence[str]]] = None,
                      label_tables: Optional[Mapping[str, str]] = None, truth: bool = True,
                      truth_name: str = "ground truth", device: str = "cpu") -> list[dict[str, Any]]:
    """Rows for :func:`render_grid` from the first ``n`` images of the examples table
    ``table_path``: its own labels as ``truth_name`` (if ``truth``), each model's predictions
    (``models``: ``{source name: model file or list of files}`` — e.g. ``{"teachers": [five
    teacher files], "student": path}``; files listed under one source are merged task by task),
    and each label table's rows with the same ``image_id`` (``label_tables``: ``{source name:
    table}``, e.g. the pseudo labels when ``table_path`` is the unlabelled pool)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from must_ray.evaluate.scoring import predict_labels
    from must_ray.images import decode_image
    from must_ray.table import decode_column
    from must_ray.tasks import build_task

    ds = pads.dataset(table_path, format="parquet")
    table = ds.head(n)
    ids = table.column("image_id").to_pylist()
    images = [decode_image(b) for b in table.column("image").to_pylist()]
    rows = [{"id": i, "image": im, "labels": {}} for i, im in zip(ids, images)]

    def add(source: str, task: str, labels: Sequence[Any]) -> None:
        for r, lab in zip(rows, labels):
            r["labels"].setdefault(source, {})
            if lab is not None or task not in r["labels"][source]:
                r["labels"][source][task] = lab

    def decode_all(tbl: pa.Table, source: str) -> None:
        for t in registered_task_names():
            task = build_task(t, 1)
            if task.presence_column() in tbl.column_names:
                add(source, t, decode_column(task, tbl))

    if truth:
        decode_all(table, truth_name)
    for source, paths in (models or {}).items():
        from must_ray.models import load_model

        for path in ([paths] if isinstance(paths, str) else list(paths)):
            model, info = load_model(path, map_location=device)
            preds = predict_labels(model, info["tasks"], images, info.get("image_size"), device)
            for t, labs in preds.items():
                add(source, t, labs)
    for source, path in (label_tables or {}).items():
        lt = pads.dataset(path, format="parquet").to_table(filter=pads.field("image_id").isin(ids))
        order = {i: k for k, i in enumerate(lt.column("image_id").to_pylist())}
        take = [order.get(i) for i in ids]
        if all(k is None for k in take):
            continue
        present = [k for k in take if k is not None]
        sub = lt.take(pa.array(present, pa.int64()))
        labels_by_id: dict[str, dict[str, Any]] = {}
        for t in registered_task_names():
            task = build_task(t, 1)
            if task.presence_column() in sub.column_names:
                for i, lab in zip(sub.column("image_id").to_pylist(), decode_column(task, sub)):
                    labels_by_id.setdefault(i, {})[t] = lab
        tasks_here = sorted({t for d in labels_by_id.values() for t in d})
        for t in tasks_here:
            add(source, t, [labels_by_id.get(i, {}).get(t) for i in ids])
    return rows


# ----------------------------------------------------------------------------- training curves


def _flatten(rec: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in rec.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            yield from _flatten(v, key)
        else:
            yield key, v


def read_curves(path: str) -> dict[str, list[tuple[float, float]]]:
    """``{loss key: [(step, value), ...]}`` from one ``metrics.jsonl`` (bad lines, non-numeric and
    non-finite values skipped; a record without ``step`` uses its line number)."""
    series: dict[str, list[tuple[float, float]]] = {}
    if not os.path.isfile(path):
        return series
    with open(path) as f:
        for lineno, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, Mapping):
                continue
            step = rec.get("step", lineno)
            if isinstance(step, bool) or not isinstance(step, (int, float)):
                step = lineno
            for key, v in _flatten(rec):
                if not key.startswith("loss") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if math.isfinite(v):
                    series.setdefault(key, []).append((float(step), float(v)))
    for pts in series.values():
        pts.sort(key=lambda p: p[0])
    return series


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering ``[lo, hi]``."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 10000 or a < 1e-3:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    if float(v).is_integer():
        return str(int(v))
    return f"{v:.3g}"


def _task_order(key: str) -> tuple:
    if key == "loss":
        return (0, 0, key)
    task = key[5:] if key[:5] in ("loss/", "loss_", "loss.") else key
    names = registered_task_names()
    return (1, names.index(task) if task in names else len(names), key)


def plot_curves(metrics_jsonl_paths: Mapping[str, str], out_png: str, *, keys: Optional[Sequence[str]] = None,
                panel_size: tuple[int, int] = (420, 280), columns: int = 3, log_y: Optional[bool] = None,
                title: Optional[str] = None) -> dict[str, Any]:
    """Training curves of several runs (``{run name: path to its metrics.jsonl}``) as one PNG.

    One panel per loss key (``loss`` first, then ``loss_<task>`` / ``loss/<task>`` in task order; or
    ``keys``), each
    with every run that reports it (a run keeps its colour in every panel), x = step, y = loss
    (log scale when ``log_y`` or, by default, when a panel's values span more than 20x).
    Missing or empty files are skipped; with no curves at all the PNG says so. Returns ``path``,
    ``size``, ``panels`` (keys), ``runs``, ``points``."""
    runs = {name: read_curves(path) for name, path in metrics_jsonl_paths.items()}
    all_keys = sorted({k for s in runs.values() for k in s}, key=_task_order)
    panel_keys = [k for k in (keys if keys is not None else all_keys) if k in all_keys]
    colours = {name: RUN_COLOURS[i % len(RUN_COLOURS)] for i, name in enumerate(metrics_jsonl_paths)}
    pw, ph = panel_size
    ncols = max(1, min(columns, len(panel_keys) or 1))
    nrows = max(1, math.ceil(len(panel_keys) / ncols))
    title_h = 26 if title else 0
    canvas = Image.new("RGB", (ncols * pw, title_h + nrows * ph), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    tfont, sfont = font(14), font(11)
    if title:
        draw.text((8, 5), title, fill=(0, 0, 0), font=tfont, anchor="lt")
    if not panel_keys:
        draw.text((20, title_h + ph // 2), "no loss curves found", fill=(120, 0, 0), font=tfont, anchor="lt")
    points = 0
    ml, mr, mt, mb = 56, 12, 26, 34  # plot margins inside a panel
    for pi, key in enumerate(panel_keys):
        ox, oy = (pi % ncols) * pw, title_h + (pi // ncols) * ph
        x0, y0, x1, y1 = ox + ml, oy + mt, ox + pw - mr, oy + ph - mb
        lines = {name: s[key] for name, s in runs.items() if key in s and s[key]}
        xs = [p[0] for pts in lines.values() for p in pts]
        ys = [p[1] for pts in lines.values() for p in pts]
        xlo, xhi = min(xs), max(xs)
        if xhi <= xlo:
            xhi = xlo + 1
        ylo, yhi = min(ys), max(ys)
        use_log = log_y if log_y is not None else (ylo > 0 and yhi / ylo > 20)
        use_log = bool(use_log and ylo > 0)
        if use_log:
            ty = lambda v: math.log10(v)  # noqa: E731
            lo_t, hi_t = math.floor(math.log10(ylo) * 10) / 10, math.ceil(math.log10(yhi) * 10) / 10
            if hi_t <= lo_t:
                hi_t = lo_t + 0.1
            yticks = [10.0 ** e for e in range(math.floor(lo_t), math.ceil(hi_t) + 1)]
            if len([t for t in yticks if lo_t <= math.log10(t) <= hi_t]) < 2:
                yticks = [m * 10.0 ** e for e in range(math.floor(lo_t), math.ceil(hi_t) + 1) for m in (1, 2, 5)]
            yticks = [t for t in yticks if lo_t - 1e-9 <= math.log10(t) <= hi_t + 1e-9]
        else:
            ty = lambda v: v  # noqa: E731
            pad = (yhi - ylo) * 0.05 or abs(yhi) * 0.05 or 1.0
            lo_t, hi_t = (ylo - pad if ylo - pad > 0 or ylo < 0 else 0.0), yhi + pad
            yticks = [t for t in nice_ticks(lo_t, hi_t) if lo_t <= t <= hi_t]

        def px(x: float) -> float:
            return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

        def py(y: float) -> float:
            return y1 - (ty(y) - lo_t) / (hi_t - lo_t) * (y1 - y0)

        draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0), width=1)
        for t in yticks:
            yy = py(t)
            draw.line((x0, yy, x1, yy), fill=(225, 225, 225))
            draw.line((x0 - 4, yy, x0, yy), fill=(0, 0, 0))
            label = _fmt_tick(t)
            tw, th = _text_size(draw, label, sfont)
            draw.text((x0 - 6 - tw, yy - th / 2 - 1), label, fill=(0, 0, 0), font=sfont, anchor="lt")
        for t in nice_ticks(xlo, xhi):
            if not xlo <= t <= xhi:
                continue
            xx = px(t)
            draw.line((xx, y0, xx, y1), fill=(235, 235, 235))
            draw.line((xx, y1, xx, y1 + 4), fill=(0, 0, 0))
            label = _fmt_tick(t)
            tw, _ = _text_size(draw, label, sfont)
            draw.text((xx - tw / 2, y1 + 6), label, fill=(0, 0, 0), font=sfont, anchor="lt")
        draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0), width=1)
        tw, _ = _text_size(draw, "step", sfont)
        draw.text(((x0 + x1) / 2 - tw / 2, oy + ph - 14), "step", fill=(60, 60, 60), font=sfont, anchor="lt")
        head = key + ("  (log)" if use_log else "")
        draw.text((x0, oy + 6), head, fill=(0, 0, 0), font=tfont, anchor="lt")
        for name, pts in lines.items():
            xy = [(px(x), py(y)) for x, y in pts]
            points += len(xy)
            if len(xy) == 1:
                cx, cy = xy[0]
                draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colours[name])
            else:
                draw.line(xy, fill=colours[name], width=2, joint="curve")
        # legend, top right inside the plot
        names = list(lines)
        lw = max((_text_size(draw, n, sfont)[0] for n in names), default=0) + 26
        lh = 14 * len(names) + 6
        lx, ly = x1 - lw - 4, y0 + 4
        draw.rectangle((lx, ly, lx + lw, ly + lh), fill=(255, 255, 255), outline=(150, 150, 150))
        for ni, name in enumerate(names):
            yy = ly + 4 + ni * 14
            draw.line((lx + 4, yy + 6, lx + 18, yy + 6), fill=colours[name], width=3)
            draw.text((lx + 22, yy), name, fill=(0, 0, 0), font=sfont, anchor="lt")
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    canvas.save(out_png)
    return {"path": out_png, "size": canvas.size, "panels": panel_keys, "runs": list(metrics_jsonl_paths),
            "points": points}


__all__ = [
    "SEG_PALETTE", "VIRIDIS", "box_rect", "class_colour", "collect_grid_rows", "colorize_depth",
    "colorize_normals", "colorize_segmentation", "draw_boxes", "grid_columns", "markdown_table", "nice_ticks",
    "plot_curves", "read_curves", "render_grid", "render_panel",
]
