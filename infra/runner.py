"""A local SageMaker Batch Transform: executes the CreateTransformJob requests moto records.

moto accepts ``CreateTransformJob`` and runs nothing, so this runner does what the managed
service does with the recorded request. Two modes (``TransformRunner(mode=...)``, or the
environment variable ``DERMSCORE_TRANSFORM``):

``serving`` (the default: ``dermscore demo``, ``dermscore serve``, the end-to-end tests)
    the real serving stack (:mod:`infra.serving`): for each job, ``InstanceCount`` model servers
    (the SageMaker PyTorch inference toolkit + TorchServe, each its own process tree) on the
    unpacked ``model.tar.gz`` of the Model's ``ModelDataUrl``, with the Model's environment from
    template.yaml (``TransformModel``). Then, as Batch Transform does: ``/ping`` until healthy;
    whole input files to instances; each file split by ``SplitType=Line`` into requests of at
    most ``MaxPayloadInMB`` (``MultiRecord``; one line each with ``SingleRecord``);
    ``MaxConcurrentTransforms`` requests in flight per instance; ``ModelClientConfig``'s
    ``InvocationsTimeoutInSeconds`` (default 600) and ``InvocationsMaxRetries`` (default 3);
    a request that still fails fails the job. Servers are reused by later jobs of the same
    artifact (AWS starts fresh instances for every job).
``inprocess`` (fast, for unit tests: conftest selects it)
    the same container code called in this process: ``inference.load_model`` once per model,
    then ``input_fn -> predict_fn -> output_fn`` per request (one worker process per instance
    when ``InstanceCount`` > 1). No model server, no HTTP, the project's own venv.

In both modes the output of each input file is assembled by line into
``<S3OutputPath>/<input file name>.out`` (``AssembleWith=Line``), and the "SageMaker Transform
Job State Change" event (Completed, or Failed with a reason when anything above raised) goes
to ``handlers.collect.lambda_handler``.

moto reports every transform job as Completed the moment it is created, so what the job's state
*is* comes from here: :meth:`TransformRunner.sagemaker_view` answers DescribeTransformJob with the
runner's outcome (InProgress until the job ran), for the reconciler (``infra.scheduler``).

A lost event is a test's fault to inject: replace :meth:`TransformRunner.deliver` (as
``tests/test_faults.py`` replaces ``execute``) with one that drops it.
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
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from batch.bundle import sha256_file
from dermscore.aws import iter_keys, parse_s3_uri
from dermscore.template import LOCAL_ACCOUNT_ID, LOCAL_REGION
from infra.iam import TRANSFORM_ROLE
from infra.stack import LocalStack, client_lock

log = logging.getLogger("dermscore.runner")

MB = 1024 * 1024
DETAIL_TYPE = "SageMaker Transform Job State Change"
MODE_ENV = "DERMSCORE_TRANSFORM"
MODES = ("serving", "inprocess")
DEFAULT_MODE = "serving"
# ModelClientConfig defaults of Batch Transform.
DEFAULT_INVOCATIONS_TIMEOUT_S = 600
DEFAULT_INVOCATIONS_MAX_RETRIES = 3


def resolve_mode(mode: str | None = None) -> str:
    """The transform mode: ``mode``, else ``$DERMSCORE_TRANSFORM``, else serving."""
    chosen = (mode or os.environ.get(MODE_ENV) or DEFAULT_MODE).strip().lower()
    if chosen not in MODES:
        raise ValueError(f"{MODE_ENV}={chosen!r}: choose one of {MODES}")
    return chosen


def assemble(parts: list[str]) -> bytes:
    """``AssembleWith=Line``: each response followed by a newline."""
    return "".join(p.rstrip("\n") + "\n" for p in parts).encode()


def output_location(job: dict[str, Any], key: str) -> tuple[str, str]:
    out_bucket, out_prefix = parse_s3_uri(job["TransformOutput"]["S3OutputPath"])
    if out_prefix and not out_prefix.endswith("/"):
        out_prefix += "/"
    return out_bucket, f"{out_prefix}{posixpath.basename(key)}.out"


def request_bodies(s3, job: dict[str, Any], in_bucket: str, key: str) -> list[bytes]:
    lines = s3.get_object(Bucket=in_bucket, Key=key)["Body"].read().splitlines()
    return split_payload(lines, int(job.get("MaxPayloadInMB", 6)), job.get("BatchStrategy", "MultiRecord"))


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
    """In-process mode: one input file -> ``<S3OutputPath><file name>.out``; returns the records written."""
    from batch import inference

    content_type = job["TransformInput"].get("ContentType", "application/jsonlines")
    accept = job["TransformOutput"].get("Accept", "application/jsonlines")
    records = 0
    parts: list[str] = []
    for body in request_bodies(s3, job, in_bucket, key):
        data = inference.input_fn(body, content_type)
        prediction = inference.predict_fn(data, scorer)
        out = inference.output_fn(prediction, accept)
        if isinstance(out, tuple):
            out = out[0]
        text = out.decode() if isinstance(out, (bytes, bytearray)) else str(out)
        parts.append(text)
        records += len(data)
    out_bucket, out_key = output_location(job, key)
    s3.put_object(Bucket=out_bucket, Key=out_key, Body=assemble(parts), ContentType=accept)
    return records


def serve_file(s3, server: Any, job: dict[str, Any], in_bucket: str, key: str) -> int:
    """Serving mode: one input file through a model server, as Batch Transform feeds an instance:
    ``MaxConcurrentTransforms`` requests in flight, each with the job's timeout and retries; the
    responses assembled by line in input order. Returns the records sent."""
    content_type = job["TransformInput"].get("ContentType", "application/jsonlines")
    accept = job["TransformOutput"].get("Accept", "application/jsonlines")
    client = job.get("ModelClientConfig") or {}
    timeout_s = float(client.get("InvocationsTimeoutInSeconds") or DEFAULT_INVOCATIONS_TIMEOUT_S)
    retries = int(client.get("InvocationsMaxRetries", DEFAULT_INVOCATIONS_MAX_RETRIES))
    concurrent = max(1, int(job.get("MaxConcurrentTransforms") or 1))
    bodies = request_bodies(s3, job, in_bucket, key)
    with ThreadPoolExecutor(concurrent, thread_name_prefix="invocations") as pool:
        outs = list(pool.map(lambda b: server.invoke(b, content_type, accept, timeout_s, retries), bodies))
    out_bucket, out_key = output_location(job, key)
    s3.put_object(Bucket=out_bucket, Key=out_key, Body=assemble([o.decode("utf-8") for o in outs]),
                  ContentType=accept)
    return sum(b.count(b"\n") for b in bodies)


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


def state_change_event(job: dict[str, Any], status: str, failure_reason: str | None,
                       started: datetime, ended: datetime) -> dict[str, Any]:
    """The EventBridge event SageMaker emits when ``job`` (its description or CreateTransformJob
    request) reaches ``status``. One definition, :func:`handlers.collect.state_change_event`, which
    the reconciler also uses for a lost event."""
    from handlers.collect import state_change_event as event_of

    arn = job.get("TransformJobArn") or \
        f"arn:aws:sagemaker:{LOCAL_REGION}:{LOCAL_ACCOUNT_ID}:transform-job/{job['TransformJobName']}"
    description = {**job, "TransformJobArn": arn, "TransformJobStatus": status, "TransformStartTime": started,
                   "TransformEndTime": ended, "Environment": job.get("Environment", {})}
    if failure_reason:
        description["FailureReason"] = failure_reason
    return event_of(description)


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
    def __init__(self, stack: LocalStack, work_dir: str | Path | None = None, mode: str | None = None,
                 pool: Any = None) -> None:
        self.mode = resolve_mode(mode)
        self.serve = None
        if self.mode == "serving":
            from infra import serving

            self.serve = serving.ServeEnv.locate()   # ServingUnavailable (naming `make setup`) if it cannot run
            self.pool = pool or serving.SERVERS
        self.stack = stack
        self.s3 = stack.client("s3", role=TRANSFORM_ROLE)   # Batch Transform reads and writes as the Model's role
        self.sm = stack.client("sagemaker")
        self._tmp = tempfile.TemporaryDirectory(prefix="dermscore-runner-") if work_dir is None else None
        self.work_dir = Path(work_dir or self._tmp.name)
        self.seen: set[str] = set()
        self._models: dict[tuple[str, str], Any] = {}
        self._dirs: set[tuple[str, str]] = set()
        self._artifacts: dict[tuple[str, str], str] = {}   # (url, etag) -> sha256 of the downloaded archive
        self.instance_pids: dict[str, set[int]] = {}   # job -> worker processes that ran its files
        self.results: list[dict[str, Any]] = []
        self.outcomes: dict[str, dict[str, Any]] = {}  # job -> status, failure reason, start and end
        self._delivery: ThreadPoolExecutor | None = None  # set while run() runs in the background

    def describe(self) -> str:
        """What runs the transform (the demo prints it)."""
        if self.serve is not None:
            return self.serve.describe()
        return "in process (batch.inference.load_model + input_fn/predict_fn/output_fn; no model server)"

    # ---- model ------------------------------------------------------------------------------
    def model(self, model_name: str) -> Any:
        from batch import inference

        cache_key, model_dir = self.model_dir(model_name)
        if cache_key not in self._models:
            log.info("model %s loaded from %s", model_name, cache_key[0])
            with client_lock():  # the scorer creates a boto3 client; others may be doing so in another thread
                scorer = inference.load_model(str(model_dir), self.container_env())
                if self.stack.iam is not None:   # the container's own client, as the Model's role
                    scorer.s3 = self.stack.client("s3", role=TRANSFORM_ROLE)
                self._models[cache_key] = scorer
        return self._models[cache_key]

    def container_env(self) -> dict[str, str]:
        """The transform container's environment: the SageMaker Model's (TransformModel in
        template.yaml, as on AWS), with ``DERMSCORE_*`` variables of this process on top (a local
        knob, e.g. ``dermscore bench --heatmaps``)."""
        return {**self.stack.spec.model_env, **{k: v for k, v in os.environ.items() if k.startswith("DERMSCORE_")}}

    def model_artifact(self, model_name: str) -> tuple[tuple[str, str], Path, str]:
        """(cache key, local model.tar.gz, its sha256) of ``model_name`` (downloaded once per artifact)."""
        url = self.sm.describe_model(ModelName=model_name)["PrimaryContainer"]["ModelDataUrl"]
        bucket, key = parse_s3_uri(url)
        etag = self.s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        cache_key = (url, etag)
        tarball = self.work_dir / "artifacts" / f"{etag}.tar.gz"
        if cache_key not in self._artifacts:
            tarball.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(bucket, key, str(tarball))
            self._artifacts[cache_key] = sha256_file(tarball)
        return cache_key, tarball, self._artifacts[cache_key]

    def model_dir(self, model_name: str) -> tuple[tuple[str, str], Path]:
        """The extracted model.tar.gz of ``model_name`` (in-process mode; extracted once per artifact)."""
        cache_key, tarball, _ = self.model_artifact(model_name)
        model_dir = self.work_dir / "models" / cache_key[1]
        if cache_key not in self._dirs:
            if model_dir.exists():
                shutil.rmtree(model_dir)
            model_dir.mkdir(parents=True)
            with tarfile.open(tarball) as tar:
                tar.extractall(model_dir, filter="data")
            self._dirs.add(cache_key)
        return cache_key, model_dir

    def servers(self, model_name: str, count: int = 1, concurrent: int = 1) -> list[Any]:
        """Serving mode: ``count`` healthy model servers of ``model_name``'s artifact (started or reused)."""
        _, tarball, digest = self.model_artifact(model_name)
        return self.pool.instances(self.serve, tarball, digest, self.container_env(), count, workers=concurrent)

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
        if self.mode == "serving":
            return self._execute_serving(job, in_bucket, keys, instances)
        if instances <= 1:
            scorer = self.model(job["ModelName"])
            return sum(transform_file(self.s3, scorer, job, in_bucket, key) for key in keys)
        return self._execute_parallel(job, in_bucket, keys, instances)

    def _execute_serving(self, job: dict[str, Any], in_bucket: str, keys: list[str], instances: int) -> int:
        """One model server per instance (separate process trees), whole files per instance."""
        concurrent = max(1, int(job.get("MaxConcurrentTransforms") or 1))
        servers = self.servers(job["ModelName"], instances, concurrent)
        groups = assign_files(keys, instances)

        def run(server: Any, group: list[str]) -> int:
            return sum(serve_file(self.s3, server, job, in_bucket, k) for k in group)

        with ThreadPoolExecutor(len(groups), thread_name_prefix="instance") as pool:
            futures = [pool.submit(run, server, group) for server, group in zip(servers, groups, strict=False)]
            records = sum(f.result() for f in futures)
        self.instance_pids[job["TransformJobName"]] = {s.pid for s in servers[:len(groups)]}
        log.info("transform job %s: %d files on %d serving instances (ports %s)", job["TransformJobName"], len(keys),
                 len(groups), [s.port for s in servers[:len(groups)]])
        return records

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
        ended = datetime.now(UTC)
        # the job's state changes before its event is sent
        self.outcomes[name] = {"status": status, "failure_reason": reason, "started": started, "ended": ended}
        event = state_change_event(job, status, reason, started, ended)
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

    def sagemaker_view(self) -> LocalSageMaker:
        """SageMaker as a caller of DescribeTransformJob should see it: job states from this runner."""
        return LocalSageMaker(self.sm, self.outcomes)

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


