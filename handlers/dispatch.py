"""Lambda ``dispatch`` (every minute): pending manifest parts -> transform jobs.

Dispatch, the second of two steps (enqueue, the first, leaves one part per SQS batch under
``pending/``). A job is sized by volume, not by a Lambda batch, so its start-up is paid once for
up to ``MAX_IMAGES_PER_JOB`` images (docs/scaling.md)::

    finish  every intent dispatch/<job>.json (a job a run began: crashed, or refused for quota /
            throttled and due again): its shards, CreateTransformJob, then its parts deleted
    list    pending/   one LIST per 1,000 parts; each key names its number of lines
    decide  dermscore.batching.plan_jobs: a job once MIN_IMAGES_PER_JOB images are pending, the
            oldest part is MAX_LATENCY_S old, or no part has arrived for QUIET_S (a drop ended; at
            most one such release per QUIET_SPACING_S); at most MAX_CONCURRENT_JOBS running
    act     per job: the intent (its parts), then its shards
              manifests/<job>/<n>-shards/part-0000i-of-0000n.jsonl   (streamed, part by part)
            then CreateTransformJob, then the parts and the intent are deleted

The job's name is the digest of its parts' keys (which are digests of their content), and the
intent is written before anything else: a run that dies anywhere, or a second run over the same
parts, finds the intent (or the job) and finishes that job instead of creating another, and a
part leaves ``pending/`` only once a job that holds it exists. A part that still ends in two jobs
(a redelivered batch re-written after its first copy was dispatched) is scored twice and
collected once (``handlers.claims``). Shards are created, never replaced (:func:`write_shards`), so
a run that met another on one intent cannot shorten that job's manifest. So two runs at once are
safe, and the template reserves no concurrency by default (``DispatchReservedConcurrency``: new
accounts refuse reservations). It runs on a schedule; enqueue also wakes it when the pending
volume makes a job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import ClientError

from dermscore import batching, layout, results, sharding
from dermscore.aws import chunks, error_code, error_message, is_missing, iter_objects
from dermscore.config import Settings
from handlers import runtime
from handlers.runtime import Runtime
from handlers.storage import MANIFEST_CONTENT_TYPE, create_once, put_json, read_json, read_lines

logger = Logger(service="dermscore-dispatch")
metrics = Metrics(service="dermscore-dispatch")   # namespace: POWERTOOLS_METRICS_NAMESPACE (template.yaml)


@dataclass(frozen=True)
class Intent:
    """A job the dispatcher is creating: its parts, until the job exists (``dispatch/<job>.json``)."""

    job: str
    parts: tuple[str, ...]
    images: int
    attempts: int = 0                     # refused creates (throttled, over quota)
    retry_after: str | None = None        # ISO time before which a refused job is not tried again

    @classmethod
    def of(cls, doc: dict[str, Any]) -> Intent:
        return cls(doc["job"], tuple(doc["parts"]), int(doc["images"]), int(doc.get("attempts", 0)),
                   doc.get("retry_after"))


# --- pure functions -------------------------------------------------------------------------------

def transform_request(settings: Settings, name: str, manifest_uri: str, instance_count: int) -> dict[str, Any]:
    """The CreateTransformJob request for a job's input (a shard folder: S3Prefix semantics)."""
    return {
        "TransformJobName": name,
        "ModelName": settings.model_name,
        "MaxConcurrentTransforms": settings.max_concurrent_transforms,
        "MaxPayloadInMB": settings.max_payload_mb,
        "BatchStrategy": settings.batch_strategy,
        "ModelClientConfig": {"InvocationsTimeoutInSeconds": settings.invocations_timeout_s},
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": manifest_uri}},
            "ContentType": MANIFEST_CONTENT_TYPE,
            "SplitType": "Line",
            "CompressionType": "None",
        },
        "TransformOutput": {
            "S3OutputPath": f"s3://{settings.bucket}/{layout.transform_output_prefix(name)}",
            "Accept": MANIFEST_CONTENT_TYPE,
            "AssembleWith": "Line",
        },
        "TransformResources": {"InstanceType": settings.instance_type, "InstanceCount": instance_count},
    }


# --- reading the bucket and SageMaker -------------------------------------------------------------

def pending_parts(s3, bucket: str) -> list[batching.Part]:
    """Every part under ``pending/`` (its size from its name: no GET)."""
    return [batching.Part(key, n, modified) for key, modified in iter_objects(s3, bucket, layout.PENDING)
            if (n := layout.part_images(key)) is not None]


def dispatch_state(s3, bucket: str) -> tuple[list[Intent], datetime | None]:
    """The intents under ``dispatch/``, and when the quiet rule last released a job: one listing."""
    listed = dict(iter_objects(s3, bucket, layout.DISPATCH))
    found = (read_json(s3, bucket, key) for key in listed if key.endswith(".json"))
    return [Intent.of(doc) for doc in found if doc], listed.get(layout.QUIET_RELEASE_KEY)


