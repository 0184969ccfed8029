"""Validation and decoding of uploaded images: every reject has a stable reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

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


# An ISO base media file as an iPhone writes it (ftyp box, brand heic): Pillow cannot open it.
HEIC = struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0" + b"mif1heic" + struct.pack(">I", 16) + b"meta" + b"\0" * 8
AVIF = encode(Image.new("RGB", (64, 64)), "AVIF") if features.check("avif") else b""


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(b"", reasons.ZERO_BYTE, id="empty"),
        pytest.param(b"this is a text file, not an image\n", reasons.NOT_AN_IMAGE, id="text"),
        pytest.param(b"%PDF-1.4\n% not an image at all\n" * 20, reasons.NOT_AN_IMAGE, id="pdf"),
        pytest.param(encode(Image.new("RGB", (64, 64)), "BMP"), reasons.UNSUPPORTED_FORMAT, id="bmp"),
        pytest.param(encode(Image.new("RGB", (64, 64)), "TIFF"), reasons.UNSUPPORTED_FORMAT, id="tiff"),
        pytest.param(encode(Image.new("I;16", (64, 64)), "TIFF"), reasons.UNSUPPORTED_FORMAT, id="tiff16"),
        pytest.param(encode(Image.new("RGB", (64, 64)), "WEBP"), reasons.UNSUPPORTED_FORMAT, id="webp"),
        pytest.param(encode(Image.new("RGB", (64, 64)), "GIF"), reasons.UNSUPPORTED_FORMAT, id="gif"),
        pytest.param(HEIC, reasons.UNSUPPORTED_FORMAT, id="heic"),
        pytest.param(AVIF, reasons.UNSUPPORTED_FORMAT, id="avif",
                     marks=pytest.mark.skipif(not AVIF, reason="this Pillow cannot write AVIF")),
        pytest.param(encode(Image.new("RGB", (16, 16)), "JPEG"), reasons.TOO_SMALL, id="tiny"),
        pytest.param(encode(Image.new("RGB", (20, 400)), "PNG"), reasons.TOO_SMALL, id="thin"),
        # 42 Mpx of 1-bit PNG is a few KB on disk: a classic decompression bomb.
        pytest.param(encode(Image.new("1", (7000, 6000)), "PNG"), reasons.DECOMPRESSION_BOMB, id="bomb"),
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


# --------------------------------------------------------------------------- input classes
# One test per input class of docs/reliability.md ("Input classes"), each checking pixels or outcome.

WHITE, RED, GREEN, BLUE = (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)


def quadrants(size: tuple[int, int], colours=(RED, GREEN, BLUE, WHITE)) -> Image.Image:
    """``size`` = (w, h): top-left, top-right, bottom-left, bottom-right in ``colours``."""
    w, h = size
    im = Image.new("RGB", size)
    for (x, y), c in zip(((0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)), colours, strict=True):
        im.paste(c, (x, y, x + w // 2, y + h // 2))
    return im


def corners(px: np.ndarray) -> list[list[int]]:
    """Mean colour around the centre of each quadrant: TL, TR, BL, BR."""
    h, w = px.shape[:2]
    return [px[y * h // 4 - 2:y * h // 4 + 2, x * w // 4 - 2:x * w // 4 + 2].reshape(-1, 3).mean(0).round().tolist()
            for y, x in ((1, 1), (1, 3), (3, 1), (3, 3))]


def close(got, want, tol: float = 6) -> bool:
    return np.abs(np.asarray(got, float) - np.asarray(want, float)).max() <= tol


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, depth: int, colour_type: int, rows: bytes = b"") -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB), or with a forged header when ``rows``
    does not match the size claimed: what a decompression bomb looks like before it is inflated."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png16(samples: np.ndarray, colour_type: int) -> bytes:
    """16-bit PNG of ``samples`` (H, W, C) uint16; filter type 0 on every row."""
    h, w = samples.shape[:2]
    rows = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))
    return png(w, h, 16, colour_type, rows)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records the size of every pixel decode that happens (an ``ImageFile.load`` with tiles left to decode)."""
    from PIL import ImageFile

    calls: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load

    def load(self):
        if self.tile:
            calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def test_fast_path_decodes_once_at_reduced_scale(jpeg: bytes, decodes: list) -> None:
    """A HAM10000 600x450 JPEG for a 192x144 input: one decode, at 1/2 scale by draft()."""
    imaging.decode(jpeg, (144, 192))
    assert decodes == [(300, 225)]


