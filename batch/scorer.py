"""The streaming scorer: S3 GET + decode in threads, batched forward passes, one OutputLine per line.

Why a pipeline: with one image per request the GPU idles while S3 and JPEG decoding run. Here a
bounded thread pool fetches objects and decodes them (boto3 I/O and Pillow both release the
GIL) while the main thread assembles uint8 batches into a preallocated (pinned, on CUDA) buffer
and runs the forward pass, so the network stays the bottleneck. The read-ahead window is a few
batches, so memory does not grow with the request size. The three stages (load/decode,
forward, format) are separate methods so each can be tested and reused: the SageMaker entry
points (:mod:`batch.inference`), ``dermscore predict`` and the OOD calibration use this object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads OpenMP, so it only
# acts if nothing imported torch before this module; the SageMaker model sets it in its
# environment). The forward pass shares the cores with fetch/decode threads: spinning workers
# took them away (dermscore bench, 2 cores: end to end 16 -> 24 images/s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from batch import gradcam  # noqa: E402
from batch import ood as ood_scores  # noqa: E402
from batch import runtime as runtimes  # noqa: E402
from batch.bundle import METADATA_FILE, OOD_FILE, WEIGHTS_FILE, ModelMeta, sha256_file  # noqa: E402
from batch.model import load, pick_device  # noqa: E402
from dermscore import imaging, layout, reasons  # noqa: E402
from dermscore.aws import error_code  # noqa: E402
from dermscore.imaging import Decoded  # noqa: E402
from dermscore.messages import ManifestLine, OutputLine  # noqa: E402
from dermscore.reasons import ImageRejected  # noqa: E402
from dermscore.scoring import score_line  # noqa: E402

log = logging.getLogger("dermscore.scorer")

CPU_BATCH_SIZE = 32
CUDA_BATCH_SIZE = 128
READ_AHEAD_BATCHES = 3
# Bytes of decodes at once (ByteBudget); DERMSCORE_DECODE_BUDGET_MB overrides. 1 GiB: two
# worst-case 89 MP progressive JPEGs, or thousands of ordinary images.
DECODE_BUDGET_BYTES = 2**30
DECODE_BUDGET_ENV = "DERMSCORE_DECODE_BUDGET_MB"


@dataclass(frozen=True)
class BadLine:
    """Placeholder for a manifest line that could not be parsed (keeps line order)."""

    raw: str
    detail: str


@dataclass
class PipelineStats:
    """Where one pipeline run spent its time, to show what bounds throughput.

    ``input_wait_s`` is time the forward loop sat waiting for fetch/decode: near zero
    means the model is the bottleneck (the goal); large means the input side is.
    """

    images: int = 0
    errors: int = 0
    batches: int = 0
    wall_s: float = 0.0
    compute_s: float = 0.0
    input_wait_s: float = 0.0

    @property
    def rate(self) -> float:
        return (self.images + self.errors) / self.wall_s if self.wall_s > 0 else 0.0


Entry = ManifestLine | BadLine
# How the pipeline gets an image's bytes: (line, its source) -> Decoded. The source is whatever
# the caller paired with the line (nothing for S3, bytes in memory, a local path).
Loader = Callable[[ManifestLine, Any], Decoded]


def make_s3_client(max_pool_connections: int = 32) -> Any:
    """One client per process: boto3 clients are thread-safe and pool connections.

    The endpoint comes from the environment (``AWS_ENDPOINT_URL`` for the local
    moto stack), never from code. The pool is as large as the fetch threads,
    otherwise urllib3 discards connections and every GET pays a new handshake.
    """
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(max_pool_connections=max_pool_connections,
                                            retries={"max_attempts": 4, "mode": "standard"}))


class ByteBudget:
    """At most ``limit`` bytes of decodes at once across the worker threads: a few crafted
    progressive JPEGs (each up to ~530 MB at the 89 MP limit) cannot exhaust the container, while
    ordinary images (a baseline 600x450 JPEG reserves ~15 KB) never wait. A decode larger than the
    whole budget runs alone."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_use, self.peak = limit, 0, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        with self._cond:
            while self.in_use and self.in_use + n > self.limit:
                self._cond.wait()
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= n
                self._cond.notify_all()


