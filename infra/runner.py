"""A local SageMaker Batch Transform: executes the CreateTransformJob requests moto records.

moto accepts ``CreateTransformJob`` and runs nothing, so this runner does what the managed
service does with the recorded request:

1. downloads and extracts the ``model.tar.gz`` named by the Model's ``ModelDataUrl`` and
   loads it once per model (cached) with the SageMaker Model's environment from template.yaml
   (``TransformModel``), as the container would;
2. for every input file under ``TransformInput ... S3Uri`` (S3Prefix semantics) splits
   the lines into requests of at most ``MaxPayloadInMB`` (``MultiRecord``; one line per
   request with ``SingleRecord``) and runs ``input_fn -> predict_fn -> output_fn`` on each;
   with ``InstanceCount`` > 1 the files are spread over that many worker processes (whole
   files per worker, as the service spreads them over instances), each loading the model
   once (its "container start-up");
3. writes ``<S3OutputPath>/<input file name>.out`` (``AssembleWith=Line``);
4. delivers the "SageMaker Transform Job State Change" event (Completed, or Failed with a
   reason when anything above raised) to ``handlers.collect.lambda_handler``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import posixpath
import shutil
import tarfile
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dermscore.aws import iter_keys, parse_s3_uri
from dermscore.template import LOCAL_ACCOUNT_ID, LOCAL_REGION
from infra.stack import LocalStack, client_lock

log = logging.getLogger("dermscore.runner")

MB = 1024 * 1024
DETAIL_TYPE = "SageMaker Transform Job State Change"


def split_payload(lines: list[bytes], max_payload_mb: int, strategy: str = "MultiRecord") -> list[bytes]:
    """Group lines into request bodies as Batch Transform does with ``SplitType=Line``.

    MultiRecord: as many whole lines as fit in ``max_payload_mb`` (0 = no limit);
    SingleRecord: one line per request. A single line larger than the limit cannot be sent.
    """
    limit = max_payload_mb * MB if max_payload_mb else None
    bodies: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            continue
        n = len(line) + 1
        if limit is not None and n > limit:
            raise ValueError(f"a record of {n} bytes exceeds MaxPayloadInMB={max_payload_mb}")
        if current and (strategy == "SingleRecord" or (limit is not None and size + n > limit)):
            bodies.append(b"\n".join(current) + b"\n")
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        bodies.append(b"\n".join(current) + b"\n")
    return bodies


def transform_file(s3, scorer: Any, job: dict[str, Any], in_bucket: str, key: str) -> int:
    """One input file -> ``<S3OutputPath><file name>.out``; returns the records written."""
    from batch import inference

    out_bucket, out_prefix = parse_s3_uri(job["TransformOutput"]["S3OutputPath"])
    if out_prefix and not out_prefix.endswith("/"):
        out_prefix += "/"
    content_type = job["TransformInput"].get("ContentType", "application/jsonlines")
    accept = job["TransformOutput"].get("Accept", "application/jsonlines")
    records = 0
    lines = s3.get_object(Bucket=in_bucket, Key=key)["Body"].read().splitlines()
    parts: list[str] = []
    for body in split_payload(lines, int(job.get("MaxPayloadInMB", 6)), job.get("BatchStrategy", "MultiRecord")):
        data = inference.input_fn(body, content_type)
        prediction = inference.predict_fn(data, scorer)
        out = inference.output_fn(prediction, accept)
        if isinstance(out, tuple):
            out = out[0]
        text = out.decode() if isinstance(out, (bytes, bytearray)) else str(out)
        parts.append(text.rstrip("\n"))
        records += len(data)
    # AssembleWith=Line: each response followed by a newline.
    s3.put_object(Bucket=out_bucket, Key=f"{out_prefix}{posixpath.basename(key)}.out",
                  Body="".join(p + "\n" for p in parts).encode(), ContentType=accept)
    return records


# --- one "instance": a worker process with its own model and S3 client ------------------------

_WORKER: dict[str, Any] = {}


def _init_instance(model_dir: str, env: dict[str, str], threads: int) -> None:
    os.environ.update(env)                 # the local endpoint and its dummy credentials
    import boto3
    import torch

    from batch import inference

    torch.set_num_threads(max(1, threads))
    _WORKER["scorer"] = inference.model_fn(model_dir)
    _WORKER["s3"] = boto3.client("s3")


def _instance_transform(job: dict[str, Any], in_bucket: str, keys: list[str]) -> tuple[int, int, list[str]]:
    """Score the files an instance was given; returns (pid, records, keys)."""
    records = sum(transform_file(_WORKER["s3"], _WORKER["scorer"], job, in_bucket, k) for k in keys)
    return os.getpid(), records, keys


def assign_files(keys: list[str], instances: int) -> list[list[str]]:
    """Whole files to instances, round-robin (at most ``instances`` non-empty groups)."""
    groups = [keys[i::instances] for i in range(max(1, instances))]
    return [g for g in groups if g]


def _ms(value: Any) -> int | None:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return None


def state_change_event(job: dict[str, Any], status: str, failure_reason: str | None,
                       started: datetime, ended: datetime, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """The EventBridge event SageMaker emits for a transform job (documented shape)."""
    detail = {
        "TransformJobName": job["TransformJobName"],
        "TransformJobArn": job.get("TransformJobArn", ""),
        "TransformJobStatus": status,
        "ModelName": job.get("ModelName"),
        "MaxConcurrentTransforms": job.get("MaxConcurrentTransforms"),
        "ModelClientConfig": job.get("ModelClientConfig"),
        "MaxPayloadInMB": job.get("MaxPayloadInMB"),
        "BatchStrategy": job.get("BatchStrategy"),
        "Environment": job.get("Environment", {}),
        "TransformInput": job["TransformInput"],
        "TransformOutput": job["TransformOutput"],
        "TransformResources": job.get("TransformResources"),
        "CreationTime": _ms(job.get("CreationTime")),
        "TransformStartTime": _ms(started),
        "TransformEndTime": _ms(ended),
        "Tags": dict(tags or {}),
    }
    if failure_reason:
        detail["FailureReason"] = failure_reason
    return {
        "version": "0", "id": str(uuid.uuid4()), "detail-type": DETAIL_TYPE, "source": "aws.sagemaker",
        "account": LOCAL_ACCOUNT_ID, "time": ended.strftime("%Y-%m-%dT%H:%M:%SZ"), "region": LOCAL_REGION,
        "resources": [job.get("TransformJobArn", "")],
        "detail": {k: v for k, v in detail.items() if v is not None},
    }


def matches(pattern: Any, value: Any) -> bool:
    """EventBridge content filtering, the subset the collect rule uses (exact values, prefix, nesting)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(k in value and matches(p, value[k]) for k, p in pattern.items())
    if isinstance(pattern, list):
        return any(
            (isinstance(value, str) and value.startswith(p["prefix"])) if isinstance(p, dict) and "prefix" in p
            else value == p for p in pattern)
    return pattern == value


