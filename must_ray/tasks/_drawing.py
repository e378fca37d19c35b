"""Drawing primitives the task modules share when they draw their labels for the label grid
(:meth:`~must_ray.tasks.base.Task.draw`): one class palette (a category has the same colour in
boxes and segmentation masks), matplotlib colour maps as lookup tables, a robust value range,
the font, a caption band and a box tag.

Not a task: the registry skips modules whose name starts with ``_``. matplotlib is imported only
when a colour map or the font is first asked for, so processes that merely train or label with the
tasks never load it.
"""
from __future__ import annotations

import functools
import os
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]

#: palette index 0 = background, c + 1 = category c, 255 = ignore (black)
_BASE_COLOURS = [
    (60, 60, 72), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
    (255, 215, 180), (0, 0, 128), (128, 128, 128),
]
#: colour of pixels without a value (ignore, invalid depth, zero normals)
INVALID_COLOUR: Colour = (0, 0, 0)


def _palette() -> np.ndarray:
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(_BASE_COLOURS)] = _BASE_COLOURS
    rng = np.random.default_rng(12345)  # fixed: the same colours in every run
    pal[len(_BASE_COLOURS):255] = rng.integers(64, 256, (255 - len(_BASE_COLOURS), 3))
    pal[255] = INVALID_COLOUR
    return pal


#: (256, 3) uint8 lookup table of class-map values: ``SEG_PALETTE[mask]`` colours a class map
SEG_PALETTE = _palette()


def class_colour(c: int) -> Colour:
    """Colour of object category ``c`` (``-1`` = background), the same in boxes and masks."""
    return tuple(int(v) for v in SEG_PALETTE[(int(c) + 1) % 255])


@functools.lru_cache(maxsize=None)
def colormap_lut(name: str = "viridis") -> np.ndarray:
    """matplotlib's colour map ``name`` as a (256, 3) uint8 lookup table."""
    import matplotlib

    return np.round(matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def robust_range(maps: Iterable[np.ndarray], positive: bool = False) -> tuple[float, float]:
    """The (2nd, 98th) percentile range of the finite values (only those > 0 when ``positive``)
    of ``maps``, so that a few outliers do not wash out a colour map; (0, 1) without values."""
    vals = [np.asarray(m, dtype=np.float64).reshape(-1) for m in maps]
    vals = np.concatenate(vals) if vals else np.zeros(0)
    vals = vals[np.isfinite(vals) & ((vals > 0) if positive else True)]
    if not vals.size:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [2, 98])
    return float(lo), float(max(hi, lo + 1e-6))


def colour_map(values: np.ndarray, lo: float, hi: float, cmap: str = "viridis",
               valid: Optional[np.ndarray] = None) -> np.ndarray:
    """A scalar map (H, W) -> uint8 RGB through ``cmap`` with ``lo`` at its start and ``hi`` at its
    end (clipped); pixels outside ``valid`` (default: non-finite ones) are black."""
    v = np.asarray(values, dtype=np.float64)
    valid = np.isfinite(v) if valid is None else np.asarray(valid, dtype=bool)
    t = np.clip((np.where(valid, v, lo) - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    rgb = colormap_lut(cmap)[np.round(t * 255).astype(np.int64)]
    rgb[~valid] = INVALID_COLOUR
    return rgb


@functools.lru_cache(maxsize=None)
def font(size: int = 12) -> ImageFont.ImageFont:
    """DejaVu Sans at ``size`` px, the face matplotlib draws the legends and curves with (Pillow's
    default font when matplotlib's copy is missing)."""
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, fnt: ImageFont.ImageFont) -> tuple[int, int]:
    """Width and height in pixels of ``text`` drawn in ``fnt``."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=fnt, anchor="lt")
    return int(x1 - x0), int(y1 - y0)


def fit_text(draw: ImageDraw.ImageDraw, text: str, fnt: ImageFont.ImageFont, width: int) -> str:
    """``text``, shortened with an ellipsis until it is at most ``width`` pixels wide."""
    while text_size(draw, text, fnt)[0] > width and len(text) > 2:
        text = text.rstrip("…")[:-1] + "…"
    return text


def caption(image: np.ndarray, text: str, size: int = 12) -> np.ndarray:
    """``image`` (uint8 RGB) with ``text`` centred on a dark band along its bottom edge."""
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(img, "RGBA")
    fnt = font(size)
    text = fit_text(draw, text, fnt, img.width - 4)
    tw, th = text_size(draw, text, fnt)
    band = th + 6
    draw.rectangle((0, img.height - band, img.width, img.height), fill=(0, 0, 0, 170))
    draw.text(((img.width - tw) // 2, img.height - band + 3), text, fill=(255, 255, 255), font=fnt, anchor="lt")
    return np.asarray(img)


def box_rect(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel rectangle (inclusive ``x0, y0, x1, y1``) of a normalised xyxy box on a panel of
    ``width`` x ``height`` pixels: where a box's outline is stroked."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (int(round(x0 * width)), int(round(y0 * height)),
            max(int(round(x0 * width)), int(round(x1 * width)) - 1),
            max(int(round(y0 * height)), int(round(y1 * height)) - 1))


def draw_tag(draw: ImageDraw.ImageDraw, rect: Sequence[int], text: str, colour: Colour,
             fnt: ImageFont.ImageFont, width: int, line_width: int = 2) -> None:
    """A name tag for the box ``rect`` on a panel ``width`` pixels wide: ``text`` on a ``colour``
    filled label just above the box (inside its top edge when there is no room above), black or
    white text by luminance."""
    x0, y0 = int(rect[0]), int(rect[1])
    tw, th = text_size(draw, text, fnt)
    ty = y0 - th - 3 if y0 - th - 3 >= 0 else y0 + line_width
    tx = min(max(x0, 0), max(0, width - tw - 4))
    draw.rectangle((tx, ty, tx + tw + 3, ty + th + 2), fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((tx + 2, ty + 1), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=fnt, anchor="lt")
