"""The embedded pipeline: local stack + SQS poller + transform runner, and the result export.

Used by ``dermscore demo`` / ``dermscore serve`` and by the end-to-end tests::

    with LocalPipeline(model_dir) as p:          # moto server, bucket, queues, model
        p.upload(files, "incoming/demo/")        # S3 -> SQS notifications, as on AWS
        p.drain()                                # poller -> enqueue -> runner -> collect (+ reconciler)
        p.export("output")                       # results/ -> output/ (Parquet + JSON)
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dermscore import layout
from infra.poller import Poller
from infra.runner import TransformRunner
from infra.scheduler import Dispatcher, Scheduler
from infra.spool import Spool
from infra.stack import DEFAULT_BUCKET, DEFAULT_STACK, LocalStack

log = logging.getLogger("dermscore.local")

RESULTS = "results/"
EXPORTED = ("predictions", "failures", "images", "reports")


def image_files(folder: Path) -> list[Path]:
    """Every file of ``folder``, whatever its name: what cannot be scored gets a failure row, as on AWS."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file())


class LocalPipeline:
    def __init__(self, model_dir: str | Path | None, bucket: str = DEFAULT_BUCKET, stack_name: str = DEFAULT_STACK,
                 endpoint: str | None = None, batching_window_s: float | None = None,
                 visibility_timeout: int | None = None, overrides: dict[str, Any] | None = None,
                 port: int = 0, reconcile_after_s: float | None = None,
                 reconcile_interval_s: float | None = None, dispatch_interval_s: float | None = 0.0,
                 max_latency_s: float | None = 0.0, spool: Spool | None = None) -> None:
        """``dispatch_interval_s`` / ``max_latency_s``: the dispatcher's schedule and
        ``MaxLatencySeconds`` (None: template.yaml's). Locally both default to 0: every step
        dispatches what is pending, as a quick demo wants; ``MinImagesPerJob`` (``overrides``)
        still holds back a job until that many images are pending, unless the latency has passed.
        ``spool``: acknowledged uploads are kept on disk (``dermscore serve``, infra.spool)."""
        self.stack = LocalStack.create(bucket=bucket, stack_name=stack_name, endpoint=endpoint, overrides=overrides,
                                       visibility_timeout=visibility_timeout, port=port, spool=spool)
        if model_dir is not None:
            self.stack.register_model(model_dir)
        self.poller = Poller(self.stack, window_s=batching_window_s)
        self.runner = TransformRunner(self.stack)
        # the reconciler: template.yaml's bound and schedule unless shortened (tests)
        self.scheduler = Scheduler(self.stack, self.runner.sagemaker_view(), after_s=reconcile_after_s,
                                   interval_s=reconcile_interval_s)
        self.dispatcher = Dispatcher(self.stack, self.runner.sagemaker_view(), interval_s=dispatch_interval_s,
                                     max_latency_s=max_latency_s)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> LocalPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def s3(self):
        return self.stack.client("s3")

    def upload(self, files: Iterable[Path], prefix: str = "incoming/", progress: bool = False) -> list[str]:
        files = list(files)
        keys = []
        if progress:
            from tqdm import tqdm
            files = tqdm(files, desc="upload", unit="img")
        for f in files:
            key = f"{prefix}{f.name}"
            self.s3.upload_file(str(f), self.stack.bucket, key)
            keys.append(key)
        return keys

    def rescore(self, request: dict[str, Any]) -> dict[str, Any]:
        """Invoke the re-score function with ``request`` (``handlers.rescore``): its run's progress.
        The pipeline then scores the queued images like new arrivals (``drain``)."""
        return self.stack.invoke("rescore", request)

    # ---- running -------------------------------------------------------------------------
    def step(self) -> bool:
        """One poll (batching window included), a dispatcher run if its schedule says so, then every
        pending job; True if anything happened."""
        batch = self.poller.poll_once()
        dispatched = self.dispatcher.tick()
        jobs = self.runner.run_pending()
        return batch is not None or bool(jobs) or bool(dispatched and dispatched["jobs_created"])

    def idle(self) -> bool:
        """Nothing on the queue, in pending/ (or an intent) or waiting to run."""
        depth = self.stack.queue_depth()
        return (depth["visible"] == 0 and depth["in_flight"] == 0 and not self.runner.pending()
                and not self.stack.list_keys(layout.PENDING) and not self.stack.list_keys(layout.DISPATCH))

    def drain(self, timeout_s: float = 600, progress_total: int = 0) -> None:
        """Run the pipeline in this thread until the queue is empty and no job is pending.

        Messages that failed and wait out their visibility timeout count as in flight, so
        drain also sees retries (and DLQ moves) through. Once idle, the reconciler runs (as its
        schedule would); drain goes on while it finds work, or jobs it will act on within the
        drain's time (a bound shorter than what is left of ``timeout_s``).
        """
        deadline = time.monotonic() + timeout_s
        bar = None
        if progress_total:  # a bar of lines transformed (scored or refused by the transform)
            from tqdm import tqdm
            bar = tqdm(total=progress_total, desc="score", unit="img")
        try:
            while time.monotonic() < deadline:
                busy = self.step()
                if bar is not None:
                    bar.update(min(progress_total, sum(r["records"] for r in self.runner.results)) - bar.n)
                if not busy and self.idle() and self.reconciled(deadline):
                    return
        finally:
            if bar is not None:
                bar.close()
        raise TimeoutError(f"pipeline not idle after {timeout_s}s: queue {self.stack.queue_depth()}")

    def reconciled(self, deadline: float) -> bool:
        """One reconciler run at idle: True if it had nothing to do, now or before ``deadline``."""
        report = self.scheduler.run_once()
        if report is None:
            return True   # logged; drain must not spin on a reconciler that fails
        if report["redriven"] + report["resubmitted"] + report["fenced"] + report["given_up"]:
            return False   # a collection, a job, a give-up begun or failure rows: see them through
        if report["giving_up"] and time.monotonic() + self.scheduler.give_up_wait_s < deadline:
            return False   # a give-up waiting out collects in flight: its rows come within the drain
        return not (report["waiting"] and time.monotonic() + self.scheduler.after_s < deadline)

    def start_background(self) -> None:
        """Poller, runner and reconciler in their own threads, as the managed services run beside
        each other."""
        self._stop.clear()
        self._threads = [threading.Thread(target=self.poller.run, args=(self._stop,), name="sqs-poller", daemon=True),
                         threading.Thread(target=self.runner.run, args=(self._stop,), name="transform-runner",
                                          daemon=True),
                         threading.Thread(target=self.scheduler.run, args=(self._stop,), name="reconciler",
                                          daemon=True),
                         threading.Thread(target=self.dispatcher.run, args=(self._stop,), name="dispatcher",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self.runner.close()
        self.stack.stop()

    # ---- results -------------------------------------------------------------------------
    def export(self, out_dir: str | Path, mirror: bool = True) -> dict[str, int]:
        """Copy ``results/`` of the bucket to ``out_dir`` (predictions/, failures/, images/, reports/).

        ``mirror`` first removes those folders, so the export is exactly this run's
        results; without it files are added or replaced (``serve`` exports repeatedly).
        """
        out = Path(out_dir)
        if mirror:
            for name in EXPORTED:
                shutil.rmtree(out / name, ignore_errors=True)
        counts = {name: 0 for name in EXPORTED}
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.stack.bucket, Prefix=RESULTS)
        for obj in pages.search("Contents[]"):  # Size and LastModified too, so not dermscore.aws.iter_keys
            rel = obj["Key"][len(RESULTS):] if obj else ""  # None: a page without objects
            if not rel or rel.endswith("/"):
                continue
            target = layout.local_path(out, rel)   # a key can never write outside out_dir
            top = rel.split("/", 1)[0]
            if top in counts:
                counts[top] += 1
            if not mirror and target.is_file() and target.stat().st_size == obj["Size"] \
                    and target.stat().st_mtime >= obj["LastModified"].timestamp():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(self.stack.bucket, obj["Key"], str(target))
        return counts