def test_48_megapixel_camera_jpeg_is_accepted_at_reduced_scale() -> None:
    data = encode(quadrants((8000, 6000)), "JPEG", quality=90)  # flat quadrants encode to ~1 MB
    out = imaging.decode(data, (144, 192))
    assert (out.width, out.height, out.orientation) == (8000, 6000, 1)
    assert out.pixels.shape == (144, 192, 3)
    assert all(close(c, want) for c, want in zip(corners(out.pixels), (RED, GREEN, BLUE, WHITE), strict=True))
    assert imaging.FULL_DECODE_MAX_PIXELS < 8000 * 6000  # accepted only because draft() decodes it at 1/8


def test_pillow_own_limit_never_refuses_an_accepted_jpeg() -> None:
    """decode leaves Image.MAX_IMAGE_PIXELS alone; Pillow's check (a warning above it) must sit above ours."""
    assert Image.MAX_IMAGE_PIXELS is not None and imaging.JPEG_MAX_PIXELS <= Image.MAX_IMAGE_PIXELS


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_jpeg_header_above_the_jpeg_limit_is_refused_before_decoding(decodes: list) -> None:
    data = bytearray(encode(Image.new("RGB", (64, 48), RED), "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    data[sof + 5:sof + 9] = struct.pack(">HH", 9_000, 12_000)  # claims 108 MP
    with pytest.raises(reasons.ImageRejected) as exc:
        imaging.decode(bytes(data), (144, 192))
    assert exc.value.reason == reasons.DECOMPRESSION_BOMB and decodes == []


@pytest.mark.parametrize("side", [8_000, 30_000])  # 64 MP (our limit) and 900 MP (also Pillow's hard limit)
def test_png_header_claiming_too_many_pixels_is_refused_without_decoding(side: int, decodes: list) -> None:
    bomb = png(side, side, 8, 2, b"\0" * 64)  # the IDAT holds 64 bytes: decoding it would fail as corrupt
    with pytest.raises(reasons.ImageRejected) as exc:
        imaging.decode(bomb, (64, 64))
    assert exc.value.reason == reasons.DECOMPRESSION_BOMB and decodes == []


def test_mpo_decodes_its_first_frame_only() -> None:
    data = encode(quadrants((640, 480)), "MPO", save_all=True, append_images=[Image.new("RGB", (640, 480), BLUE)])
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.n_frames) == ("MPO", 2)
    out = imaging.decode(data, (144, 192))
    assert all(close(c, want) for c, want in zip(corners(out.pixels), (RED, GREEN, BLUE, WHITE), strict=True))


@pytest.mark.parametrize(
    ("samples", "colour_type", "want"),
    [
        (np.full((48, 64, 1), 32768, np.uint16), 0, (128, 128, 128)),     # mid-grey, not white
        (np.full((48, 64, 1), 65535, np.uint16), 0, (255, 255, 255)),
        (np.full((48, 64, 1), 257 * 40, np.uint16), 0, (40, 40, 40)),
        (np.tile(np.array([65535, 32768, 0], np.uint16), (48, 64, 1)), 2, (255, 128, 0)),  # 16-bit RGB
        (np.tile(np.array([32768, 65535], np.uint16), (48, 64, 1)), 4, (128, 128, 128)),  # 16-bit grey+alpha
    ],
)
def test_16_bit_png_is_scaled_not_clipped(samples: np.ndarray, colour_type: int, want: tuple[int, int, int]) -> None:
    px = imaging.decode(png16(samples, colour_type), (48, 64)).pixels
    assert (px == want).all(), px[0, 0]


def test_16_bit_png_gradient_keeps_its_range() -> None:
    ramp = np.linspace(0, 65535, 64).astype(np.uint16)[None, :, None].repeat(48, 0)
    px = imaging.decode(png16(ramp, 0), (48, 64)).pixels[..., 0]
    assert px[:, 0].max() <= 2 and px[:, -1].min() >= 253 and (np.diff(px[0].astype(int)) >= 0).all()


@pytest.mark.parametrize(
    ("mode", "values", "want"),
    [
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),            # normalised float: x 255
        ("F", [-10.0, 0.0, 30.0], [0, 64, 255]),          # any other range: stretched
        ("F", [float("nan"), 0.25, 0.75], [0, 64, 191]),  # NaN counts as 0
        ("I", [0, 32768, 65535], [0, 128, 255]),          # 16-bit samples held as 32-bit int
        ("I", [-1000, 0, 3000], [0, 64, 255]),            # any other range: stretched
    ],
)
def test_32_bit_samples_are_scaled_by_their_range(mode: str, values: list[float], want: list[int]) -> None:
    """PNG cannot hold 32-bit samples and TIFF is refused, so no upload reaches these modes:
    the conversion is checked directly."""
    dtype = np.float32 if mode == "F" else np.int32
    im = Image.fromarray(np.array([values] * 4, dtype=dtype), mode)
    rgb = np.asarray(imaging.to_rgb8(im))
    assert rgb.shape == (4, 3, 3) and rgb[0, :, 0].tolist() == want and (rgb == rgb[..., :1]).all()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_greyscale_becomes_grey_rgb(fmt: str) -> None:
    grey = Image.linear_gradient("L").resize((128, 96))
    px = imaging.decode(encode(grey, fmt, quality=95) if fmt == "JPEG" else encode(grey, fmt), (96, 128)).pixels
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
    assert close(px[..., 0], np.asarray(grey), tol=8)


