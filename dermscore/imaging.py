"""Image validation and decoding: the one preprocessing path.

Training, evaluation, SageMaker inference and the local runner all turn
bytes into model input with :func:`decode`, so a model never sees pixels
prepared differently from the ones it was trained on. The model itself
normalises (see ``batch.networks``), so the array handed over is plain
uint8 RGB, which is also 4x cheaper to copy to a GPU than float32.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from dermscore.reasons import (
    CORRUPT,
    DECOMPRESSION_BOMB,
    NOT_AN_IMAGE,
    TOO_SMALL,
    UNSUPPORTED_FORMAT,
    ImageRejected,
    check_size,
)

# Accepted container formats. JPEG is what dermatoscopes produce; PNG is
# accepted because lossless exports are common. TIFF/BMP/WebP are refused:
# multi-page TIFFs and other exotic encodings are not what the model was
# trained on and are better converted deliberately by the user.
ACCEPTED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG"})

MAX_PIXELS = 40_000_000               # decompression-bomb limit (Pillow default is ~89 MP)
MIN_SIDE = 32                         # anything smaller carries no lesion detail

Image.MAX_IMAGE_PIXELS = MAX_PIXELS


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # (H, W, 3) uint8 at the model's input size
    width: int          # original size
    height: int
    sha256: str = ""    # of the bytes decoded (set by the scorer, which has them)
    load_ms: float = 0.0  # fetch + decode time (set by the scorer's pipeline)


def decode(data: bytes, size: tuple[int, int]) -> Decoded:
    """Validate and decode ``data`` to RGB uint8 of ``size`` = (height, width).

    JPEG ``draft()`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale straight from
    the DCT coefficients, so a 600x450 original reaches a ~200 px input at a
    fraction of the full decode cost.
    """
    check_size(len(data))
    height, width = size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in ACCEPTED_FORMATS:
                    raise ImageRejected(UNSUPPORTED_FORMAT, f"{im.format} is not accepted")
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageRejected(DECOMPRESSION_BOMB, f"{w}x{h} exceeds {MAX_PIXELS} pixels")
                if min(w, h) < MIN_SIDE:
                    raise ImageRejected(TOO_SMALL, f"{w}x{h} is below {MIN_SIDE} px")
                if im.format == "JPEG":
                    im.draft("RGB", (width, height))
                rgb = im.convert("RGB").resize((width, height), Image.BILINEAR)
                return Decoded(np.asarray(rgb, dtype=np.uint8), w, h)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(DECOMPRESSION_BOMB, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(NOT_AN_IMAGE, "content is not a recognised image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # Truncated or corrupt data surfaces from the decoder as OSError.
        raise ImageRejected(CORRUPT, str(exc) or type(exc).__name__) from exc
