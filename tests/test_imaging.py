"""Validation and decoding of uploaded images: every reject has a stable reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermscore import imaging, reasons

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000" / "fullres_sample"


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return sorted(SAMPLES.glob("*.jpg"))[0].read_bytes()


def test_real_jpeg_decodes_to_model_size(jpeg: bytes) -> None:
    out = imaging.decode(jpeg, (144, 192))
    assert out.pixels.shape == (144, 192, 3) and out.pixels.dtype == np.uint8
    assert (out.width, out.height) == (600, 450)
    assert 20 < out.pixels.mean() < 240  # a real photo, not a blank frame


def test_png_is_accepted() -> None:
    png = encode(Image.new("RGB", (120, 90), (200, 120, 90)), "PNG")
    assert imaging.decode(png, (48, 64)).pixels[0, 0].tolist() == [200, 120, 90]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", reasons.ZERO_BYTE),
        (b"this is a text file, not an image\n", reasons.NOT_AN_IMAGE),
        (encode(Image.new("RGB", (64, 64)), "BMP"), reasons.UNSUPPORTED_FORMAT),
        (encode(Image.new("RGB", (64, 64)), "TIFF"), reasons.UNSUPPORTED_FORMAT),
        (encode(Image.new("RGB", (64, 64)), "WEBP"), reasons.UNSUPPORTED_FORMAT),
        (encode(Image.new("RGB", (16, 16)), "JPEG"), reasons.TOO_SMALL),
        # 42 Mpx of 1-bit PNG is a few KB on disk: a classic decompression bomb.
        (encode(Image.new("1", (7000, 6000)), "PNG"), reasons.DECOMPRESSION_BOMB),
    ],
)
def test_rejects_carry_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(reasons.ImageRejected) as exc:
        imaging.decode(payload, (64, 64))
    assert exc.value.reason == reason and exc.value.detail


def test_truncated_jpeg_is_corrupt(jpeg: bytes) -> None:
    with pytest.raises(reasons.ImageRejected) as exc:
        imaging.decode(jpeg[: len(jpeg) // 3], (64, 64))
    assert exc.value.reason == reasons.CORRUPT


def test_too_large_is_refused_before_decoding() -> None:
    with pytest.raises(reasons.ImageRejected) as exc:
        reasons.check_size(reasons.MAX_BYTES + 1)
    assert exc.value.reason == reasons.TOO_LARGE
