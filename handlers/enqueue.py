"""Lambda ``enqueue``: an SQS batch of S3 ObjectCreated events -> one manifest + one transform job.

Parse -> decide -> act::

    parse   every SQS message (Powertools BatchProcessor; typed SQSRecord / S3Event) -> an Arrival:
            its ManifestLines (valid uploads, or a collect Retry) and failure rows (wrong prefix,
            unsafe or too long key, folder marker, empty, too large: from the event alone, no
            request per image; superseded and deleted objects are found by the container's
            GetObject). Names
            decide nothing else: whether the bytes are an image is decided by content, in the
            container (unsupported_format / not_an_image rows). A message that raises is a batch item failure:
            SQS redelivers it alone.
    decide  dermscore.batching.decide: Submit, or GiveBack (a small, young batch accumulates)
    act     Submit: admit (claims/, handlers.claims: drop uploads a job owns) -> manifest shards
              manifests/<job>/<n>-shards/part-0000i-of-0000n.jsonl -> claims -> CreateTransformJob
            GiveBack, or a throttled/quota-refused create (dermscore.batching.after_refusal): the
              messages that added lines return to the queue with a visibility delay
    failure rows -> results/failures/dt=<event date>/enqueue-<digest of the upload>.parquet

The job name derives from content only, so a redelivered batch finds its job already there;
an upload in a regrouped batch or delivered twice finds its claim and is dropped; one failure
file per rejected upload is overwritten by a duplicate: no duplicate work or rows
(docs/reliability.md). If submitting the job fails otherwise, the invocation raises and SQS
redelivers the whole batch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType
from aws_lambda_powertools.utilities.data_classes import S3Event
from aws_lambda_powertools.utilities.data_classes.s3_event import S3EventRecord
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from botocore.exceptions import ClientError

from dermscore import batching, layout, reasons, results, sharding
from dermscore.aws import chunks, error_code, error_message
from dermscore.config import Settings
from dermscore.messages import ManifestLine, Retry
from handlers import claims, runtime
from handlers.runtime import Runtime
from handlers.storage import dt_of, read_manifest, write_failures

logger = Logger(service="dermscore-enqueue")

MAX_JOB_NAME = 63
DIGEST_LENGTH = 16
MANIFEST_CONTENT_TYPE = "application/jsonlines"


@dataclass(frozen=True)
class Arrival:
    """What one SQS message brought: lines to score and failure rows, never half of them."""

    record: SQSRecord
    lines: tuple[ManifestLine, ...] = ()
    failures: tuple[dict[str, Any], ...] = ()

    @property
    def receive_count(self) -> int:
        return int(self.record.attributes.get("ApproximateReceiveCount") or 1)

    @property
    def sent_ms(self) -> int | None:
        sent = str(self.record.attributes.get("SentTimestamp") or "")
        return int(sent) if sent.isdigit() else None


# --- pure functions -------------------------------------------------------------------------

def manifest_items(lines: list[ManifestLine]) -> list[ManifestLine]:
    """Sorted, de-duplicated by upload: the same images give the same manifest."""
    unique: dict[tuple[str, str, str], ManifestLine] = {}
    for ln in lines:
        unique.setdefault(ln.upload, ln)
    return sorted(unique.values())


def manifest_text(lines: list[ManifestLine]) -> str:
    return "".join(ln.to_json() + "\n" for ln in manifest_items(lines))


def job_name(prefix: str, manifest: str) -> str:
    """Deterministic, valid SageMaker name (^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}) for a manifest."""
    digest = layout.content_digest(manifest, length=DIGEST_LENGTH)
    clean = re.sub(r"[^a-zA-Z0-9-]", "-", prefix).strip("-")[: MAX_JOB_NAME - DIGEST_LENGTH - 1].rstrip("-")
    return f"{clean}-{digest}" if clean else digest


def s3_records(body: str) -> list[S3EventRecord]:
    """The ObjectCreated records carried by one SQS message body ([] for s3:TestEvent)."""
    payload = json.loads(body)
    if payload.get("Event") == "s3:TestEvent":
        return []
    return [r for r in S3Event(payload).records if r.event_name.startswith("ObjectCreated")]


def transform_request(settings: Settings, name: str, manifest_uri: str,
                      instance_count: int | None = None, tags: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The CreateTransformJob request for a job's input (a shard folder: S3Prefix semantics)."""
    extra: dict[str, Any] = {"Tags": tags} if tags else {}
    return {**extra,
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
        "TransformResources": {"InstanceType": settings.instance_type,
                               "InstanceCount": instance_count or settings.instance_count},
    }


def _event_time(raw: str | None) -> datetime:
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")) if raw else results.utcnow()
    except ValueError:
        return results.utcnow()


# --- parse: one SQS message -> an Arrival ------------------------------------------------------

