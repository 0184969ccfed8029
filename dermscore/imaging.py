"""Image validation and decoding: the one preprocessing path.

Training, evaluation, SageMaker inference and the local runner all turn
bytes into model input with :func:`decode`, so a model never sees pixels
prepared differently from the ones it was trained on. The model itself
normalises (see ``batch.networks``), so the array handed over is plain
uint8 RGB, which is also 4x cheaper to copy to a GPU than float32.

What every input class becomes (scored how, or refused with which reason)
is the "Input classes" table of ``docs/reliability.md``.

Limits (all checked on the header, before any pixel is decoded):

* JPEG (and MPO, its multi-frame variant) is decoded with ``draft()``:
  libjpeg scales by 1/2, 1/4 or 1/8 inside the IDCT, so a 48 MP camera
  image becomes a ~0.75 MP decode. :data:`JPEG_MAX_PIXELS` (89 MP, about
  1.8x the largest dermatology camera) bounds the rest of the work, which
  does not shrink with the scale: entropy decoding of every coefficient, and
  for progressive JPEGs a whole-image coefficient buffer of 2 bytes per
  sample (~270 MB for 89 MP 4:2:0, ~530 MB for 4:4:4). It is kept below
  Pillow's own warning threshold (``Image.MAX_IMAGE_PIXELS``, 89.5 MP by
  default, left untouched) so Pillow's check never fires for an accepted
  image and no global or warnings state has to be changed (``decode`` runs
  in thread pools, where ``warnings.catch_warnings`` is not safe).
* Everything else (PNG) is decoded at full size, so
  :data:`FULL_DECODE_MAX_PIXELS` (40 MP: 120 MB as RGB, 160 MB as RGBA)
  is the decompression-bomb limit; a PNG whose header claims more is
  refused before its data is inflated. The same limit applies to what a
  JPEG still decodes after ``draft()`` (only reachable with a very large
  model input). A real photo that large as PNG is over the 20 MiB upload
  limit anyway.
* :data:`MAX_ASPECT` (4:1 either way): the model sees a 4:3 frame, so a
  4:1 strip is already squashed 3x; beyond that it is a panorama, a scan
  strip or a banner rather than a lesion photo.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from dermscore.reasons import (
    CORRUPT,
    DECOMPRESSION_BOMB,
    EXTREME_ASPECT,
    NOT_AN_IMAGE,
    TOO_SMALL,
    UNSUPPORTED_FORMAT,
    ImageRejected,
    check_size,
)

# Accepted container formats. JPEG is what dermatoscopes produce; MPO is a JPEG
# with extra frames appended (phones' depth/preview images), of which only the
# first, the photograph, is used; PNG is accepted because lossless exports are
# common. TIFF/BMP/WebP/GIF/AVIF/HEIC are refused: multi-page TIFFs and other
# exotic encodings are not what the model was trained on and are better
# converted deliberately by the user.
JPEG_FAMILY: frozenset[str] = frozenset({"JPEG", "MPO"})
ACCEPTED_FORMATS: frozenset[str] = JPEG_FAMILY | {"PNG"}

JPEG_MAX_PIXELS = 89_000_000          # stored size of a JPEG/MPO (decoded via draft(), see above)
FULL_DECODE_MAX_PIXELS = 40_000_000   # what is decoded at full size: PNG, or a JPEG after draft()
MIN_SIDE = 32                         # anything smaller carries no lesion detail
MAX_ASPECT = 4.0                      # longer side / shorter side; above is refused

ORIENTATION_TAG = 0x0112              # EXIF Orientation
# EXIF Orientation value -> the transpose that displays the stored pixels upright
# (the same table as PIL.ImageOps.exif_transpose). 5-8 swap width and height.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# ISO base media (ftyp box) brands of HEIF/HEIC/AVIF: images Pillow cannot open
# here, refused as unsupported rather than "not an image".
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"})

# 16-bit sample -> 8 bits by the full 16-bit range: round(v * 255 / 65535) = round(v / 257).
_LUT16 = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # (H, W, 3) uint8 at the model's input size, upright (EXIF orientation applied)
    width: int          # original size in pixels as displayed, i.e. after the EXIF orientation is applied
    height: int         # (for orientations 5-8 the stored width and height are swapped); not the draft() size
    sha256: str = ""    # of the bytes decoded (set by the scorer, which has them)
    load_ms: float = 0.0  # fetch + decode time (set by the scorer's pipeline)
    orientation: int = 1
    """The EXIF Orientation value (1-8) that was applied before resizing: 1 = stored upright
    (or no/invalid tag), 3 = rotated 180 degrees, 6 = rotated 90 degrees clockwise, 8 = rotated
    90 degrees counter-clockwise, 2/4/5/7 = the mirrored variants. Read from EXIF (or XMP, as
    Pillow does) of JPEG, MPO and PNG."""


def decode(data: bytes, size: tuple[int, int],
           reserve: Callable[[int], AbstractContextManager[object]] | None = None) -> Decoded:
    """Validate and decode ``data`` to upright RGB uint8 of ``size`` = (height, width).

    The image is decoded exactly once. JPEG ``draft()`` lets libjpeg decode at 1/2,
    1/4 or 1/8 scale straight from the DCT coefficients, so a 600x450 original
    reaches a ~200 px input at a fraction of the full decode cost, and a 48 MP one
    never exists at full size. Then: conversion to 8-bit RGB (:func:`to_rgb8`),
    EXIF orientation, bilinear resize. ``reserve(n)``, if given, is entered with the decode's peak
    bytes (:func:`peak_bytes`, from the header just read) before any pixel is decoded: a memory
    budget shared by decoder threads (``batch.scorer.ByteBudget``).
    """
    check_size(len(data))
    height, width = size
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt not in ACCEPTED_FORMATS:
                raise ImageRejected(UNSUPPORTED_FORMAT, f"{fmt} is not accepted")
            w, h = im.size
            limit = JPEG_MAX_PIXELS if fmt in JPEG_FAMILY else FULL_DECODE_MAX_PIXELS
            if w * h > limit:
                raise ImageRejected(DECOMPRESSION_BOMB, f"{w}x{h} exceeds {limit} pixels for {fmt}")
            if min(w, h) < MIN_SIDE:
                raise ImageRejected(TOO_SMALL, f"{w}x{h} is below {MIN_SIDE} px")
            if max(w, h) > MAX_ASPECT * min(w, h):
                raise ImageRejected(EXTREME_ASPECT, f"{w}x{h} is beyond {MAX_ASPECT:g}:1")
            orientation = 1
            if fmt in JPEG_FAMILY:
                orientation = _orientation(im)  # EXIF is in the header: known before decoding
                # Ask for at least the model size in the stored frame (transposed for 5-8).
                im.draft("RGB", (height, width) if orientation >= 5 else (width, height))
                if im.size[0] * im.size[1] > FULL_DECODE_MAX_PIXELS:
                    raise ImageRejected(DECOMPRESSION_BOMB, f"{w}x{h} decodes to {im.size[0]}x{im.size[1]}")
            with reserve(peak_bytes(im, w, h)) if reserve else contextlib.nullcontext():
                im.load()  # the one decode
                if fmt not in JPEG_FAMILY:
                    orientation = _orientation(im)  # a PNG's eXIf chunk may follow its pixel data
                rgb = to_rgb8(im)
                if orientation != 1:
                    rgb = rgb.transpose(_UPRIGHT[orientation])
                    w, h = (h, w) if orientation >= 5 else (w, h)
                rgb = rgb.resize((width, height), Image.BILINEAR)
                return Decoded(np.asarray(rgb, dtype=np.uint8), w, h, orientation=orientation)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own check (2x its MAX_IMAGE_PIXELS, ~179 MP, is an error at open): above our limits.
        raise ImageRejected(DECOMPRESSION_BOMB, str(exc)) from exc
    except UnidentifiedImageError as exc:
        if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
            raise ImageRejected(UNSUPPORTED_FORMAT, f"HEIF/AVIF ({data[8:12].decode()}) is not accepted") from exc
        raise ImageRejected(NOT_AN_IMAGE, "content is not a recognised image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # Truncated or corrupt data surfaces from the decoder as OSError.
        raise ImageRejected(CORRUPT, str(exc) or type(exc).__name__) from exc


# Peak bytes a decode holds per stored pixel, by kind: a progressive JPEG keeps a coefficient
# buffer of the whole image (2 bytes a sample; 3 samples a pixel at 4:4:4, the worst case)
# whatever draft() scales; a PNG is decoded at full size (RGBA at most).
PROGRESSIVE_BYTES_PER_PIXEL = 6
FULL_DECODE_BYTES_PER_PIXEL = 4


def peak_bytes(im: Image.Image, width: int, height: int) -> int:
    """The most memory decoding the opened ``im`` (stored ``width`` x ``height``) may hold at once,
    from its header alone: what :func:`decode` reserves before decoding."""
    if im.format in JPEG_FAMILY:
        if im.info.get("progressive") or im.info.get("progression"):
            return width * height * PROGRESSIVE_BYTES_PER_PIXEL
        return width * height * 3 // 64 + 1   # draft() decodes baseline JPEGs at 1/8 scale at best
    return width * height * FULL_DECODE_BYTES_PER_PIXEL


def _orientation(im: Image.Image) -> int:
    """The image's EXIF Orientation if it is a valid 2-8, else 1. Broken metadata never rejects
    an image whose pixels decode."""
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
        return value if isinstance(value, int) and value in _UPRIGHT else 1
    except Exception:  # malformed EXIF/XMP: Pillow raises a variety of errors
        return 1


def to_rgb8(im: Image.Image) -> Image.Image:
    """8-bit RGB of an image of any Pillow mode, scaled rather than clipped.

    * ``RGB`` is returned as is (no copy: the fast path).
    * 16-bit greyscale (``I;16``, ``I;16B``, ...): by the full 16-bit range, ``round(v / 257)``.
      (Pillow itself delivers 16-bit RGB, RGBA and LA PNGs as 8-bit, by their high byte.)
    * 32-bit integer ``I``: values within 0..65535 are 16-bit samples (how Pillow and most tools
      hold them) and are scaled as such; any other range is stretched linearly from its own
      minimum..maximum to 0..255.
    * 32-bit float ``F``: values within 0..1 are the normalised-float convention, times 255;
      any other range is stretched from its minimum..maximum. NaN/inf count as 0.
      (A constant image outside these ranges, having no range to stretch, becomes black.)
    * Greyscale (``1``, ``L``), palette (``P``) and ``CMYK`` become RGB by Pillow's conversion.
    * Alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``) and single-colour
      transparency (a PNG ``tRNS`` on ``P``, ``L``, ``RGB``, ``1`` or 16-bit grey) are
      composited on white, so transparent areas read as background, not as black lesion.
    """
    transparency = im.info.get("transparency")
    if im.mode == "RGB" and transparency is None:
        return im
    if im.mode.startswith("I") or im.mode == "F":
        raw = np.asarray(im)
        grey = Image.fromarray(_to_uint8(raw, im.mode), "L")
        if isinstance(transparency, int) and im.mode != "F":
            alpha = Image.fromarray(np.where(raw == transparency, 0, 255).astype(np.uint8), "L")
            return _on_white(grey.convert("RGB"), alpha)
        return grey.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa") or transparency is not None:
        rgba = im.convert("RGBA")  # Pillow applies tRNS and un-premultiplies here
        return _on_white(rgba.convert("RGB"), rgba.getchannel("A"))
    return im.convert("RGB")


def _to_uint8(raw: np.ndarray, mode: str) -> np.ndarray:
    """Samples of a high-bit greyscale mode to uint8 by the rules of :func:`to_rgb8`."""
    if mode.startswith("I;16"):
        return _LUT16[raw]
    a = raw.astype(np.float32)
    if mode == "F":
        a[~np.isfinite(a)] = 0.0
        lo, hi = (0.0, 1.0) if a.min() >= 0.0 and a.max() <= 1.0 else (float(a.min()), float(a.max()))
    else:
        lo, hi = (0.0, 65535.0) if raw.min() >= 0 and raw.max() <= 65535 else (float(raw.min()), float(raw.max()))
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _on_white(rgb: Image.Image, alpha: Image.Image) -> Image.Image:
    out = Image.new("RGB", rgb.size, _WHITE)
    out.paste(rgb, mask=alpha)  # out = rgb * a + white * (1 - a)
    return out
