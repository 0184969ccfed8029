"""``dermscore bench``: where the time goes, from the model alone to S3 -> Parquet.

One run, the same images (the 200 full-resolution HAM10000 samples, repeated under
distinct keys to ``--images``) and one model, measures:

1. **forward**: the model alone on preprocessed uint8 batches already in memory, on every
   runtime (``batch.runtime``: PyTorch eager, ONNX Runtime on the CPU, ``torch.compile`` with
   ``--compile``); the pipeline's figures use the chosen one (``--runtime``, default auto);
2. **end to end**: S3 PUT of every image to the moto server -> S3 notification -> SQS ->
   poller -> enqueue -> transform runner (S3 GET, decode, batched forward) -> collect ->
   Parquet rows, through the real local stack; its ratio to 1; once per heatmap mode of
   ``--heatmap-modes`` (default ``off,high``), so their transform rates are ratios in one run;
   **transform**, once per heatmap mode too: one job of the same images, queued first and
   then run with nothing else on the cores, so the modes compare on equal jobs (in the end-to-end
   phase the number of jobs and the uploads beside them vary from run to run);
3. **seed style**: per image a decoded float array -> JSON -> parse -> forward at batch 1
   (the design this project replaced), on a subset; the ratio of 2 to it;
4. **decode**: JPEG decode + resize to the model input, one thread, with and without
   Pillow ``draft()`` (images/s per core);
5. **memory**: resident set size sampled every 20 ms: the process peak and, per phase,
   the growth over the phase's starting RSS (run ``--count 1000`` and ``--count 10000``
   to see that it does not grow with the number of images).

By default the moto server runs in its own process (``--moto subprocess``): S3 and SQS are
services outside the scoring process on AWS too, and its in-memory object store (the
uploaded images) must not be counted as the pipeline's memory. Its CPU time still competes
with the pipeline for this machine's cores.

``--device cuda`` measures the same figures on a GPU (AMP, pinned buffers); the cost per
million images on ml.g4dn.xlarge ($0.736/h) is printed from the measured rates, labelled
with the device they were measured on. ``--quick`` (40 images) only checks that it works.

    dermscore bench --model models/default --count 1000 --out bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import logging
import os
import platform
import select
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermscore import options
from dermscore.config import DEFAULT_INSTANCE_TYPE, TRANSFORM_USD_PER_HOUR
from dermscore.options import UserError

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a machine whose
# cores are shared (decode threads, the moto server, the handlers: always the case end to end)
# spinning threads steal the cores the others need; measured here with a second process busy,
# batch-32 forward on 2 threads went from ~16 to ~130 images/s. Both the forward-only and the
# end-to-end figures run under the same policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("dermscore.bench")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES_DIR = REPO_ROOT.parent / "shared" / "data" / "ham10000" / "fullres_sample"
G4DN_XLARGE_USD_PER_HOUR = TRANSFORM_USD_PER_HOUR[DEFAULT_INSTANCE_TYPE]
PHASES = ("decode", "forward", "seed", "e2e", "transform")
QUICK_IMAGES = 40
BENCH_PREFIX = "incoming/bench/"


# --------------------------------------------------------------------------- memory

def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:  # not Linux: the peak is the best available figure
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    return kb / 1024


class RssSampler:
    """Samples this process's RSS in a thread; ``phase()`` records start and peak of a block."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak = rss_mb()
        self._phase_peak = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.phases: dict[str, dict[str, float]] = {}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> float:
        now = rss_mb()
        self.peak = max(self.peak, now)
        self._phase_peak = max(self._phase_peak, now)
        return now

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.sample()
        self._phase_peak = start
        try:
            yield
        finally:
            end = self.sample()
            self.phases[name] = {"start_mb": round(start, 1), "peak_mb": round(self._phase_peak, 1),
                                 "end_mb": round(end, 1), "growth_mb": round(self._phase_peak - start, 1)}


# --------------------------------------------------------------------------- helpers