def examine(record: S3EventRecord) -> tuple[ManifestLine | None, dict[str, Any] | None]:
    """One S3 event record -> a valid line or a failure row (never both), from the event alone.

    No request per image: the event carries the key, size and ETag. Whether the object still has
    that content is decided where it is read: the container's GetObject refuses another ETag
    (``superseded``) and a deleted object (``read_error``), at the transform stage; a duplicate
    event is dropped by its claim (:func:`admit`)."""
    obj = record.s3.get_object
    upload = ManifestLine(record.s3.bucket.name, layout.decode_event_key(obj.key), obj.get("eTag") or "",
                          int(obj.get("size") or 0))
    when = _event_time(record.event_time)

    def fail(reason: str, detail: str) -> tuple[None, dict[str, Any]]:
        return None, results.failure_row(upload, "enqueue", reason, detail, failed_at=when)

    if not upload.key.startswith(layout.INCOMING):
        return fail(reasons.WRONG_PREFIX, f"key is outside {layout.INCOMING}")
    problem = layout.key_problem(upload.key)
    if problem:
        return fail(*problem)
    try:
        reasons.check_size(upload.size)   # the event's size: zero_byte / too_large without a request
    except reasons.ImageRejected as exc:
        return fail(exc.reason, exc.detail)
    return upload, None


def arrival(record: SQSRecord) -> Arrival:
    """The Powertools record handler: all of a message's outcomes, or an exception (redelivered)."""
    retry = Retry.from_json(record.body)
    if retry is not None:   # a failed job's image, sent back by collect as its next attempt
        return Arrival(record, lines=(retry.line,))
    outcomes = [examine(r) for r in s3_records(record.body)]
    return Arrival(record, tuple(ln for ln, _ in outcomes if ln), tuple(f for _, f in outcomes if f))


def parse(event: dict[str, Any], context: Any, rt: Runtime) -> tuple[list[Arrival], list[dict[str, str]]]:
    """(arrivals, batch item failures of the messages that raised)."""
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    with processor(records=event.get("Records", []), handler=arrival, lambda_context=context):
        outcomes = processor.process()
    arrivals = [result for status, result, _ in outcomes if status == "success"]
    return arrivals, list(processor.response()["batchItemFailures"])


# --- act: submission ----------------------------------------------------------------------------

def job_exists(sm, name: str) -> bool:
    try:
        sm.describe_transform_job(TransformJobName=name)
        return True
    except ClientError as exc:
        if "Could not find" in error_message(exc) or error_code(exc) == "ResourceNotFound":
            return False
        raise


def submit(rt: Runtime, lines: list[ManifestLine]) -> str | None:
    """Write the manifest and start its transform job unless it already exists; returns the job name."""
    if not lines:
        return None
    settings = rt.settings
    unique = manifest_items(lines)
    name = job_name(settings.job_prefix, manifest_text(unique))
    if job_exists(rt.sagemaker, name):
        logger.info("transform job already submitted", extra={"job_name": name})
        return name
    shards = sharding.shard_count(len(unique), settings.instance_count, settings.min_images_per_shard)
    for i, part in enumerate(sharding.split(unique, shards)):
        rt.s3.put_object(Bucket=settings.bucket, Key=layout.shard_key(name, i, shards),
                         Body=manifest_text(part).encode(), ContentType=MANIFEST_CONTENT_TYPE)
    key = layout.job_input_prefix(name, shards)
    instances = sharding.instances_for(shards, settings.instance_count)
    # Manifest first, then the claims, then the job: a claim always names a job that exists or
    # can be submitted again from its manifest (handlers.claims).
    owners = claims.claim_all(rt.s3, settings.bucket, unique, name)
    if any(o != name for o in owners):
        logger.warning("uploads claimed by another job meanwhile; their rows come from that job",
                       extra={"job_name": name, "images": sum(o != name for o in owners)})
    try:
        # Tagged when every line is this job's: collect then needs no claim GET per image.
        rt.sagemaker.create_transform_job(**transform_request(settings, name, f"s3://{settings.bucket}/{key}",
                                                              instances, claims.all_claimed_tags(owners, name)))
    except ClientError as exc:
        if error_code(exc) == "ResourceInUse" or "already exists" in error_message(exc):
            logger.info("transform job already exists", extra={"job_name": name})
            return name
        raise
    logger.info("transform job created", extra={"job_name": name, "images": len(unique), "manifest": key,
                                                 "shards": shards, "instance_count": instances})
    return name


def admit(rt: Runtime, lines: list[ManifestLine]) -> list[ManifestLine]:
    """The lines no transform job owns yet (duplicates dropped); first re-submits any job whose
    images were claimed by an invocation that died before CreateTransformJob."""
    def resubmit(job: str) -> bool:
        manifest = read_manifest(rt.s3, rt.settings.bucket, job)
        if not manifest:
            return False
        again = submit(rt, manifest)
        logger.warning("re-submitted a job whose submitter died after claiming its images",
                       extra={"job_name": job, "images": len(manifest), "resubmitted_as": again})
        return again == job

    fresh, counts = claims.admit(rt.s3, rt.settings.bucket, lines, lambda job: job_exists(rt.sagemaker, job),
                                 resubmit)
    if counts["duplicates"]:
        logger.info("duplicate deliveries dropped: their uploads are owned by a job", extra=counts)
    return fresh