def job_exists(sm, name: str) -> bool:
    try:
        sm.describe_transform_job(TransformJobName=name)
        return True
    except ClientError as exc:
        if "Could not find" in error_message(exc) or error_code(exc) == "ResourceNotFound":
            return False
        raise


def running_jobs(sm, prefix: str) -> int:
    """This stack's transform jobs in progress (they count against MAX_CONCURRENT_JOBS; a job that is
    stopping, for the minutes that takes, does not)."""
    count, token = 0, {}
    while True:
        page = sm.list_transform_jobs(StatusEquals="InProgress", NameContains=prefix, MaxResults=100, **token)
        count += sum(1 for j in page.get("TransformJobSummaries", [])
                     if layout.is_job_of(prefix, j["TransformJobName"]))
        if not page.get("NextToken"):
            return count
        token = {"NextToken": page["NextToken"]}


# --- acting -------------------------------------------------------------------------------------

def part_lines(s3, bucket: str, key: str) -> list[str]:
    """A part's lines; [] for a part that is gone. A part is deleted only once a job holding it
    exists, so a missing one was dispatched by another run (two runs that met, which reserved
    concurrency prevents on AWS): its images are in that job, and skipping it loses nothing."""
    try:
        return read_lines(s3, bucket, key)
    except ClientError as exc:
        if not is_missing(exc):
            raise
    logger.warning("pending part gone: a job holding it exists", extra={"part": key})
    return []


def write_shards(rt: Runtime, intent: Intent) -> tuple[str, int]:
    """The job's manifest: its parts' lines, in order, cut into balanced shard files while they are
    read (one part and one shard in memory, whatever the job's size). Returns (folder, files written).

    A shard is created only if it does not exist (``IfNoneMatch``). Another run of the same intent
    may have written it, created the job and deleted the parts while this run was reading them:
    this run's shard would lack the deleted parts' lines, and the job reads its manifest only when
    it starts. Every run that writes a shard while all of its parts exist writes the same bytes."""
    settings, s3 = rt.settings, rt.s3
    shards = sharding.shards_for(intent.images, settings.instance_count, settings.min_images_per_shard,
                                 settings.max_images_per_shard)
    sizes = sharding.shard_sizes(intent.images, shards)
    files, buffer = 0, []

    def flush() -> None:
        nonlocal files, buffer
        key = layout.shard_key(intent.job, files, shards)
        if not create_once(s3, settings.bucket, key, "".join(ln + "\n" for ln in buffer).encode(),
                           MANIFEST_CONTENT_TYPE):
            logger.info("shard already written by another run of this intent: kept", extra={"shard": key})
        files, buffer = files + 1, []

    for part in intent.parts:
        for line in part_lines(s3, settings.bucket, part):
            buffer.append(line)
            if len(buffer) >= sizes[files] and files < shards - 1:
                flush()
    if buffer:
        flush()   # the last shard (it takes any lines beyond the parts' announced counts)
    return layout.job_input_prefix(intent.job, shards), files


def submit(rt: Runtime, name: str, prefix: str, files: int) -> bool:
    """CreateTransformJob over a written manifest folder of ``files`` shards; False if the job
    already existed."""
    settings = rt.settings
    instances = sharding.instances_for(files, settings.instance_count)
    try:
        rt.sagemaker.create_transform_job(**transform_request(settings, name, f"s3://{settings.bucket}/{prefix}",
                                                              instances))
    except ClientError as exc:
        if error_code(exc) == "ResourceInUse" or "already exists" in error_message(exc):
            return False
        raise
    logger.info("transform job created", extra={"job_name": name, "manifest": prefix, "shards": files,
                                                 "instance_count": instances})
    return True


def finish(rt: Runtime, intent: Intent) -> bool:
    """Bring an intent to its end: the job exists, its parts and the intent are gone. True if this
    call created the job."""
    s3, bucket = rt.s3, rt.settings.bucket
    created = False
    if not job_exists(rt.sagemaker, intent.job):
        prefix, files = write_shards(rt, intent)
        created = files > 0 and submit(rt, intent.job, prefix, files)   # no lines: every part went elsewhere
    for chunk in chunks([*intent.parts, layout.dispatch_key(intent.job)], 1000):
        errors = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk],
                                                          "Quiet": True}).get("Errors")
        if errors:   # a part left behind would be dispatched again (scored twice, collected once): say so
            raise RuntimeError(f"could not delete {len(errors)} dispatched part(s) of {intent.job}: {errors[:1]}")
    return created