class TransformRunner:
    def __init__(self, stack: LocalStack, work_dir: str | Path | None = None) -> None:
        self.stack = stack
        self.s3 = stack.client("s3")
        self.sm = stack.client("sagemaker")
        self._tmp = tempfile.TemporaryDirectory(prefix="dermscore-runner-") if work_dir is None else None
        self.work_dir = Path(work_dir or self._tmp.name)
        self.seen: set[str] = set()
        self._models: dict[tuple[str, str], Any] = {}
        self._dirs: set[tuple[str, str]] = set()
        self.instance_pids: dict[str, set[int]] = {}   # job -> worker processes that ran its files
        self.results: list[dict[str, Any]] = []
        self._delivery: ThreadPoolExecutor | None = None  # set while run() runs in the background

    # ---- model ------------------------------------------------------------------------------
    def model(self, model_name: str) -> Any:
        from batch import inference

        cache_key, model_dir = self.model_dir(model_name)
        if cache_key not in self._models:
            log.info("model %s loaded from %s", model_name, cache_key[0])
            with client_lock():  # the scorer creates a boto3 client; others may be doing so in another thread
                self._models[cache_key] = inference.load_model(str(model_dir), self.container_env())
        return self._models[cache_key]

    def container_env(self) -> dict[str, str]:
        """The transform container's environment: the SageMaker Model's (TransformModel in
        template.yaml, as on AWS), with ``DERMSCORE_*`` variables of this process on top (a local
        knob, e.g. ``dermscore bench --heatmaps``)."""
        return {**self.stack.spec.model_env, **{k: v for k, v in os.environ.items() if k.startswith("DERMSCORE_")}}

    def model_dir(self, model_name: str) -> tuple[tuple[str, str], Path]:
        """The extracted model.tar.gz of ``model_name`` (downloaded once per artifact)."""
        url = self.sm.describe_model(ModelName=model_name)["PrimaryContainer"]["ModelDataUrl"]
        bucket, key = parse_s3_uri(url)
        etag = self.s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        cache_key = (url, etag)
        model_dir = self.work_dir / "models" / etag
        if cache_key not in self._dirs:
            if model_dir.exists():
                shutil.rmtree(model_dir)
            model_dir.mkdir(parents=True)
            tarball = model_dir.with_suffix(".tar.gz")
            self.s3.download_file(bucket, key, str(tarball))
            with tarfile.open(tarball) as tar:
                tar.extractall(model_dir, filter="data")
            tarball.unlink()
            self._dirs.add(cache_key)
        return cache_key, model_dir

    # ---- jobs -------------------------------------------------------------------------------
    def pending(self) -> list[str]:
        pages = self.sm.get_paginator("list_transform_jobs").paginate(NameContains=self.stack.job_prefix)
        names = pages.search("TransformJobSummaries[].TransformJobName")  # None: a page without jobs
        return [n for n in names if n and n.startswith(f"{self.stack.job_prefix}-") and n not in self.seen]

    def execute(self, job: dict[str, Any]) -> int:
        """Run the transform; returns the number of records written."""
        src = job["TransformInput"]["DataSource"]["S3DataSource"]
        if src.get("S3DataType", "S3Prefix") != "S3Prefix":
            raise ValueError(f"S3DataType {src.get('S3DataType')} is not supported by the local runner")
        in_bucket, prefix = parse_s3_uri(src["S3Uri"])
        keys = sorted(iter_keys(self.s3, in_bucket, prefix))
        if not keys:
            raise ValueError(f"no input objects under {src['S3Uri']}")
        instances = min(int((job.get("TransformResources") or {}).get("InstanceCount", 1) or 1), len(keys))
        if instances <= 1:
            scorer = self.model(job["ModelName"])
            return sum(transform_file(self.s3, scorer, job, in_bucket, key) for key in keys)
        return self._execute_parallel(job, in_bucket, keys, instances)

    def _execute_parallel(self, job: dict[str, Any], in_bucket: str, keys: list[str], instances: int) -> int:
        """InstanceCount > 1: one worker process per instance, whole files per instance. Processes
        are spawned (not forked: this process runs server and client threads) and each loads the
        model once, like an instance's container; CPU threads are shared out between them."""
        _, model_dir = self.model_dir(job["ModelName"])
        env = {**{k: v for k, v in os.environ.items() if k.startswith("AWS_")}, **self.container_env(),
               "AWS_ENDPOINT_URL": self.stack.endpoint}
        threads = max(1, (os.cpu_count() or 1) // instances)
        env.setdefault("DERMSCORE_WORKERS", str(max(2, 4 * threads)))
        groups = assign_files(keys, instances)
        ctx = multiprocessing.get_context("spawn")
        records = 0
        pids: set[int] = set()
        # One single-process executor per instance: each group of files runs in its own process
        # (a shared pool could hand two groups to one worker while another is still starting).
        pools = [ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_instance,
                                     initargs=(str(model_dir), env, threads)) for _ in groups]
        try:
            futures = [pool.submit(_instance_transform, job, in_bucket, group)
                       for pool, group in zip(pools, groups, strict=False)]
            for future in futures:
                pid, n, _ = future.result()
                records += n
                pids.add(pid)
        finally:
            for pool in pools:
                pool.shutdown(wait=True, cancel_futures=True)
        self.instance_pids[job["TransformJobName"]] = pids
        log.info("transform job %s: %d files on %d instances (processes %s)", job["TransformJobName"], len(keys),
                 len(groups), sorted(pids))
        return records

    def tags(self, job: dict[str, Any]) -> dict[str, str]:
        """The job's tags, which SageMaker's state-change event carries (``detail.Tags``)."""
        try:
            found = self.sm.list_tags(ResourceArn=job["TransformJobArn"]).get("Tags", [])
        except Exception:  # an event without tags is valid: collect then reads every claim
            log.warning("no tags for transform job %s", job.get("TransformJobName"), exc_info=True)
            return {}
        return {t["Key"]: t["Value"] for t in found}

    def run_job(self, name: str) -> dict[str, Any]:
        self.seen.add(name)
        job = self.sm.describe_transform_job(TransformJobName=name)
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        status, reason, records = "Completed", None, 0
        try:
            records = self.execute(job)
        except Exception as exc:  # the job fails as a whole, as on SageMaker
            log.exception("transform job %s failed", name)
            status, reason = "Failed", f"ClientError: {type(exc).__name__}: {exc}"[:1024]
        elapsed = time.perf_counter() - t0
        event = state_change_event(job, status, reason, started, datetime.now(UTC), self.tags(job))
        log.info("transform job %s %s: %d records in %.2fs", name, status, records, elapsed)
        result = {"job_name": name, "status": status, "records": records, "seconds": elapsed,
                  "failure_reason": reason, "collected": None}
        if self._delivery is not None:
            # Background mode: EventBridge invokes collect asynchronously, so the transform
            # container goes on to the next job instead of idling while collect writes results.
            self._delivery.submit(self._deliver_into, result, event)
        else:
            result["collected"] = self.deliver(event)
        self.results.append(result)
        return result

    def _deliver_into(self, result: dict[str, Any], event: dict[str, Any]) -> None:
        try:
            result["collected"] = self.deliver(event)
        except Exception:
            log.exception("event for %s not delivered", result["job_name"])

    def deliver(self, event: dict[str, Any], attempts: int = 3) -> Any:
        """Route the event through the collect rule's pattern to collect; like EventBridge's
        asynchronous invocation (MaximumRetryAttempts 2), retry a failed delivery."""
        pattern = self.stack.spec.collect_event_pattern
        if pattern and not matches(pattern, event):
            log.info("event for %s does not match the collect rule; not delivered",
                     event["detail"].get("TransformJobName"))
            return None
        for attempt in range(1, attempts + 1):
            try:
                return self.stack.invoke("collect", event)
            except Exception:
                log.exception("collect failed (attempt %d/%d) for %s", attempt, attempts,
                              event["detail"]["TransformJobName"])
                if attempt == attempts:
                    raise
                time.sleep(0.5 * attempt)

    def run_pending(self) -> list[dict[str, Any]]:
        return [self.run_job(n) for n in self.pending()]

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Run jobs until ``stop``; state-change events go to collect from a delivery thread
        (all delivered before this returns). After a job, look for the next one at once."""
        with ThreadPoolExecutor(1, thread_name_prefix="eventbridge") as delivery:
            self._delivery = delivery
            try:
                while not stop.is_set():
                    ran = []
                    try:
                        ran = self.run_pending()
                    except Exception:
                        log.exception("runner error")
                    if not ran:
                        stop.wait(interval_s)
            finally:
                self._delivery = None

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
