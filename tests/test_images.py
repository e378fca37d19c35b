"""Robust image decoding: modes, EXIF, and bad inputs with reasons."""
import io

import numpy as np
import pytest
from PIL import Image

from must_ray.images import BadImageError, decode_image, resize_rgb


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP"), ("RGB", "BMP"),
                                        ("RGB", "TIFF"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
                                        ("LA", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("CMYK", "TIFF")])
def test_every_mode_becomes_rgb(mode, fmt):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.arange(240).reshape(12, 20) * 250).astype(np.uint16))
    else:
        img = base.convert(mode)
    arr = decode_image(_encode(img, fmt))
    assert arr.shape == (12, 20, 3) and arr.dtype == np.uint8
    if mode == "I;16":
        assert arr.max() == 255 and arr.min() == 0  # full range kept, not clipped
    if (mode, fmt) == ("RGB", "PNG"):
        assert np.array_equal(arr, np.asarray(base))


def test_alpha_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    arr = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.all(arr == 255)


def test_exif_orientation_applied():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 5, 10))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    arr = decode_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert arr.shape == (30, 10, 3)
    assert arr[:5].mean() > 200 and arr[-5:].mean() < 50  # stripe moved to the top


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"this is not an image at all", "not_an_image"),
])
def test_bad_bytes(data, reason):
    with pytest.raises(BadImageError) as info:
        decode_image(data)
    assert info.value.reason == reason


def test_truncated_and_bomb():
    good = _encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(BadImageError) as info:
        decode_image(good[: len(good) // 2])
    assert info.value.reason in ("truncated", "decode_error")
    big = _encode(Image.new("L", (4000, 4000)), "PNG")  # compresses to a few KB
    with pytest.raises(BadImageError) as info:
        decode_image(big, max_pixels=1_000_000)
    assert info.value.reason == "too_large"


def test_resize_rgb():
    arr = np.zeros((10, 20, 3), np.uint8)
    assert resize_rgb(arr, 8).shape == (8, 8, 3)
    assert resize_rgb(arr, (5, 7)).shape == (5, 7, 3)