def refused(rt: Runtime, intent: Intent, exc: ClientError, now: datetime) -> None:
    """A throttled or quota-refused create: the intent waits out a back-off; one log line names the
    quota to raise."""
    settings, code, message = rt.settings, error_code(exc), error_message(exc)
    attempts = intent.attempts + 1
    delay = batching.backoff_s(attempts, settings.throttle_backoff_s)
    put_json(rt.s3, settings.bucket, layout.dispatch_key(intent.job), asdict(replace(
        intent, attempts=attempts, retry_after=(now + timedelta(seconds=delay)).isoformat())))
    quota = batching.quota_name(settings.instance_type, code, message)
    logger.warning(f"CreateTransformJob refused ({code}); raise the SageMaker quota '{quota}' if this persists; "
                   f"its parts stay pending, retry in {delay}s",
                   extra={"error_code": code, "error_message": message, "quota_to_raise": quota,
                          "instance_type": settings.instance_type, "instance_count": settings.instance_count,
                          "job_name": intent.job, "images": intent.images, "parts": len(intent.parts),
                          "attempt": attempts, "retry_in_s": delay})


def due(intent: Intent, now: datetime) -> bool:
    return not intent.retry_after or datetime.fromisoformat(intent.retry_after) <= now


# --- the Lambda handler -----------------------------------------------------------------------

def handle(event: dict[str, Any], rt: Runtime) -> dict[str, int]:
    """One dispatcher run; returns its counts (also logged)."""
    settings, s3 = rt.settings, rt.s3
    now = results.utcnow()
    report = dict.fromkeys(("resumed", "jobs_created", "images_dispatched", "parts_waiting", "images_waiting",
                            "oldest_waiting_s", "refused", "quiet_release"), 0)
    started, last_quiet = dispatch_state(s3, settings.bucket)
    taken = {p for i in started for p in i.parts}

    def attempt(intent: Intent) -> bool:
        """False when SageMaker said "not now" (the run stops: the next creates would be refused too)."""
        try:
            if finish(rt, intent):
                report["jobs_created"] += 1
                report["images_dispatched"] += intent.images
        except ClientError as exc:
            if not batching.is_retryable_create_error(error_code(exc)):
                raise   # the function's Errors alarm; the intent is finished by the next run
            refused(rt, intent, exc, now)
            report["refused"] += 1
            return False
        return True

    for intent in started:
        if not due(intent, now):
            continue
        report["resumed"] += 1
        logger.warning("finishing the job of an earlier dispatcher run (it died, or its create was refused)",
                       extra={"job_name": intent.job, "images": intent.images, "parts": len(intent.parts),
                              "attempts": intent.attempts})
        if not attempt(intent):
            return _done(report)
    parts = [p for p in pending_parts(s3, settings.bucket) if p.key not in taken]
    # A drop has ended (no new part for QUIET_S): what is pending goes out now, not at the latency bound.
    release = batching.quiet(parts, now, quiet_s=settings.quiet_s, last_quiet=last_quiet,
                             spacing_s=settings.quiet_spacing_s)

    def plan(slots: int) -> list[list[batching.Part]]:
        return batching.plan_jobs(parts, now, min_images=settings.min_images_per_job,
                                  max_images=settings.max_images_per_job, max_latency_s=settings.max_latency_s,
                                  slots=slots, release=release)

    groups = plan(settings.max_concurrent_jobs)
    if groups:   # only then ask SageMaker how many run (a run that waits makes no SageMaker call)
        groups = plan(settings.max_concurrent_jobs - running_jobs(rt.sagemaker, settings.job_prefix))
    if groups and release:   # its time is the spacing's reference (QUIET_SPACING_S)
        s3.put_object(Bucket=settings.bucket, Key=layout.QUIET_RELEASE_KEY, Body=now.isoformat().encode())
        report["quiet_release"] = 1
    for group in groups:
        keys = tuple(p.key for p in group)
        intent = Intent(layout.job_name(settings.job_prefix, keys), keys, sum(p.images for p in group))
        put_json(s3, settings.bucket, layout.dispatch_key(intent.job), asdict(intent))   # before anything else
        if not attempt(intent):
            break
    dispatched = {k for g in groups for k in (p.key for p in g)}
    waiting = [p for p in parts if p.key not in dispatched]
    oldest = min((p.modified for p in waiting), default=now)
    report.update(parts_waiting=len(waiting), images_waiting=sum(p.images for p in waiting),
                  oldest_waiting_s=int((now - oldest).total_seconds()))
    return _done(report)


def _done(report: dict[str, int]) -> dict[str, int]:
    logger.info("dispatched", extra=report)
    return report


def publish(report: dict[str, int], stack: str) -> None:
    """The run's figures as CloudWatch metrics: what waits in pending/ and for how long (the
    PendingImagesTooOld alarm), refused and created jobs."""
    runtime.publish_metrics(metrics, stack, [("ImagesWaiting", report["images_waiting"], MetricUnit.Count),
                                             ("OldestWaitingSeconds", report["oldest_waiting_s"], MetricUnit.Seconds),
                                             ("JobsRefused", report["refused"], MetricUnit.Count),
                                             ("JobsCreated", report["jobs_created"], MetricUnit.Count)])


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any, rt: Runtime | None = None) -> dict[str, int]:
    rt = rt or runtime.default()
    report = handle(event, rt)
    publish(report, rt.settings.job_prefix)
    return report