def process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_label(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu ({cores}-core {cpu_model()}, {torch.get_num_threads()} torch threads)"


def usd_per_million(rate: float, usd_per_hour: float = G4DN_XLARGE_USD_PER_HOUR) -> float:
    return usd_per_hour / 3600 / rate * 1e6 if rate > 0 else float("inf")


def progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def load_blobs(images_dir: Path, limit: int | None = None) -> list[tuple[str, bytes]]:
    files = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if limit:
        files = files[:limit]
    if not files:
        raise UserError(f"no .jpg/.jpeg/.png images in {images_dir}: pass --images with a folder of images")
    return [(p.name, p.read_bytes()) for p in files]


def decode_without_draft(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The preprocessing of :func:`dermscore.imaging.decode` minus ``draft()`` (full-size IDCT)."""
    from PIL import Image

    height, width = size
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((width, height), Image.BILINEAR), dtype=np.uint8)


# --------------------------------------------------------------------------- phases

def bench_decode(blobs: list[tuple[str, bytes]], size: tuple[int, int], n: int, show: bool) -> dict[str, Any]:
    """Single-thread decode + resize rate, i.e. images/s per core."""
    from dermscore import imaging

    out: dict[str, Any] = {"images": n}
    for name, fn in (("with_draft", lambda b: imaging.decode(b, size).pixels),
                     ("without_draft", lambda b: decode_without_draft(b, size))):
        fn(blobs[0][1])  # warm-up (imports, codec tables)
        bar = progress(n, f"decode {name.replace('_', ' ')}", show)
        c0 = process_cpu_s()
        t0 = time.perf_counter()
        for i in range(n):
            fn(blobs[i % len(blobs)][1])
            bar.update()
        elapsed = time.perf_counter() - t0
        cpu = process_cpu_s() - c0
        bar.close()
        out[f"{name}_per_core"] = n / elapsed
        out[f"{name}_cpu_ms_per_image"] = 1000 * cpu / n
    out["draft_speedup"] = out["with_draft_per_core"] / out["without_draft_per_core"]
    return out


def bench_forward(scorer: Any, pixels: np.ndarray, n: int, show: bool) -> dict[str, Any]:
    """The model alone: uint8 batches already in memory (pinned on CUDA), synchronised per batch.

    The batches are contiguous views into the distinct images followed by their first
    ``batch`` images again, so ``n`` images cost no more memory than the distinct ones.
    """
    import torch

    bs = scorer.batch_size
    distinct = len(pixels)
    ext = torch.from_numpy(np.concatenate([pixels, pixels[:bs]]))
    if scorer.cuda:
        ext = ext.pin_memory()
    for _ in range(2):  # warm-up: allocator, oneDNN/cuDNN algorithm choice
        scorer.forward(ext[:bs]).cpu()
    bar = progress(n, "forward", show)
    c0 = process_cpu_s()
    t0 = time.perf_counter()
    done = 0
    while done < n:
        k = min(bs, n - done)
        s = done % distinct
        scorer.forward(ext[s:s + k]).cpu()  # .cpu(): wait for the result, as the pipeline does
        done += k
        bar.update(k)
    elapsed = time.perf_counter() - t0
    cpu = process_cpu_s() - c0
    bar.close()
    return {"images": n, "batch_size": bs, "seconds": elapsed, "rate": n / elapsed,
            "cpu_ms_per_image": 1000 * cpu / n}


def forward_scorers(args: argparse.Namespace, model_dir: Path, device: Any, scorer: Any) -> Iterator[tuple[str, Any]]:
    """(runtime, a scorer on it) for every runtime the forward phase compares: ``scorer`` (the
    chosen one) and the others available on ``device``; ``torch_compile`` only with ``--compile``
    (compiling takes a minute or two, in the warm-up batches, outside the clock)."""
    from batch import runtime
    from batch.scorer import Scorer

    def other(name: str) -> Any:
        return Scorer.from_model_dir(model_dir, device=device, batch_size=args.batch_size or None,
                                     workers=args.workers or None, runtime=name)

    yield scorer.engine.name, scorer
    names = ["torch"] + (["onnx"] if device.type == "cpu" and runtime.onnxruntime_available() else [])
    for name in names:
        if name != scorer.engine.name:
            yield name, other(name)
    if args.compile:
        import torch

        compiled = other("torch")
        compiled.engine.net = torch.compile(compiled.engine.net)
        yield "torch_compile", compiled


def bench_seed(scorer: Any, blobs: list[tuple[str, bytes]], n: int, show: bool) -> dict[str, Any]:
    """The replaced design, per image: full decode -> float array -> JSON -> parse -> forward at batch 1."""
    import torch

    size = scorer.input_size
    model, device = scorer.model, scorer.device
    payload = 0
    bar = progress(n, "seed style", show)
    t0 = time.perf_counter()
    for i in range(n):
        arr = decode_without_draft(blobs[i % len(blobs)][1], size).astype(np.float32) / 255.0
        body = json.dumps({"instances": arr.tolist()})       # the client's request
        payload += len(body)
        parsed = np.asarray(json.loads(body)["instances"], dtype=np.float32)  # the server's input_fn
        x = torch.from_numpy(parsed * 255.0).permute(2, 0, 1).unsqueeze(0).to(device)
        with torch.inference_mode():
            probs = torch.softmax(model(x).float(), dim=1).cpu().numpy()
        json.dumps({"predictions": probs.tolist()})           # the server's output_fn
        bar.update()
    elapsed = time.perf_counter() - t0
    bar.close()
    return {"images": n, "seconds": elapsed, "rate": n / elapsed, "payload_mb_per_image": payload / n / 1e6}


@dataclass
class MotoProcess:
    endpoint: str
    proc: subprocess.Popen | None = None
    server: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def rss_mb(self) -> float | None:
        if self.proc is None:
            return None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return None

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) the moto server process has used so far."""
        if self.proc is None:
            return None
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()  # MOTO_CHILD stops its server and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        if self.server is not None:
            self.server.stop()
            self.server = None


# The local stack's server (infra.motoserver.start_server) in a process of its own: it prints its
# endpoint once it accepts connections and serves until its stdin closes (so also when we die).
MOTO_CHILD = """
import os, sys
from infra.motoserver import start_server
server, endpoint = start_server()
print(endpoint, flush=True)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nobody reads its stdout from here on
sys.stdin.read()
server.stop()
"""


def start_moto(mode: str, timeout_s: float = 60) -> MotoProcess:
    from infra.motoserver import start_server

    if mode == "thread":
        server, endpoint = start_server()
        return MotoProcess(endpoint, server=server)
    log_path = os.environ.get("BENCH_MOTO_LOG")
    with open(log_path, "w") if log_path else contextlib.nullcontext(subprocess.DEVNULL) as err:
        proc = subprocess.Popen([sys.executable, "-c", MOTO_CHILD], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    endpoint = proc.stdout.readline().strip() if ready else ""
    proc.stdout.close()
    if endpoint:
        return MotoProcess(endpoint, proc=proc)
    proc.kill()
    if ready:
        raise RuntimeError(f"moto server exited with {proc.wait()}")
    raise TimeoutError(f"moto server did not start within {timeout_s:.0f} s")


class ApiCalls:
    """Counts the AWS API calls (and their wall time) per operation, from botocore's events.

    A call is counted at ``before-call`` and timed until ``after-call`` (any HTTP status) or
    ``after-call-error`` (no response). A client copies its session's event handlers when it is
    created: ``sessions`` cover the clients they create from now on, ``clients`` those that exist.
    """

    def __init__(self, sessions: Iterable[Any] = (), clients: Iterable[Any] = ()) -> None:
        self.calls: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._emitters = [s.events for s in sessions] + [c.meta.events for c in clients]
        self._active = False
        self._id = f"dermscore-bench-{id(self)}"

    def _before(self, model: Any, context: dict[str, Any], **_: Any) -> None:
        if self._active:
            context[self._id] = (model.name, time.perf_counter())
        # None: a before-call handler that returns a response would replace the request

    def _after(self, context: dict[str, Any], **_: Any) -> None:
        started = context.pop(self._id, None)
        if started is not None:
            operation, t = started
            with self._lock:
                c = self.calls.setdefault(operation, [0, 0.0])
                c[0] += 1
                c[1] += time.perf_counter() - t

    def _handlers(self) -> list[tuple[str, Any]]:
        return [("before-call", self._before), ("after-call", self._after), ("after-call-error", self._after)]

    def __enter__(self) -> ApiCalls:
        for events in self._emitters:
            for event, handler in self._handlers():
                events.register(event, handler, unique_id=f"{self._id}-{event}")
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False  # clients created meanwhile keep the handlers: they stop counting
        for events in self._emitters:
            for event, _ in self._handlers():
                events.unregister(event, unique_id=f"{self._id}-{event}")

    def summary(self, images: int) -> dict[str, dict[str, float]]:
        return {op: {"calls": n, "per_image": round(n / images, 3), "wall_s": round(t, 2)}
                for op, (n, t) in sorted(self.calls.items(), key=lambda kv: -kv[1][0])}

    def pipeline_per_image(self, images: int, own: dict[str, int]) -> dict[str, float]:
        """Calls per image by operation made by the pipeline, i.e. without ``own`` (the bench's
        own calls, e.g. the user's upload PUTs: one ``before-call`` per API call, retries inside)."""
        counts = {op: n - own.get(op, 0) for op, (n, _) in self.calls.items()}
        return {op: round(n / images, 3) for op, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n > 0}


def default_session() -> Any:
    """boto3's default session (``boto3.client`` creates its clients), made if none exists yet."""
    import boto3

    if boto3.DEFAULT_SESSION is None:
        boto3.setup_default_session()
    return boto3.DEFAULT_SESSION


def count_parquet_rows(s3: Any, bucket: str, prefix: str) -> int:
    import pyarrow.parquet as pq

    from dermscore.aws import iter_keys

    rows = 0
    for key in iter_keys(s3, bucket, prefix):
        if key.endswith(".parquet"):
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            rows += pq.ParquetFile(io.BytesIO(body)).metadata.num_rows
    return rows


DISPATCH_EVERY_S = 2.0   # the local dispatcher's timer in the end-to-end phase


@contextlib.contextmanager
def bench_pipeline(args: argparse.Namespace, model_dir: Path, heatmaps: str | None, max_latency_s: float = 0,
                   overrides: dict[str, Any] | None = None) -> Iterator[tuple[Any, MotoProcess, list, Any]]:
    """A local pipeline on a moto server of its own, its transform container started outside any
    clock (serving mode: the model server, whose GETs and PUTs are made in its own processes; else
    the scorer): yields (pipeline, moto, servers, scorer)."""
    from infra.local import LocalPipeline
    from infra.stack import preserved_environ

    moto = start_moto(args.moto)
    name = f"bench{uuid.uuid4().hex[:8]}"
    try:
        with preserved_environ():
            os.environ["DERMSCORE_DEVICE"] = args.device_resolved
            for var, value in (("DERMSCORE_BATCH_SIZE", args.batch_size), ("DERMSCORE_WORKERS", args.workers),
                               ("DERMSCORE_GRADCAM", heatmaps), ("DERMSCORE_RUNTIME", args.runtime)):
                if value:
                    os.environ[var] = str(value)
            # The dispatcher on a 2 s timer (60 s on AWS); with no latency bound every run dispatches
            # what is pending, so jobs follow the uploads; its scheduled listings are counted.
            pipeline = LocalPipeline(model_dir, bucket=f"{name}-images", stack_name=name, endpoint=moto.endpoint,
                                     batching_window_s=args.batching_window, dispatch_interval_s=DISPATCH_EVERY_S,
                                     max_latency_s=max_latency_s,
                                     overrides={"ModelName": f"{name}-model", **(overrides or {})})
            try:
                runner = pipeline.runner
                scorer, servers = None, []
                if runner.mode == "serving":
                    servers = runner.servers(pipeline.stack.model_name)
                else:
                    scorer = runner.model(pipeline.stack.model_name)
                yield pipeline, moto, servers, scorer
            finally:
                pipeline.close()
    finally:
        moto.stop()


def put_images(s3: Any, bucket: str, blobs: list[tuple[str, bytes]], i: int) -> None:
    """Upload image ``i`` of the run: the ``blobs`` in turn, each under a key of its own."""
    fname, blob = blobs[i % len(blobs)]
    s3.put_object(Bucket=bucket, Key=f"{BENCH_PREFIX}{i:07d}-{fname}", Body=blob, ContentType="image/jpeg")


def wait_collected(runner: Any, n: int, timeout_s: float, bar: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while collected(runner) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {collected(runner)}/{n} images collected after {timeout_s}s")
        if bar is not None:
            bar.n = collected(runner)
            bar.refresh()
        time.sleep(0.02)


def bench_transform(args: argparse.Namespace, model_dir: Path, blobs: list[tuple[str, bytes]], n: int,
                    rss: RssSampler, show: bool, heatmaps: str) -> dict[str, Any]:
    """One transform job of ``n`` images with nothing else running: the images are uploaded and
    queued first (the dispatcher holds them until ``MinImagesPerJob`` = n are pending), then the
    job runs alone. Its rate and the serving processes' CPU compare heatmap modes on equal jobs:
    in the end-to-end phase the number of jobs, and the uploads beside them, vary between runs."""
    from dermscore import layout

    with bench_pipeline(args, model_dir, heatmaps, max_latency_s=24 * 3600,
                        overrides={"MinImagesPerJob": n}) as (pipeline, _moto, servers, _scorer), \
            rss.phase(f"transform-heatmaps-{heatmaps}"):
        s3, bucket, runner = pipeline.stack.client("s3"), pipeline.stack.bucket, pipeline.runner
        with ThreadPoolExecutor(args.upload_threads, thread_name_prefix="bench-upload") as pool:
            list(pool.map(lambda i: put_images(s3, bucket, blobs, i), range(n)))
        s0 = sum(srv.cpu_seconds() for srv in servers)
        pipeline.start_background()
        wait_collected(runner, n, args.timeout, progress(n, f"one transform job, heatmaps {heatmaps}", show))
        server_cpu = sum(srv.cpu_seconds() for srv in servers) - s0 if servers else None
        jobs = list(runner.results)
        seconds = sum(j["seconds"] for j in jobs)
        pictures = sum(1 for k in pipeline.stack.list_keys(layout.IMAGES) if k.endswith(layout.HEATMAP_SUFFIX))
        return {"images": n, "jobs": len(jobs), "heatmaps": heatmaps, "transform_seconds": seconds,
                "transform_rate": sum(j["records"] for j in jobs) / seconds if seconds else 0.0,
                "server_cpu_ms_per_image": 1000 * server_cpu / n if server_cpu is not None else None,
                "heatmaps_stored": pictures, "transform_mode": runner.mode}


def bench_e2e(args: argparse.Namespace, model_dir: Path, blobs: list[tuple[str, bytes]], n: int,
              rss: RssSampler, show: bool, heatmaps: str | None = None, phase: str = "e2e") -> dict[str, Any]:
    """S3 PUT -> Parquet rows through the local stack, with the pipeline running in the background.

    Images are uploaded by ``--upload-threads`` clients while poller and runner work, as
    images arrive on AWS; the clock runs from the first PUT until collect has written the
    Parquet rows of the last image. Model loading (once per transform container) happens
    before the clock starts.
    """
    from dermscore import layout

    with bench_pipeline(args, model_dir, heatmaps) as (pipeline, moto, servers, scorer):
        stack, runner = pipeline.stack, pipeline.runner
        s3 = stack.client("s3")
        bucket = stack.bucket
        # Every client of the pipeline: the stack's own (poller, runner, uploads), the
        # transform's, and (from boto3's default session) any created later.
        clients = [stack.client(service) for service in ("s3", "sqs", "sagemaker")] + \
            ([scorer.s3] if scorer is not None else [])
        # ...and the handlers' own (handlers.runtime.Runtime: a session of their own per function).
        clients += [getattr(stack.runtime(fn), svc) for fn in ("enqueue", "dispatch", "collect")
                    for svc in ("s3", "sqs", "sagemaker")]
        with rss.phase(phase), ApiCalls(sessions=[default_session()], clients=clients) as api:
            pipeline.start_background()
            bar = progress(n, "end to end (rows)", show)
            c0, m0 = process_cpu_s(), moto.cpu_s()
            s0 = sum(srv.cpu_seconds() for srv in servers)
            t0 = time.perf_counter()

            uploads = itertools.count()   # the user's PutObject calls, not the pipeline's

            def put(i: int) -> None:
                next(uploads)
                put_images(s3, bucket, blobs, i)

            # Closed loop: at most --max-ahead images uploaded and not yet collected. moto's
            # ReceiveMessage costs O(messages in the queue) (~0.4 ms each per call), so an
            # uploader far ahead of the pipeline makes the local SQS quadratic; real SQS is not.
            with ThreadPoolExecutor(args.upload_threads, thread_name_prefix="bench-upload") as pool:
                inflight: list = []
                for i in range(n):
                    while i - collected(runner) >= args.max_ahead:
                        bar.n = collected(runner)
                        bar.refresh()
                        time.sleep(0.01)
                    inflight.append(pool.submit(put, i))
                    if len(inflight) >= 2 * args.upload_threads:
                        for f in inflight:
                            f.result()
                        inflight = []
                        bar.n = collected(runner)
                        bar.refresh()
                for f in inflight:
                    f.result()
            t_uploaded = time.perf_counter() - t0
            wait_collected(runner, n, args.timeout, bar)
            elapsed = time.perf_counter() - t0
            cpu, m1 = process_cpu_s() - c0, moto.cpu_s()
            server_cpu = sum(srv.cpu_seconds() for srv in servers) - s0 if servers else None
            bar.n = n
            bar.close()
            pipeline.close()  # stop poller + runner threads inside the measured phase
        jobs = list(runner.results)
        rows = count_parquet_rows(s3, bucket, layout.PREDICTIONS)
        scored = sum((j.get("collected") or {}).get("scored", 0) for j in jobs)
        failed = sum((j.get("collected") or {}).get("failed", 0) for j in jobs)
        transform_s = sum(j["seconds"] for j in jobs)
        transform_images = sum(j["records"] for j in jobs)
        sizing = None
        with contextlib.suppress(Exception):  # informative only
            sizing = payload_sizing(s3, bucket, jobs[0]["job_name"],
                                    int(stack.spec.dispatch_env.get("MAX_PAYLOAD_MB", 6)),
                                    transform_images / transform_s if transform_s else 0.0)
        by_op = api.pipeline_per_image(n, {"PutObject": next(uploads)})
        out = {"images": n, "seconds": elapsed, "payload": sizing, "api_calls": api.summary(n),
               "api_calls_per_image": round(sum(by_op.values()), 3),
               "api_calls_per_image_by_operation": by_op,
               "rate": n / elapsed, "upload_seconds": t_uploaded,
               "parquet_rows": rows, "scored": scored, "failed": failed, "jobs": len(jobs),
               "transform_seconds": transform_s,
               "transform_rate": transform_images / transform_s if transform_s else 0.0,
               "transform_mode": runner.mode, "transform_stack": runner.describe(),
               "server_cpu_ms_per_image": 1000 * server_cpu / n if server_cpu is not None else None,
               "batch_size": scorer.batch_size if scorer else os.environ.get("DERMSCORE_BATCH_SIZE", "default"),
               "workers": scorer.workers if scorer else os.environ.get("DERMSCORE_WORKERS", "default"),
               "batching_window_s": args.batching_window, "moto": args.moto, "max_ahead": args.max_ahead,
               "heatmaps": heatmaps or "default",
               "moto_server_peak_rss_mb": moto.rss_mb(),
               "cpu_ms_per_image": 1000 * cpu / n,
               "moto_cpu_ms_per_image": 1000 * (m1 - m0) / n if m0 is not None and m1 is not None else None}
    return out


def payload_sizing(s3: Any, bucket: str, job_name: str, max_payload_mb: int, rate: float) -> dict[str, Any]:
    """Bytes per manifest line and per output line of one job, and what they imply for a request
    of ``max_payload_mb`` (lines per request, response size, seconds per request at ``rate``)."""
    from dermscore import layout
    from dermscore.aws import iter_keys

    def first(prefix: str) -> bytes:  # whatever the manifest layout (one file or shards)
        return s3.get_object(Bucket=bucket, Key=min(iter_keys(s3, bucket, prefix)))["Body"].read()

    manifest = first(f"{layout.MANIFESTS}{job_name}")
    output = first(layout.transform_output_prefix(job_name))
    n_in, n_out = max(1, len(manifest.splitlines())), max(1, len(output.splitlines()))
    line_in, line_out = len(manifest) / n_in, len(output) / n_out
    lines = int(max_payload_mb * 1024 * 1024 // line_in)
    return {"max_payload_mb": max_payload_mb, "manifest_line_bytes": round(line_in, 1),
            "output_line_bytes": round(line_out, 1), "lines_per_request": lines,
            "response_mb_per_request": round(lines * line_out / 1024 / 1024, 1),
            "seconds_per_request_at_rate": round(lines / rate, 1) if rate else None}


def serving_figures(result: dict[str, Any]) -> dict[str, float]:
    """The transform by heatmap mode, the serving stack's CPU against the forward pass + decode,
    and the moto server's share of the CPU (docs/benchmark.md, "Runtime, heatmap and serving keys")."""
    out: dict[str, float] = {}
    for prefix, section in (("transform", "e2e_by_heatmaps"), ("transform_one_job", "transform_by_heatmaps")):
        by_mode = result.get(section) or {}
        for mode, e in by_mode.items():
            out[f"{prefix}.rate.{mode}"] = e["transform_rate"]
            if e.get("server_cpu_ms_per_image") is not None:
                out[f"{prefix}.serving_cpu_ms_per_image.{mode}"] = e["server_cpu_ms_per_image"]
        if "off" in by_mode and "high" in by_mode and by_mode["off"]["transform_rate"]:
            out[f"{prefix}.high_vs_off"] = by_mode["high"]["transform_rate"] / by_mode["off"]["transform_rate"]
    one = result.get("transform_by_heatmaps") or {}
    if "forward" in result and "decode" in result:   # the work the container cannot avoid
        out["transform.forward_decode_cpu_ms_per_image"] = (result["forward"]["cpu_ms_per_image"]
                                                            + result["decode"]["with_draft_cpu_ms_per_image"])
    if one.get("off", {}).get("server_cpu_ms_per_image") and "transform.forward_decode_cpu_ms_per_image" in out:
        out["transform_one_job.serving_vs_forward_decode"] = (one["off"]["server_cpu_ms_per_image"]
                                                              / out["transform.forward_decode_cpu_ms_per_image"])
    e = result.get("e2e")
    if not e:
        return out
    serving = e.get("server_cpu_ms_per_image")
    if serving:
        out["transform.serving_cpu_ms_per_image"] = serving
        # What one vCPU scores per second when the serving stack has it to itself: dermscore plan's CPU rate.
        out["transform.images_per_vcpu_s"] = 1000 / serving
        if "transform.forward_decode_cpu_ms_per_image" in out:
            out["transform.serving_vs_forward_decode"] = serving / out["transform.forward_decode_cpu_ms_per_image"]
    moto = e.get("moto_cpu_ms_per_image")
    if moto is not None:
        out["moto.cpu_ms_per_image"] = moto
        total = moto + e["cpu_ms_per_image"] + (serving or 0.0)
        out["moto.cpu_share"] = moto / total if total else 0.0
    return out


def collected(runner: Any) -> int:
    return sum(sum((j.get("collected") or {}).get(k, 0) for k in ("scored", "failed")) for j in list(runner.results))


# --------------------------------------------------------------------------- report

def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def render(result: dict[str, Any]) -> str:
    f = result["figures"]
    dev = result["machine"]["device"]
    lines = [f"dermscore bench: {result['images']} images ({result['distinct_images']} distinct, repeated under "
             f"distinct keys), model {result['model']['name']} v{result['model']['version']} "
             f"({result['model']['arch']}, "
             f"input {result['model']['input_size'][0]}x{result['model']['input_size'][1]}, "
             f"sha256 {result['model']['weights_sha256'][:12]})",
             f"device: {dev}; load average at start {result['loadavg_at_start'][0]:.1f}, at end "
             f"{result['machine']['loadavg_at_end'][0]:.1f} (other processes share these cores)", ""]
    rows: list[tuple[str, str, str]] = []

    def add(label: str, value: str, note: str = "") -> None:
        rows.append((label, value, note))

    if "forward_rate" in f:
        add("1. model forward (uint8 batches in memory)", f"{f['forward_rate']:.1f} img/s",
            f"batch {result['forward']['batch_size']}, {result['forward'].get('runtime', '')}")
        for name, fw in (result.get("forward_by_runtime") or {}).items():
            add(f"   forward on {name}", f"{fw['rate']:.1f} img/s",
                f"{fw['cpu_ms_per_image']:.1f} ms CPU per image; forward.{name}.rate")
        for name in ("onnx", "torch_compile"):
            if f.get(f"forward.{name}_vs_torch") is not None:
                add(f"   ratio {name} / torch eager", f"{f[f'forward.{name}_vs_torch']:.2f}x",
                    f"forward.{name}_vs_torch (target >= 2.0 for the chosen runtime)")
    if "e2e_rate" in f:
        e = result["e2e"]
        add("2. end to end (S3 PUT -> Parquet rows)", f"{f['e2e_rate']:.1f} img/s",
            f"{e['parquet_rows']} rows, {e['jobs']} jobs, {e['seconds']:.1f} s")
        if f.get("e2e_vs_forward") is not None:
            add("   ratio end to end / forward", f"{f['e2e_vs_forward']:.2f}x", "target >= 0.90")
        add("   transform only (runner: GET+decode+forward)", f"{e['transform_rate']:.1f} img/s",
            f"{e['transform_seconds']:.1f} s in jobs; {e.get('transform_stack', '')}")
        if f.get("transform.vs_forward") is not None:
            add("   ratio transform / forward", f"{f['transform.vs_forward']:.2f}x", "transform.vs_forward")
        for mode, e_mode in (result.get("e2e_by_heatmaps") or {}).items():
            add(f"   transform, heatmaps {mode}", f"{e_mode['transform_rate']:.1f} img/s", f"transform.rate.{mode}")
        if f.get("transform.high_vs_off") is not None:
            add("   ratio transform high / off", f"{f['transform.high_vs_off']:.2f}x", "target >= 0.90")
        if f.get("transform.serving_vs_forward_decode") is not None:
            add("   serving CPU / (forward + decode) per image", f"{f['transform.serving_vs_forward_decode']:.2f}x",
                f"{f['transform.serving_cpu_ms_per_image']:.1f} ms vs "
                f"{f['transform.forward_decode_cpu_ms_per_image']:.1f} ms; target <= 1.2")
        if f.get("moto.cpu_share") is not None:
            add("   moto server's share of the CPU", f"{f['moto.cpu_share']:.0%}",
                f"{f['moto.cpu_ms_per_image']:.1f} ms per image (the local stand-in for S3/SQS)")
        if f.get("transform.cpu_ms_outside_forward") is not None:
            add("   server CPU per image outside forward", f"{f['transform.cpu_ms_outside_forward']:.1f} ms",
                f"{e['server_cpu_ms_per_image']:.1f} ms in the server processes - forward alone")
        cpu = f"{e['cpu_ms_per_image']:.0f} ms pipeline process"
        if e.get("moto_cpu_ms_per_image") is not None:
            cpu += f" + {e['moto_cpu_ms_per_image']:.0f} ms moto server"
        if "forward" in result:
            cpu += f" (forward alone: {result['forward']['cpu_ms_per_image']:.0f} ms)"
        add("   CPU time per image", "", cpu)
        if e.get("api_calls_per_image_by_operation"):
            by_op = e["api_calls_per_image_by_operation"]
            add("   AWS API calls per image (pipeline, uploads excluded)", f"{e['api_calls_per_image']:.2f}", "")
            for op, per in by_op.items():
                add(f"     {op}", f"{per:.3f}", "")
        if e.get("payload"):
            pl = e["payload"]
            add(f"   MaxPayloadInMB={pl['max_payload_mb']}: lines per request", f"{pl['lines_per_request']}",
                f"{pl['manifest_line_bytes']:.0f} B/line in, {pl['output_line_bytes']:.0f} B/line out "
                f"({pl['response_mb_per_request']} MB response)")
    for mode, t in (result.get("transform_by_heatmaps") or {}).items():
        add(f"2b. one transform job alone, heatmaps {mode}", f"{t['transform_rate']:.1f} img/s",
            f"{t['images']} images, {t['heatmaps_stored']} heatmaps stored; "
            f"serving CPU {t['server_cpu_ms_per_image'] or 0:.1f} ms/image")
    if f.get("transform_one_job.high_vs_off") is not None:
        add("   ratio one job high / off", f"{f['transform_one_job.high_vs_off']:.2f}x", "target >= 0.90")
    if f.get("transform_one_job.serving_vs_forward_decode") is not None:
        add("   one job: serving CPU / (forward + decode)",
            f"{f['transform_one_job.serving_vs_forward_decode']:.2f}x", "target <= 1.2")
    if "seed_rate" in f:
        add("3. seed style (float JSON per image, batch 1)", f"{f['seed_rate']:.2f} img/s",
            f"{result['seed']['images']} images, {result['seed']['payload_mb_per_image']:.1f} MB JSON each")
        if f.get("e2e_vs_seed") is not None:
            add("   ratio end to end / seed style", f"{f['e2e_vs_seed']:.1f}x", "target >= 20")
    if "decode_with_draft_per_core" in f:
        add("4. decode+resize with draft()", f"{f['decode_with_draft_per_core']:.0f} img/s/core", "")
        add("   decode+resize without draft()", f"{f['decode_without_draft_per_core']:.0f} img/s/core",
            f"draft {result['decode']['draft_speedup']:.2f}x faster")
        add("   decode CPU per image (draft)", f"{f['decode.cpu_ms_per_image']:.2f} ms", "decode.cpu_ms_per_image")
    mem = result["memory"]
    add("5. peak RSS (bench process)", f"{f['peak_rss_mb']:.0f} MB", "")
    for name, m in mem["phases"].items():
        add(f"   {name}: start -> peak (growth)", f"{m['start_mb']:.0f} -> {m['peak_mb']:.0f} MB",
            f"+{m['growth_mb']:.0f} MB")
    if result.get("e2e", {}).get("moto_server_peak_rss_mb"):
        add("   moto server process (S3/SQS store)", f"{result['e2e']['moto_server_peak_rss_mb']:.0f} MB",
            "not the pipeline")
    for key, label in (("usd_per_million_e2e", "end to end"), ("usd_per_million_forward", "forward only")):
        if key in f:
            add(f"cost / 1M images on ml.g4dn.xlarge ({label})", f"${f[key]:.2f}",
                f"$0.736/h at the rate measured on {result['machine']['device_kind']}")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines += [f"{a.ljust(w0)}  {b.rjust(w1)}  {c}".rstrip() for a, b, c in rows]
    if result["machine"]["device_kind"] == "cpu" and any(k.startswith("usd") for k in f):
        lines.append("(cost lines apply a GPU price to CPU rates: only meaningful from a --device cuda run)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command

def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model(p)
    p.add_argument("--count", type=int, default=1000, help="images per measurement")
    options.add_images(p, f"distinct images, repeated under distinct keys (default {DEFAULT_IMAGES_DIR})")
    options.add_device(p)
    p.add_argument("--batch-size", type=int, default=0, help="forward batch (0: 32 CPU, 128 CUDA)")
    p.add_argument("--workers", type=int, default=0, help="fetch/decode threads per scorer (0: 4 x cores)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads for every phase (0: torch's)")
    p.add_argument("--seed-images", type=int, default=30, help="images for the seed-style path (slow)")
    p.add_argument("--decode-images", type=int, default=200, help="images per decode measurement")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated subset of {','.join(PHASES)} (memory is always reported)")
    p.add_argument("--batching-window", type=float, default=1.0,
                   help="SQS batching window of the local poller, seconds (template default 300)")
    p.add_argument("--upload-threads", type=int, default=4, help="concurrent S3 PUTs of the uploader")
    p.add_argument("--max-ahead", type=int, default=300,
                   help="most images uploaded but not yet in Parquet (closed-loop load; keeps moto's SQS short)")
    p.add_argument("--moto", choices=("subprocess", "thread"), default="subprocess",
                   help="moto server in its own process (default) or in a thread of this one")
    p.add_argument("--heatmaps", choices=("off", "high", "all"), default=None,
                   help="one DERMSCORE_GRADCAM for the end-to-end phase instead of --heatmap-modes")
    p.add_argument("--heatmap-modes", default="off,high",
                   help="the end-to-end phase once per mode (comma-separated off/high/all); the first is e2e")
    options.add_runtime(p)
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile in the forward phase (compiling takes 1-2 min, not timed)")
    p.add_argument("--timeout", type=float, default=3600, help="give up the end-to-end phase after this long")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images, small subsets: checks that it works")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="also write the figures as JSON to this file (keys: docs/benchmark.md)")
    options.add_quiet(p)


def run(args: argparse.Namespace) -> int:
    from batch.model import pick_device
    from batch.scorer import Scorer
    from dermscore import imaging

    model_dir = args.model
    device = pick_device(args.device)
    if device.type == "cuda":
        import torch
        if not torch.cuda.is_available():
            sys.stderr.write("--device cuda: no CUDA device available on this machine (torch "
                             f"{torch.__version__}); run on a GPU host or use --device cpu\n")
            return 2
    args.device_resolved = str(device)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        sys.stderr.write(f"unknown phase(s) {sorted(unknown)}; choose from {PHASES}\n")
        return 2
    modes = [args.heatmaps] if args.heatmaps else [m.strip() for m in args.heatmap_modes.split(",") if m.strip()]
    if not modes or set(modes) - {"off", "high", "all"}:
        sys.stderr.write(f"--heatmap-modes {args.heatmap_modes!r}: give a comma-separated subset of off,high,all\n")
        return 2
    n = QUICK_IMAGES if args.quick else args.count
    seed_n = min(args.seed_images, 5) if args.quick else args.seed_images
    decode_n = min(args.decode_images, 20) if args.quick else args.decode_images
    show = not args.quiet
    blobs = load_blobs(args.images or DEFAULT_IMAGES_DIR, limit=n if n < 200 else None)

    result: dict[str, Any] = {"loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "images": n,
                              "distinct_images": min(n, len(blobs)), "command": " ".join(sys.argv)}
    figures: dict[str, float] = {}
    from batch.runtime import RuntimeUnavailable, describe

    with RssSampler() as rss:
        try:
            scorer = Scorer.from_model_dir(model_dir, device=device, batch_size=args.batch_size or None,
                                           workers=args.workers or None, runtime=args.runtime)
        except RuntimeUnavailable as exc:
            sys.stderr.write(f"{exc}\n")
            return 2
        meta = scorer.meta
        result["model"] = {"dir": str(model_dir), "name": meta.name, "version": meta.version, "arch": meta.arch,
                           "input_size": list(meta.input_size), "weights_sha256": meta.weights_sha256}
        result["machine"] = {"device": device_label(device), "device_kind": "cpu" if device.type == "cpu"
                             else device_label(device), "cpu": cpu_model(), "cores": os.cpu_count(),
                             "python": platform.python_version(),
                             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                             "runtime": describe(scorer.engine)}
        import torch
        result["machine"]["torch"] = torch.__version__
        if "decode" in phases:
            with rss.phase("decode"):
                result["decode"] = bench_decode(blobs, scorer.input_size, decode_n, show)
            figures["decode_with_draft_per_core"] = result["decode"]["with_draft_per_core"]
            figures["decode_without_draft_per_core"] = result["decode"]["without_draft_per_core"]
        if "forward" in phases:
            with rss.phase("forward"):
                pixels = np.stack([imaging.decode(b, scorer.input_size).pixels for _, b in blobs])
                by_runtime: dict[str, dict[str, Any]] = {}
                for name, sc in forward_scorers(args, model_dir, device, scorer):
                    by_runtime[name] = {"runtime": describe(sc.engine), **bench_forward(sc, pixels, n, show)}
                    figures[f"forward.{name}.rate"] = by_runtime[name]["rate"]
                    figures[f"forward.{name}.cpu_ms_per_image"] = by_runtime[name]["cpu_ms_per_image"]
                result["forward_by_runtime"] = by_runtime
                result["forward"] = by_runtime[scorer.engine.name]   # the runtime the pipeline uses
                del pixels
            figures["forward_rate"] = result["forward"]["rate"]
            for name in ("onnx", "torch_compile"):
                if name in by_runtime:
                    figures[f"forward.{name}_vs_torch"] = by_runtime[name]["rate"] / by_runtime["torch"]["rate"]
        if "seed" in phases:
            with rss.phase("seed"):
                result["seed"] = bench_seed(scorer, blobs, seed_n, show)
            figures["seed_rate"] = result["seed"]["rate"]
        del scorer
        if "e2e" in phases:
            by_mode = {}
            for i, mode in enumerate(modes):
                by_mode[mode] = bench_e2e(args, model_dir, blobs, n, rss, show, heatmaps=mode,
                                          phase="e2e" if i == 0 else f"e2e-heatmaps-{mode}")
            result["e2e_by_heatmaps"] = by_mode
            result["e2e"] = by_mode[modes[0]]
            figures["e2e_rate"] = result["e2e"]["rate"]
        if "transform" in phases:
            result["transform_by_heatmaps"] = {mode: bench_transform(args, model_dir, blobs, n, rss, show, mode)
                                               for mode in modes}
    figures["peak_rss_mb"] = rss.peak
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["memory"] = {"peak_rss_mb": rss.peak, "phases": rss.phases, "vmhwm_mb": (_status_kb("VmHWM") or 0) / 1024}
    if figures.get("e2e_rate") and figures.get("forward_rate"):
        figures["e2e_vs_forward"] = figures["e2e_rate"] / figures["forward_rate"]
    if "e2e" in result:  # the transform phase, through the real serving stack unless DERMSCORE_TRANSFORM=inprocess
        e = result["e2e"]
        figures["transform.rate"] = e["transform_rate"]
        if figures.get("forward_rate"):
            figures["transform.vs_forward"] = e["transform_rate"] / figures["forward_rate"]
        if e.get("server_cpu_ms_per_image") is not None and "forward" in result:
            figures["transform.cpu_ms_outside_forward"] = (e["server_cpu_ms_per_image"]
                                                           - result["forward"]["cpu_ms_per_image"])
    if "decode" in result:
        figures["decode.cpu_ms_per_image"] = result["decode"]["with_draft_cpu_ms_per_image"]
    figures.update(serving_figures(result))
    if figures.get("e2e_rate") and figures.get("seed_rate"):
        figures["e2e_vs_seed"] = figures["e2e_rate"] / figures["seed_rate"]
    if figures.get("e2e_rate"):
        figures["usd_per_million_e2e"] = usd_per_million(figures["e2e_rate"])
    if figures.get("forward_rate"):
        figures["usd_per_million_forward"] = usd_per_million(figures["forward_rate"])
    result["figures"] = figures
    sys.stdout.write(render(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0