def test_one_bit_png_is_black_and_white() -> None:
    bw = Image.new("1", (64, 48), 0)
    bw.paste(1, (32, 0, 64, 48))
    px = imaging.decode(encode(bw, "PNG"), (48, 64)).pixels
    assert (px[:, :30] == 0).all() and (px[:, 34:] == 255).all()


def test_palette_png_keeps_its_colours() -> None:
    im = Image.new("P", (64, 48), 0)
    im.putpalette([200, 120, 90, 10, 20, 30] + [0] * 762)
    im.paste(1, (32, 0, 64, 48))
    px = imaging.decode(encode(im, "PNG"), (48, 64)).pixels
    assert (px[:, :30] == (200, 120, 90)).all() and (px[:, 34:] == (10, 20, 30)).all()


def test_palette_transparency_is_white() -> None:
    im = Image.new("P", (64, 48), 0)
    im.putpalette([200, 120, 90, 0, 0, 0] + [0] * 762)
    im.paste(1, (32, 0, 64, 48))  # index 1 (black in the palette) is the transparent one
    px = imaging.decode(encode(im, "PNG", transparency=1), (48, 64)).pixels
    assert (px[:, :30] == (200, 120, 90)).all() and (px[:, 34:] == WHITE).all()


def test_alpha_is_composited_on_white() -> None:
    im = Image.new("RGBA", (64, 48), (0, 0, 0, 0))       # transparent (and black underneath)
    im.paste((200, 0, 0, 255), (0, 0, 32, 24))           # opaque red
    im.paste((0, 0, 200, 128), (32, 0, 64, 24))          # half-transparent blue
    px = imaging.decode(encode(im, "PNG"), (48, 64)).pixels
    assert (px[26:, :] == WHITE).all()
    assert (px[:22, :30] == (200, 0, 0)).all()
    assert close(px[:22, 34:], (127, 127, 228), tol=1)  # 200 * a + 255 * (1 - a), a = 128/255


def test_grey_alpha_is_composited_on_white() -> None:
    im = Image.new("LA", (64, 48), (0, 0))
    im.paste((60, 255), (0, 0, 32, 48))
    px = imaging.decode(encode(im, "PNG"), (48, 64)).pixels
    assert (px[:, :30] == 60).all() and (px[:, 34:] == 255).all()


def test_single_colour_transparency_is_white() -> None:
    """tRNS on a truecolour PNG: one colour (here black) means transparent."""
    im = Image.new("RGB", (64, 48), (0, 0, 0))
    im.paste((90, 60, 30), (0, 0, 32, 48))
    px = imaging.decode(encode(im, "PNG", transparency=(0, 0, 0)), (48, 64)).pixels
    assert (px[:, :30] == (90, 60, 30)).all() and (px[:, 34:] == WHITE).all()


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    assert close(imaging.decode(data, (48, 64)).pixels, RED, tol=4)