def write_enqueue_failures(s3, bucket: str, arrivals: list[Arrival]) -> list[str]:
    """One deterministic file per rejected upload (bucket, key, etag), in its event's date
    partition: a duplicate event in any later batch overwrites the same file, never adds a row."""
    keys = []
    for row in (f for a in arrivals for f in a.failures):
        name = "enqueue-" + layout.content_digest(row["bucket"], row["image_key"], row["etag"])
        keys.append(write_failures(s3, bucket, dt_of(row["failed_at"]), name, [row]))
    if keys:
        logger.warning("images rejected before scoring", extra={"failures": len(keys)})
    return sorted(set(keys))


# --- act: returning messages to the queue ---------------------------------------------------------

def queue_url_of(sqs, arn: str) -> str:
    """arn:aws:sqs:<region>:<account>:<name> -> the queue URL (GetQueueUrl: works on any endpoint)."""
    _, _, _, _, account, name = arn.split(":", 5)
    return sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]


def give_back(sqs, arrivals: list[Arrival], delay_s: int) -> list[dict[str, str]]:
    """Report the arrivals' messages as batch item failures, reappearing in ``delay_s``
    (ChangeMessageVisibility; best effort: a message not changed reappears after the queue's own
    visibility timeout instead, so nothing is lost either way)."""
    by_queue: dict[str, list[Arrival]] = {}
    for a in arrivals:
        by_queue.setdefault(a.record.event_source_arn, []).append(a)
    for arn, group in by_queue.items():
        try:
            url = queue_url_of(sqs, arn)
            for chunk in chunks(group):
                sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
                    {"Id": str(j), "ReceiptHandle": a.record.receipt_handle, "VisibilityTimeout": int(delay_s)}
                    for j, a in enumerate(chunk)])
        except (ClientError, ValueError) as exc:
            logger.warning("could not change message visibility; the queue's timeout applies",
                           extra={"queue_arn": arn, "error": str(exc)})
    return [{"itemIdentifier": a.record.message_id} for a in arrivals]


# --- the Lambda handler -----------------------------------------------------------------------

def handle(event: dict[str, Any], context: Any, rt: Runtime) -> dict[str, Any]:
    settings = rt.settings
    arrivals, failed = parse(event, context, rt)
    carrying = [a for a in arrivals if a.lines]          # the messages a job depends on
    lines = [ln for a in carrying for ln in a.lines]
    images = len(manifest_items(lines))
    sent = [a.sent_ms for a in carrying if a.sent_ms is not None]
    oldest_s = max(0.0, results.utcnow().timestamp() - min(sent) / 1000) if sent else 0.0
    receives = max((a.receive_count for a in carrying), default=1)
    # Failure rows of messages that go back to the queue are written when those are examined again.
    write_enqueue_failures(rt.s3, settings.bucket, [a for a in arrivals if not a.lines])

    decision = batching.decide(images, oldest_s, receives, min_images_per_job=settings.min_images_per_job,
                               max_job_wait_s=settings.max_job_wait_s, max_receive_count=settings.max_receive_count,
                               step_s=settings.throttle_backoff_s)
    if isinstance(decision, batching.Submit):
        try:
            submit(rt, admit(rt, lines))   # duplicates dropped
        except ClientError as exc:
            code, message = error_code(exc), error_message(exc)
            decision = batching.after_refusal(code, receives, settings.throttle_backoff_s)
            if decision is None:
                raise   # the whole batch is redelivered after the queue's visibility timeout
            quota = batching.quota_name(settings.instance_type, code, message)
            logger.warning(f"CreateTransformJob refused ({code}); raise the SageMaker quota '{quota}' if this "
                           f"persists; batch returned to the queue, retry in {decision.delay_s}s",
                           extra={"error_code": code, "error_message": message, "quota_to_raise": quota,
                                  "instance_type": settings.instance_type, "instance_count": settings.instance_count,
                                  "job_name": job_name(settings.job_prefix, manifest_text(lines)),
                                  "images": images, "messages": len(carrying), "receive_count": receives,
                                  "retry_in_s": decision.delay_s})
    if isinstance(decision, batching.GiveBack):
        if decision.why == "accumulate":
            logger.info("batch below MIN_IMAGES_PER_JOB returned to the queue to accumulate",
                        extra={"images": images, "min_images_per_job": settings.min_images_per_job,
                               "oldest_age_s": round(oldest_s, 1), "max_job_wait_s": settings.max_job_wait_s,
                               "retry_in_s": decision.delay_s, "messages": len(carrying)})
        return {"batchItemFailures": failed + give_back(rt.sqs, carrying, decision.delay_s)}
    write_enqueue_failures(rt.s3, settings.bucket, carrying)
    return {"batchItemFailures": failed}


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any, rt: Runtime | None = None) -> dict[str, Any]:
    return handle(event, context, rt or runtime.default())
