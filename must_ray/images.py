"""Robust decoding of real-world image files into RGB arrays.

Shared by the labeller and the dataset importers: whatever a user's folder holds (JPEG, PNG,
WebP, GIF, BMP, TIFF; grayscale, palette, alpha, 16-bit, CMYK; rotated by EXIF; the first frame
of an animation), it becomes uint8 RGB the same way everywhere, and anything that cannot be
decoded raises :class:`BadImageError` with a short reason meant for a quarantine table.
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: default cap on decoded pixels; bigger images are treated as decompression bombs
DEFAULT_MAX_PIXELS = 50_000_000
_OBJECT_ADDRESS = re.compile(r"\s+at\s+0x[0-9a-fA-F]+")


def stable_detail(text: str, limit: int = 200) -> str:
    """``text`` without Python object addresses (PIL says ``<_io.BytesIO object at 0x7f...>``),
    cut to ``limit`` characters: a quarantine detail must be the same on every rerun, so that a
    rerun writes the same quarantine table byte for byte."""
    return _OBJECT_ADDRESS.sub("", text)[:limit]


class BadImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short machine-friendly tag
    (``empty``, ``not_an_image``, ``truncated``, ``too_large``, ``decode_error``)."""

    def __init__(self, reason: str, detail: str = ""):
        detail = stable_detail(detail)
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grey: scale the full range to 8 bits instead of clipping at 255
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = np.clip(arr / (hi if hi > 0 else 1.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to uint8 RGB (H, W, 3) with EXIF orientation applied.

    The size is checked from the header *before* pixels are decoded, so a decompression bomb
    costs nothing. Raises :class:`BadImageError` for empty, non-image, truncated, oversized or
    otherwise undecodable input."""
    if not data:
        raise BadImageError("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImageError("too_large", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
            if w < 1 or h < 1:
                raise BadImageError("decode_error", f"invalid size {w}x{h}")
            img.load()
            img = ImageOps.exif_transpose(img)
            arr = np.asarray(_to_rgb(img))
    except BadImageError:
        raise
    except UnidentifiedImageError as exc:
        raise BadImageError("not_an_image", str(exc)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc)
        reason = "truncated" if "truncated" in text.lower() or "broken data stream" in text.lower() else "decode_error"
        raise BadImageError(reason, text) from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise BadImageError("decode_error", f"unexpected decoded shape {arr.shape} {arr.dtype}")
    return np.ascontiguousarray(arr)


def resize_rgb(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of a uint8 RGB array to ``size`` (square side or (H, W))."""
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a uint8 (H, W) / (H, W, 3) array or a uint16 (H, W) array (16-bit grey).
    Level 1 compression: labels are written once and read many times, speed beats size."""
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        if array.ndim != 2:
            raise ValueError(f"uint16 PNG must be (H, W), got {array.shape}")
        img = Image.fromarray(array)  # mode I;16
    elif array.dtype == np.uint8:
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise ValueError(f"uint8 PNG must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
        img = Image.fromarray(array)
    else:
        raise ValueError(f"PNG encoding needs uint8 or uint16, got {array.dtype}")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes, dtype: type = np.uint8) -> np.ndarray:
    """Inverse of :func:`encode_png` for label maps (no colour conversion)."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img)
    if arr.dtype != dtype:
        if dtype == np.uint16 and arr.dtype in (np.int32, np.uint8):
            arr = arr.astype(np.uint16)
        else:
            raise ValueError(f"PNG decodes to {arr.dtype}, expected {np.dtype(dtype).name}")
    return arr


def decode_image_rgb(data: bytes) -> np.ndarray:
    """Decode an image cell to uint8 RGB (H, W, 3), whatever its mode."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)