# Stored quadrants red/green/blue/white (TL, TR, BL, BR); where each lands once displayed upright.
UPRIGHT = {
    1: (RED, GREEN, BLUE, WHITE),
    2: (GREEN, RED, WHITE, BLUE),   # mirrored left-right
    3: (WHITE, BLUE, GREEN, RED),   # rotated 180
    4: (BLUE, WHITE, RED, GREEN),   # mirrored top-bottom
    5: (RED, BLUE, GREEN, WHITE),   # transposed
    6: (BLUE, RED, WHITE, GREEN),   # rotated 90 clockwise: the stored top-left ends top-right
    7: (WHITE, GREEN, BLUE, RED),   # transverse
    8: (GREEN, WHITE, RED, BLUE),   # rotated 90 counter-clockwise: the stored top-left ends bottom-left
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied_before_resizing(orientation: int, fmt: str) -> None:
    exif = Image.Exif()
    exif[imaging.ORIENTATION_TAG] = orientation
    data = encode(quadrants((640, 480)), fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    out = imaging.decode(data, (144, 192))
    assert out.orientation == orientation
    assert (out.width, out.height) == ((480, 640) if orientation >= 5 else (640, 480))  # as displayed
    got = corners(out.pixels)
    assert all(close(c, want) for c, want in zip(got, UPRIGHT[orientation], strict=True)), got


@pytest.mark.parametrize("size", [(400, 90), (90, 400), (2000, 400)])
def test_extreme_aspect_ratio_is_refused(size: tuple[int, int]) -> None:
    with pytest.raises(reasons.ImageRejected) as exc:
        imaging.decode(encode(Image.new("RGB", size, RED), "PNG"), (144, 192))
    assert exc.value.reason == reasons.EXTREME_ASPECT and exc.value.detail


def test_aspect_ratio_up_to_the_limit_is_scored() -> None:
    px = imaging.decode(encode(quadrants((360, 90)), "JPEG", quality=95), (144, 192)).pixels  # exactly 4:1
    assert all(close(c, want) for c, want in zip(corners(px), (RED, GREEN, BLUE, WHITE), strict=True))


def test_oversized_bytes_are_refused_by_decode() -> None:
    with pytest.raises(reasons.ImageRejected) as exc:
        imaging.decode(b"\xff\xd8" + b"\0" * reasons.MAX_BYTES, (64, 64))
    assert exc.value.reason == reasons.TOO_LARGE


def test_truncated_png_is_corrupt() -> None:
    data = encode(quadrants((256, 192)).effect_spread(8), "PNG")  # noisy, so the IDAT is large
    with pytest.raises(reasons.ImageRejected) as exc:
        imaging.decode(data[: len(data) // 2], (64, 64))
    assert exc.value.reason == reasons.CORRUPT


def test_progressive_jpegs_decode_within_the_scorers_memory_budget(tiny_model) -> None:
    """Each decode reserves its peak memory from the header (a progressive JPEG holds its whole
    coefficient buffer: 6 bytes a pixel at worst) before decoding; with a budget below two such
    images they are decoded one at a time, while small images run alongside."""
    import contextlib
    import threading

    from PIL import ImageFile

    from batch.scorer import Scorer

    big = io.BytesIO()
    Image.new("RGB", (1600, 1200), (120, 80, 60)).save(big, "JPEG", progressive=True, quality=80)
    small = io.BytesIO()
    Image.new("RGB", (600, 450), (90, 60, 40)).save(small, "JPEG", quality=90)
    reserved: list[int] = []

    @contextlib.contextmanager
    def record(n: int):
        reserved.append(n)
        yield

    imaging.decode(big.getvalue(), (64, 64), reserve=record)
    imaging.decode(small.getvalue(), (64, 64), reserve=record)
    with pytest.raises(reasons.ImageRejected):
        imaging.decode(b"not an image", (64, 64), reserve=record)   # refused before reserving anything
    cost, small_cost = reserved
    assert cost == 1600 * 1200 * imaging.PROGRESSIVE_BYTES_PER_PIXEL and small_cost < 20_000
    scorer = Scorer.from_model_dir(tiny_model, "cpu", workers=8, decode_budget=cost + cost // 2)
    running, most = [0], [0]
    lock = threading.Lock()
    real = ImageFile.ImageFile.load

    def watched(im):   # counts the progressive decodes under way
        progressive = bool(im.info.get("progressive"))
        with lock:
            running[0] += progressive
            most[0] = max(most[0], running[0])
        try:
            return real(im)
        finally:
            with lock:
                running[0] -= progressive

    ImageFile.ImageFile.load = watched
    try:
        lines = scorer.score_bytes([(f"big{i}.jpg", big.getvalue()) for i in range(6)]
                                   + [(f"small{i}.jpg", small.getvalue()) for i in range(6)])
    finally:
        ImageFile.ImageFile.load = real
    assert all(r.ok for r in lines) and most[0] == 1 and scorer.decode_budget.peak <= cost + cost // 2