class LocalSageMaker:
    """The local SageMaker client (moto) with the job states of the transform runner: moto keeps the
    jobs and their requests, the runner knows whether a job ran and how it ended."""

    def __init__(self, client: Any, outcomes: dict[str, dict[str, Any]]) -> None:
        self._client = client
        self._outcomes = outcomes

    def describe_transform_job(self, **kwargs: Any) -> dict[str, Any]:
        job = self._client.describe_transform_job(**kwargs)   # a missing job raises, as on SageMaker
        job = {k: v for k, v in job.items() if k not in ("TransformEndTime", "FailureReason")}
        outcome = self._outcomes.get(job["TransformJobName"])
        if outcome is None:
            return {**job, "TransformJobStatus": "InProgress"}
        job.update(TransformJobStatus=outcome["status"], TransformStartTime=outcome["started"],
                   TransformEndTime=outcome["ended"])
        if outcome["failure_reason"]:
            job["FailureReason"] = outcome["failure_reason"]
        return job

    def create_transform_job(self, **request: Any) -> dict[str, Any]:
        """moto's create, refusing a name that exists as SageMaker does (moto accepts it twice)."""
        name = request["TransformJobName"]
        try:
            self._client.describe_transform_job(TransformJobName=name)
        except ClientError:
            return self._client.create_transform_job(**request)
        raise ClientError({"Error": {"Code": "ResourceInUse", "Message": f"Job name {name} already exists"}},
                          "CreateTransformJob")

    def list_transform_jobs(self, StatusEquals: str | None = None, **kwargs: Any) -> dict[str, Any]:  # noqa: N803
        """moto's list, with each job's status as the runner knows it (filtered by ``StatusEquals``)."""
        page = self._client.list_transform_jobs(**kwargs)
        jobs = [{**j, "TransformJobStatus": (self._outcomes.get(j["TransformJobName"]) or {}).get("status",
                                                                                               "InProgress")}
                for j in page.get("TransformJobSummaries", [])]
        return {**page, "TransformJobSummaries": [j for j in jobs if StatusEquals in (None, j["TransformJobStatus"])]}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)