class Scorer:
    """Loads a model once and scores streams of images in batched forward passes.

    Stages (each usable on its own):
      * :meth:`load_item` / :meth:`fetch`: S3 GetObject + :func:`dermscore.imaging.decode`
        (runs in the worker threads);
      * :meth:`forward`: a uint8 NHWC batch -> calibrated probabilities;
      * :meth:`format`: probabilities -> a :func:`score_line` record.

    The forward pass runs on :attr:`engine` (:mod:`batch.runtime`: ONNX Runtime on the CPU,
    PyTorch on CUDA, or as ``runtime`` / ``DERMSCORE_RUNTIME`` says): one pass gives the
    probabilities, the OOD score's features and the heatmaps' class activation maps.
    """

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, device: torch.device | str = "cpu",
                 s3: Any = None, batch_size: int | None = None, workers: int | None = None,
                 read_ahead_batches: int = READ_AHEAD_BATCHES, heatmaps: str = "off",
                 mahalanobis: ood_scores.Mahalanobis | None = None, decode_budget: int | None = None,
                 runtime: str | None = None, model_dir: Path | str | None = None) -> None:
        self.model = model
        self.meta = meta
        self.device = torch.device(device)
        # model_dir: where a model.onnx exported from these weights may be (batch.runtime.make_engine).
        self.engine = runtimes.make_engine(model, meta, self.device, Path(model_dir) if model_dir else None, runtime)
        if meta.ood_method == "mahalanobis" and mahalanobis is None:
            raise ValueError(f"model {meta.name} v{meta.version} scores OOD by Mahalanobis distance: "
                             f"pass its parameters ({OOD_FILE}) or use Scorer.from_model_dir")
        # The OOD score of forward_scored: Mahalanobis distance when the model ships its parameters,
        # else the energy score (batch.ood).
        self.mahalanobis = mahalanobis if meta.ood_method == "mahalanobis" else None
        self.cuda = self.device.type == "cuda"
        self.batch_size = batch_size or (CUDA_BATCH_SIZE if self.cuda else CPU_BATCH_SIZE)
        # Threads beyond the cores still help: most of a GET is waiting on the network.
        self.workers = workers or min(32, 4 * (os.cpu_count() or 1))
        self.read_ahead = max(1, read_ahead_batches) * self.batch_size
        self.decode_budget = ByteBudget(decode_budget or int(os.environ.get(DECODE_BUDGET_ENV, 0)) * 2**20
                                        or DECODE_BUDGET_BYTES)
        self._s3 = s3
        self.input_size = tuple(meta.input_size)  # (H, W)
        self.model_info = {"name": meta.name, "version": meta.version, "weights_sha256": meta.weights_sha256}
        h, w = self.input_size
        # Two buffers: on CUDA the host->device copy of one may still be in flight while the
        # next is filled. An NHWC uint8 buffer permuted to NCHW *is* channels_last memory.
        self._buffers = [torch.empty((self.batch_size, h, w, 3), dtype=torch.uint8, pin_memory=self.cuda)
                         for _ in range(2)]
        self._np_buffers = [b.numpy() for b in self._buffers]  # numpy views: fast copy from decoded arrays
        self._temperature = float(meta.temperature) or 1.0
        self.last_stats = PipelineStats()
        if heatmaps not in gradcam.MODES:
            raise ValueError(f"heatmaps must be one of {gradcam.MODES}, not {heatmaps!r}")
        self.heatmaps = heatmaps  # Grad-CAM for "high"-risk / "all" images, or "off" (batch.gradcam)
        self._heatmap_maker: Any = None
        self.pictures: dict[str, bytes] = {}  # pictures of local images (no bucket), by key
        if self.cuda:
            torch.backends.cudnn.benchmark = True

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, model_dir: Path | str, device: torch.device | str | None = None, s3: Any = None,
                       verify: bool = True, **kwargs: Any) -> Scorer:
        """Load ``model.pt`` + ``metadata.json``; refuse weights that do not match their metadata.

        Every output line names ``weights_sha256``, so it must be the hash of the weights
        that actually produced the numbers.
        """
        model_dir = Path(model_dir)
        device = pick_device(device)
        model, meta = load(model_dir, device)
        if verify and meta.weights_sha256:
            actual = sha256_file(model_dir / WEIGHTS_FILE)
            if actual != meta.weights_sha256:
                raise ValueError(f"{model_dir / WEIGHTS_FILE} sha256 {actual} != {METADATA_FILE} "
                                 f"weights_sha256 {meta.weights_sha256}")
        mahalanobis = None
        if meta.ood_method == "mahalanobis":
            path = model_dir / OOD_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: {METADATA_FILE} says ood_method mahalanobis")
            if verify and meta.ood_sha256 and sha256_file(path) != meta.ood_sha256:
                raise ValueError(f"{path} sha256 {sha256_file(path)} != {METADATA_FILE} ood_sha256 {meta.ood_sha256}")
            mahalanobis = ood_scores.Mahalanobis.load(path, device)
        kwargs.setdefault("model_dir", model_dir)
        scorer = cls(model, meta, device, s3=s3, mahalanobis=mahalanobis, **kwargs)
        log.info("model %s v%s (%s, input %sx%s, T=%.3f, mel threshold=%.3f) on %s, runtime %s, batch %d, "
                 "%d workers", meta.name, meta.version, meta.arch, *scorer.input_size, scorer._temperature,
                 meta.melanoma_threshold, device, runtimes.describe(scorer.engine), scorer.batch_size, scorer.workers)
        return scorer

    @property
    def s3(self) -> Any:
        if self._s3 is None:  # local-file scoring never needs a client
            self._s3 = make_s3_client(self.workers)
        return self._s3

    @s3.setter
    def s3(self, client: Any) -> None:
        self._s3 = client

    # ---- stage 1: fetch + decode (worker threads) ------------------------------------------
    def fetch(self, line: ManifestLine) -> bytes:
        """GetObject, refusing empty/oversized objects from the headers before reading the body."""
        uri = f"s3://{line.bucket}/{line.key}"
        if line.size:
            reasons.check_size(line.size)  # too_large from the event's size, without a request
        try:
            resp = self.s3.get_object(Bucket=line.bucket, Key=line.key)
        except Exception as exc:  # NoSuchKey, AccessDenied, throttling after retries, network
            raise ImageRejected(reasons.READ_ERROR, f"GetObject {uri}: {error_code(exc)}") from exc
        body = resp["Body"]
        etag = line.etag
        if etag and resp.get("ETag") and resp["ETag"].strip('"') != etag:
            # Overwritten since it was enqueued: these bytes are the newer upload, which has its
            # own event, line and row; this upload's content is gone (docs/reliability.md).
            body.close()
            raise ImageRejected(reasons.SUPERSEDED, f"{uri} was uploaded again "
                                                    f"(etag {etag} -> {resp['ETag'].strip(chr(34))}) before scoring")
        try:
            length = resp.get("ContentLength")
            if length is not None:
                reasons.check_size(int(length))  # zero_byte / too_large before reading the body
            data = body.read()
        except ImageRejected:
            raise
        except Exception as exc:
            raise ImageRejected(reasons.READ_ERROR, f"reading {uri}: {exc}") from exc
        finally:
            body.close()
        return data

    def decode(self, data: bytes) -> Decoded:
        """Decode + the sha256 of the bytes (the output names what was scored; bytes are not kept),
        within the decode budget."""
        decoded = imaging.decode(data, self.input_size, reserve=self.decode_budget.hold)
        return dataclasses.replace(decoded, sha256=hashlib.sha256(data).hexdigest())

    def load_item(self, line: ManifestLine, _source: Any = None) -> Decoded:
        return self.decode(self.fetch(line))

    # ---- stage 2: forward ------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n, classes) calibrated probabilities (float32, on the device).

        The result is left on the device so a CUDA caller can fill the next batch while the
        kernels run; ``.cpu()`` is the synchronisation point.
        """
        return torch.softmax(self._logits(batch) / self._temperature, dim=1)

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.engine(batch).logits

    @torch.inference_mode()
    def forward_scored(self, batch: torch.Tensor) -> torch.Tensor:
        """Like :meth:`forward` with one more column: the model's out-of-distribution score, the
        one ``ModelMeta.ood_threshold`` was set on (:mod:`batch.ood`, :mod:`training.ood`): the
        Mahalanobis distance of the pooled features when the model ships ``ood.npz``
        (``ood_method`` mahalanobis), else the energy score ``-logsumexp(logits)`` (Liu et al.
        2020; T = 1, uncalibrated logits)."""
        return self._scored(self.engine(batch))

    def _scored(self, out: runtimes.Outputs) -> torch.Tensor:
        """(n, classes + 1): calibrated probabilities and the OOD score, from one forward's outputs."""
        score = ood_scores.energy(out.logits) if self.mahalanobis is None else self.mahalanobis.score(out.features)
        return torch.cat([torch.softmax(out.logits / self._temperature, dim=1), score[:, None]], dim=1)

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities for already decoded (n, H, W, 3) uint8 images (benchmarks, evaluation)."""
        out = [self.forward(torch.from_numpy(np.ascontiguousarray(pixels[i:i + self.batch_size]))).cpu()
               for i in range(0, len(pixels), self.batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.meta.classes)), np.float32)

    # ---- stage 3: format -------------------------------------------------------------------
    def format(self, line: ManifestLine, probs: np.ndarray, decoded: Decoded, processing_ms: float | None = None,
               ood_score: float | None = None) -> OutputLine:
        return score_line(line, probs.tolist(), self.model_info, self.meta.melanoma_threshold,
                          decoded.width, decoded.height, image_sha256=decoded.sha256,
                          processing_ms=processing_ms, ood_score=ood_score, orientation=decoded.orientation,
                          ood_threshold=getattr(self.meta, "ood_threshold", None),
                          class_offsets=self.meta.class_offsets)

    # ---- the pipeline ----------------------------------------------------------------------
    def score_items(self, lines: Iterable[Entry]) -> Iterator[OutputLine]:
        """Score manifest lines from S3, yielding one output line per line, in order."""
        _ = self.s3  # create the client here: boto3 client creation is not thread-safe, use is
        return self._pipeline(((ln, None) for ln in lines), self.load_item)

    def score_bytes(self, pairs: Iterable[tuple[str, bytes]]) -> list[OutputLine]:
        """Score in-memory images given as (name, bytes); ``name`` becomes the line's key."""
        entries = ((ManifestLine("", name, "", len(blob)), blob) for name, blob in pairs)
        return list(self._pipeline(entries, lambda _line, blob: self.decode(blob)))

    def score_files(self, paths: Iterable[str | Path]) -> Iterator[OutputLine]:
        """Score local files (read in the worker threads); the path becomes the line's key."""
        def load_file(line: ManifestLine, path: Path) -> Decoded:
            try:
                blob = path.read_bytes()
            except OSError as exc:
                raise ImageRejected(reasons.READ_ERROR, f"{path}: {exc.strerror or exc}") from exc
            return self.decode(blob)

        return self._pipeline(((ManifestLine("", str(p), ""), Path(p)) for p in paths), load_file)

    def _pipeline(self, entries: Iterable[tuple[Entry, Any]], loader: Loader) -> Iterator[OutputLine]:
        """Stream (line, source) pairs through loader threads -> batched forward -> output lines, in order.

        At most ``read_ahead`` items are in flight: the window is refilled as results are
        consumed, so a million-line request uses the memory of a few batches.
        """
        stats = self.last_stats = PipelineStats()
        t0 = time.perf_counter()
        source = iter(entries)
        window: deque[tuple[Entry, Future | None]] = deque()

        def safe_load(item: ManifestLine, origin: Any) -> Decoded | ImageRejected:
            try:
                tl = time.perf_counter()
                decoded = loader(item, origin)
                return dataclasses.replace(decoded, load_ms=1000 * (time.perf_counter() - tl))
            except ImageRejected as exc:
                return exc
            except Exception as exc:  # anything unforeseen still must not fail the request
                log.exception("unexpected error loading %s", item.key)
                return ImageRejected(reasons.READ_ERROR, f"{type(exc).__name__}: {exc}")

        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dermscore-load")
        try:
            def refill() -> None:
                while len(window) < self.read_ahead:
                    try:
                        item, origin = next(source)
                    except StopIteration:
                        return
                    if isinstance(item, BadLine):
                        window.append((item, None))
                    else:
                        window.append((item, pool.submit(safe_load, item, origin)))

            refill()
            pending: tuple | None = None  # previous batch (entries, probs, cams, forward_s), maybe still computing
            which = 0
            while window or pending is not None:
                # Assemble the next batch from the head of the window (order preserved).
                entries: list[tuple[Any, Decoded | ImageRejected | BadLine]] = []
                buf = self._buffers[which]
                n = 0
                while window and n < self.batch_size:
                    item, fut = window.popleft()
                    if fut is None:
                        result: Decoded | ImageRejected | BadLine = item  # type: ignore[assignment]
                    else:
                        tw = time.perf_counter()
                        result = fut.result()
                        stats.input_wait_s += time.perf_counter() - tw
                    if isinstance(result, Decoded):
                        self._np_buffers[which][n] = result.pixels  # memcpy into the (pinned) buffer
                        n += 1
                    entries.append((item, result))
                    refill()
                probs = cams = None
                forward_s = 0.0
                if n:
                    tc = time.perf_counter()
                    # On CUDA a short tail batch runs at full size: one input shape means one cuDNN
                    # autotune per process, and the extra rows cost the GPU next to nothing.
                    with torch.inference_mode():
                        out = self.engine(buf if self.cuda else buf[:n])
                        probs = self._scored(out)[:n]
                    # The heatmaps' class activation maps come from this same pass (batch.gradcam).
                    cams = out.cams[:n] if out.cams is not None and self.heatmaps != "off" else None
                    forward_s = time.perf_counter() - tc
                    stats.compute_s += forward_s
                    stats.batches += 1
                # Emit the previous batch while this one computes (CUDA); on CPU forward is sync.
                if pending is not None:
                    yield from self._emit(*pending, stats)
                pending = (entries, probs, cams, forward_s) if entries else None
                which ^= 1
                if not window and pending is not None:
                    yield from self._emit(*pending, stats)
                    pending = None
        finally:
            # A consumer that stops early (or an exception) must not leave queued GETs running.
            pool.shutdown(wait=True, cancel_futures=True)
            stats.wall_s = time.perf_counter() - t0
        log.info("scored %d images, %d errors in %.2fs (%.1f images/s; %d batches, compute %.2fs, "
                 "waiting for input %.2fs)", stats.images, stats.errors, stats.wall_s, stats.rate,
                 stats.batches, stats.compute_s, stats.input_wait_s)

    def _emit(self, entries: list, probs: torch.Tensor | None, cams: torch.Tensor | None, forward_s: float,
              stats: PipelineStats) -> Iterator[OutputLine]:
        tc = time.perf_counter()
        p = probs.cpu().numpy() if probs is not None else None  # CUDA: waits for the kernels
        wait_s = time.perf_counter() - tc
        stats.compute_s += wait_s
        n_images = sum(isinstance(r, Decoded) for _, r in entries)
        share_ms = 1000 * (forward_s + wait_s) / max(1, n_images)  # each image's share of the forward pass
        n_classes = len(self.meta.classes)
        i = 0
        lines: list[OutputLine] = []
        # (index in lines, pixels, row in the batch) of the lines that get a heatmap
        selected: list[tuple[int, np.ndarray, int]] = []
        for item, result in entries:
            if isinstance(result, Decoded):
                row, i = p[i], i + 1
                if np.isfinite(row).all():
                    stats.images += 1
                    lines.append(self.format(item, row[:n_classes], result, processing_ms=result.load_ms + share_ms,
                                             ood_score=float(row[n_classes])))
                    if self.heatmaps != "off" and gradcam.wants_heatmap(lines[-1], self.heatmaps):
                        selected.append((len(lines) - 1, result.pixels, i - 1))
                    continue
                # e.g. fp16 overflow: one image's bad numbers must not fail the JSON response
                log.warning("non-finite probabilities for %s", item.key)
                lines.append(OutputLine.error(item, reasons.NON_FINITE_OUTPUT, "model produced NaN/inf"))
            elif isinstance(result, BadLine):
                detail = f"{result.detail}: {result.raw!r}" if result.raw else result.detail
                lines.append(OutputLine.error(None, reasons.BAD_MANIFEST_LINE, detail))
            else:
                log.info("rejected %s: %s", item.key, result)
                lines.append(OutputLine.error(item, result.reason, result.detail))
            stats.errors += 1
        if selected:
            self._add_heatmaps(lines, selected, cams)
        yield from lines

    def _add_heatmaps(self, lines: list[OutputLine], selected: list[tuple[int, np.ndarray, int]],
                      cams: torch.Tensor | None) -> None:
        """Heatmaps for the selected lines of a batch (see batch.gradcam): from the batch's class
        activation maps ``cams`` where the architecture has them, else Grad-CAM after the forward
        pass; stored by :meth:`store_picture` (S3, beside the image's JSON); the lines get the keys.
        Each image's share of the heatmap and upload time is added to its ``processing_ms``."""
        th = time.perf_counter()
        pairs = [(lines[i], px) for i, px, _ in selected]
        try:
            if cams is not None:
                pictures = gradcam.render(pairs, cams=cams[[row for _, _, row in selected]])
            else:
                if self._heatmap_maker is None:
                    self._heatmap_maker = gradcam.HeatmapMaker(self.model, self.meta.arch, self.device)
                pictures = gradcam.render(pairs, maker=self._heatmap_maker)
        except Exception:  # a heatmap is an extra: never fail the scores for it
            log.exception("heatmaps failed for %d images; their lines go out without them", len(selected))
            return

        def store(item: tuple[tuple[int, np.ndarray, int], tuple[str, bytes, bytes]]) -> tuple[int, dict[str, Any]]:
            (i, _, _), (cls, png, jpeg) = item
            line = lines[i]
            try:
                keys = {"heatmap_key": self.store_picture(line, layout.HEATMAP_SUFFIX, png, "image/png"),
                        "thumbnail_key": self.store_picture(line, layout.THUMBNAIL_SUFFIX, jpeg, "image/jpeg")}
            except Exception as exc:  # the scores go out all the same, without pictures
                log.warning("heatmap of %s not stored: %s", line.key, error_code(exc))
                return i, {}
            return i, {"heatmap_class": cls, **keys}

        with ThreadPoolExecutor(min(8, len(pictures)), thread_name_prefix="dermscore-heatmap") as pool:
            stored = list(pool.map(store, zip(selected, pictures, strict=True)))
        share_ms = 1000 * (time.perf_counter() - th) / len(selected)
        for i, fields in stored:
            line = lines[i]
            ms = None if line.processing_ms is None else round(line.processing_ms + share_ms, 3)
            lines[i] = dataclasses.replace(line, processing_ms=ms, **fields)

    def store_picture(self, line: OutputLine, suffix: str, data: bytes, content_type: str) -> str:
        """Write a derived picture of ``line``'s image next to its JSON document; returns the key.
        Images from S3 go to their own bucket (the transform role may put exactly these keys);
        local images (no bucket: ``dermscore predict``, tests) are kept in :attr:`pictures`."""
        key = layout.image_artifact_key(line.key, line.etag, suffix, self.meta.weights_sha256)
        if line.bucket:
            self.s3.put_object(Bucket=line.bucket, Key=key, Body=data, ContentType=content_type,
                               Tagging=layout.PICTURE_TAG)
        else:
            self.pictures[key] = data
        return key
