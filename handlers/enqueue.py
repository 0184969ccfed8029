"""Lambda ``enqueue``: an SQS batch of S3 ObjectCreated events -> one manifest + one transform job.

Flow for one invocation::

    SQS records --record_handler--> Item (valid) | failure row (wrong prefix, empty, too large,
                                                    superseded)
    valid items --admit--> the items no job owns yet (claims/, handlers.claims)
    those --manifest_text--> sorted, de-duplicated JSON Lines
    job name = <JOB_PREFIX>-<digest of the manifest>
    manifest --sharding.split--> manifests/<job>/<n>-shards/part-0000i-of-0000n.jsonl
      n = one shard per instance (TRANSFORM_INSTANCE_COUNT), none below MIN_IMAGES_PER_SHARD
    claims/<upload> -> <job>  for every manifest line (S3 conditional write), then
    CreateTransformJob (once): S3Prefix over the shard folder, InstanceCount = min(count, n)
    failure rows -> results/failures/dt=<event date>/enqueue-<digest of the upload>.parquet

The job name derives from content only, so a redelivered batch finds its job already there;
an upload in a regrouped batch or delivered twice finds its claim and is dropped; one failure
file per rejected upload is overwritten by a duplicate: no duplicate work or rows
(docs/reliability.md).
If submitting the job fails, the invocation raises and SQS redelivers the whole batch; if
CreateTransformJob is throttled or refused for a quota, the batch's messages go back to the
queue with an exponential back-off (partial batch failure + ChangeMessageVisibility) and a
log line names the quota to raise. A batch smaller than MIN_IMAGES_PER_JOB whose oldest
image is younger than MAX_JOB_WAIT_S goes back the same way to accumulate (docs/scaling.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from botocore.exceptions import ClientError

from dermscore import layout, reasons, results, sharding
from dermscore.config import Settings
from handlers import claims
from handlers.storage import dt_of, s3_client, sagemaker_client, sqs_client, write_failures

logger = Logger(service="dermscore-enqueue")

MAX_JOB_NAME = 63
DIGEST_LENGTH = 16
MANIFEST_CONTENT_TYPE = "application/jsonlines"


@dataclass(frozen=True, order=True)
class Item:
    """One image to score: a manifest line."""

    bucket: str
    key: str
    etag: str
    size: int
    attempt: int = 0   # > 0: re-queued after its transform job failed (handlers.collect.requeue)

    def line(self) -> str:
        fields = {"bucket": self.bucket, "key": self.key, "etag": self.etag, "size": self.size}
        if self.attempt:
            fields["attempt"] = self.attempt
        return json.dumps(fields, ensure_ascii=False, sort_keys=True)


@dataclass
class Batch:
    """What the records of one invocation add up to."""

    items: list[Item] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    ignored: int = 0
    item_messages: dict[str, int] = field(default_factory=dict)  # message id -> items it added


# --- pure functions -------------------------------------------------------------------------

def manifest_items(items: list[Item]) -> list[Item]:
    """Sorted, de-duplicated by (bucket, key, etag): the same images give the same manifest."""
    unique: dict[tuple[str, str, str], Item] = {}
    for it in items:
        unique.setdefault((it.bucket, it.key, it.etag), it)
    return sorted(unique.values())


def manifest_text(items: list[Item]) -> str:
    return "".join(it.line() + "\n" for it in manifest_items(items))


def job_name(prefix: str, manifest: str) -> str:
    """Deterministic, valid SageMaker name (^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}) for a manifest."""
    digest = layout.content_digest(manifest, length=DIGEST_LENGTH)
    clean = re.sub(r"[^a-zA-Z0-9-]", "-", prefix).strip("-")[: MAX_JOB_NAME - DIGEST_LENGTH - 1].rstrip("-")
    return f"{clean}-{digest}" if clean else digest


def s3_records(body: str) -> list[dict[str, Any]]:
    """The S3 event records carried by one SQS message body ([] for s3:TestEvent)."""
    payload = json.loads(body)
    if payload.get("Event") == "s3:TestEvent":
        return []
    return [r for r in payload.get("Records", []) if str(r.get("eventName", "")).startswith("ObjectCreated")]


def transform_request(settings: Settings, name: str, manifest_uri: str,
                      instance_count: int | None = None) -> dict[str, Any]:
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
        "TransformResources": {"InstanceType": settings.instance_type,
                               "InstanceCount": instance_count or settings.instance_count},
    }


# --- record handling --------------------------------------------------------------------------

def _event_time(record: dict[str, Any]) -> datetime:
    raw = record.get("eventTime")
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")) if raw else results.utcnow()
    except ValueError:
        return results.utcnow()


def examine(s3, record: dict[str, Any]) -> tuple[Item | None, dict[str, Any] | None]:
    """One S3 event record -> a valid Item or a failure row (never both; neither only for a
    duplicate event of a deleted upload that a job already owns)."""
    bucket = record["s3"]["bucket"]["name"]
    obj = record["s3"]["object"]
    key = layout.decode_event_key(obj["key"])
    etag = str(obj.get("eTag") or obj.get("etag") or "").strip('"')
    attempt = int((record.get("dermscore") or {}).get("attempt", 0) or 0)  # re-queued by collect
    when = _event_time(record)

    def fail(reason: str, detail: str) -> tuple[None, dict[str, Any]]:
        row = results.failure_row(bucket, key, etag, "enqueue", reason, detail, failed_at=when)
        row["_dt"] = dt_of(when)
        return None, row

    if not layout.is_incoming(key):
        return fail(reasons.WRONG_PREFIX, f"key is outside {layout.INCOMING}")
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            if etag and claims.owner(s3, bucket, Item(bucket, key, etag, 0, attempt)):
                return None, None  # a late duplicate: its job owns the outcome
            return fail(reasons.READ_ERROR, "object no longer exists")
        raise  # transient: the record fails and SQS redelivers it
    current = str(head.get("ETag", "")).strip('"')
    if etag and current and etag != current:
        # The key was uploaded again since this event: that upload has its own event (and row).
        return fail(reasons.SUPERSEDED, f"uploaded again (etag {current}) before this upload was scored")
    etag = current or etag
    size = int(head.get("ContentLength", obj.get("size", 0)))
    try:
        reasons.check_size(size)
    except reasons.ImageRejected as exc:
        return fail(exc.reason, exc.detail)
    return Item(bucket, key, etag, size, attempt), None


def make_record_handler(batch: Batch, s3):
    def record_handler(record: SQSRecord) -> None:
        records = s3_records(record.body)
        if not records:
            batch.ignored += 1
            return
        # A record contributes all its items or none: if it raises half-way it is redelivered,
        # and its first items must not be scored now *and* again then.
        outcomes = [examine(s3, r) for r in records]
        items = [item for item, _ in outcomes if item]
        batch.items += items
        batch.failures += [{**failure, "_message": record.message_id} for _, failure in outcomes if failure]
        if items:
            batch.item_messages[record.message_id] = len(items)

    return record_handler


# --- submission -------------------------------------------------------------------------------

def job_exists(sm, name: str) -> bool:
    try:
        sm.describe_transform_job(TransformJobName=name)
        return True
    except ClientError as exc:
        msg = str(exc.response.get("Error", {}).get("Message", ""))
        if "Could not find" in msg or exc.response.get("Error", {}).get("Code") == "ResourceNotFound":
            return False
        raise


def submit(settings: Settings, items: list[Item], s3=None, sm=None) -> str | None:
    """Write the manifest and start its transform job unless it already exists; returns the job name."""
    if not items:
        return None
    s3 = s3 or s3_client()
    sm = sm or sagemaker_client()
    unique = manifest_items(items)
    name = job_name(settings.job_prefix, manifest_text(unique))
    if job_exists(sm, name):
        logger.info("transform job already submitted", extra={"job_name": name})
        return name
    shards = sharding.shard_count(len(unique), settings.instance_count, settings.min_images_per_shard)
    for i, part in enumerate(sharding.split(unique, shards)):
        s3.put_object(Bucket=settings.bucket, Key=layout.shard_key(name, i, shards),
                      Body=manifest_text(part).encode(), ContentType=MANIFEST_CONTENT_TYPE)
    key = layout.job_input_prefix(name, shards)
    instances = sharding.instances_for(shards, settings.instance_count)
    # Manifest first, then the claims, then the job: a claim always names a job that exists or
    # can be submitted again from its manifest (handlers.claims).
    claim_manifest(settings, s3, unique, name)
    try:
        sm.create_transform_job(**transform_request(settings, name, f"s3://{settings.bucket}/{key}", instances))
    except ClientError as exc:
        err = exc.response.get("Error", {})
        if err.get("Code") == "ResourceInUse" or "already exists" in str(err.get("Message", "")):
            logger.info("transform job already exists", extra={"job_name": name})
            return name
        raise
    logger.info("transform job created", extra={"job_name": name, "images": len(unique), "manifest": key,
                                                 "shards": shards, "instance_count": instances})
    return name


def claim_manifest(settings: Settings, s3, items: list[Item], name: str) -> None:
    """Claim the manifest's uploads for job ``name`` (a duplicate that raced us keeps its owner;
    collect then writes its row from that owner only)."""
    owners = claims.claim_all(s3, settings.bucket, items, name)
    lost = sum(1 for o in owners if o != name)
    if lost:
        logger.warning("uploads claimed by another job meanwhile; their rows come from that job",
                       extra={"job_name": name, "images": lost})


def admit(settings: Settings, items: list[Item], s3, sm) -> list[Item]:
    """The items no transform job owns yet (duplicates dropped); first re-submits any job whose
    images were claimed by an invocation that died before CreateTransformJob."""
    def resubmit(job: str) -> bool:
        lines = claims.read_manifest(s3, settings.bucket, job)
        if not lines:
            return False
        again = submit(settings, [Item(ln["bucket"], ln["key"], ln["etag"], int(ln.get("size", 0)),
                                       int(ln.get("attempt", 0))) for ln in lines], s3=s3, sm=sm)
        logger.warning("re-submitted a job whose submitter died after claiming its images",
                       extra={"job_name": job, "images": len(lines), "resubmitted_as": again})
        return again == job

    fresh, counts = claims.admit(s3, settings.bucket, items, lambda job: job_exists(sm, job), resubmit)
    if counts["duplicates"]:
        logger.info("duplicate deliveries dropped: their uploads are owned by a job", extra=counts)
    return fresh


def write_enqueue_failures(s3, bucket: str, failures: list[dict[str, Any]]) -> list[str]:
    """One deterministic file per rejected upload (bucket, key, etag), in its event's date
    partition: a duplicate event in any later batch overwrites the same file, never adds a row."""
    keys = []
    for f in failures:
        row = dict(f)
        row.pop("_message", None)
        dt = row.pop("_dt", dt_of(row["failed_at"]))
        name = "enqueue-" + layout.content_digest(row["bucket"], row["image_key"], row["etag"])
        keys.append(write_failures(s3, bucket, dt, name, [row]))
    if failures:
        logger.warning("images rejected before scoring", extra={"failures": len(failures)})
    return sorted(set(keys))


# --- returning a batch to the queue (quota, throttling, batching policy) ------------------------

def _records_of(event: dict[str, Any], message_ids: set[str]) -> list[dict[str, Any]]:
    return [r for r in event.get("Records", []) if r.get("messageId") in message_ids]


def _receive_count(record: dict[str, Any]) -> int:
    return int((record.get("attributes") or {}).get("ApproximateReceiveCount", 1) or 1)


def _oldest_age_s(records: list[dict[str, Any]], now_ms: float) -> float:
    sent = [int(r["attributes"]["SentTimestamp"]) for r in records
            if str((r.get("attributes") or {}).get("SentTimestamp", "")).isdigit()]
    return max(0.0, (now_ms - min(sent)) / 1000) if sent else 0.0


def queue_url_of(sqs, arn: str) -> str:
    """arn:aws:sqs:<region>:<account>:<name> -> the queue URL (GetQueueUrl: works on any endpoint)."""
    _, _, _, _, account, name = arn.split(":", 5)
    return sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]


def delay_records(records: list[dict[str, Any]], delay_s: int, sqs=None) -> int:
    """Make the records' messages reappear in ``delay_s`` (ChangeMessageVisibility); returns how
    many were changed. Best effort: a message not changed reappears after the queue's own
    visibility timeout instead, so nothing is lost either way."""
    if not records:
        return 0
    sqs = sqs or sqs_client()
    changed = 0
    by_queue: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_queue.setdefault(r.get("eventSourceARN", ""), []).append(r)
    for arn, group in by_queue.items():
        try:
            url = queue_url_of(sqs, arn)
            for i in range(0, len(group), 10):
                chunk = group[i:i + 10]
                resp = sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
                    {"Id": str(j), "ReceiptHandle": r["receiptHandle"], "VisibilityTimeout": int(delay_s)}
                    for j, r in enumerate(chunk)])
                changed += len(resp.get("Successful", []))
        except (ClientError, ValueError) as exc:
            logger.warning("could not change message visibility; the queue's timeout applies",
                           extra={"queue_arn": arn, "error": str(exc)})
    return changed


def give_back(response: dict[str, Any], event: dict[str, Any], batch: Batch, delay_s: int) -> dict[str, Any]:
    """Report every message that added images as a batch item failure, delayed by ``delay_s``."""
    returned = set(batch.item_messages)
    delay_records(_records_of(event, returned), delay_s)
    failures = list(response.get("batchItemFailures", []))
    known = {f["itemIdentifier"] for f in failures}
    failures += [{"itemIdentifier": m} for m in sorted(returned - known)]
    return {**response, "batchItemFailures": failures}


def _failures_not_returned(batch: Batch) -> list[dict[str, Any]]:
    """Failure rows of messages that stay consumed (returned ones are examined again later)."""
    return [f for f in batch.failures if f.get("_message") not in batch.item_messages]


# --- the Lambda handler -----------------------------------------------------------------------

@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    settings = Settings.from_env()
    s3 = s3_client()
    batch = Batch()
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    response = process_partial_response(event=event, record_handler=make_record_handler(batch, s3),
                                        processor=processor, context=context)
    images = len(manifest_items(batch.items))
    records = _records_of(event, set(batch.item_messages))

    # Batching policy: a small, young batch waits for more images (bounded by age and receives).
    oldest = _oldest_age_s(records, results.utcnow().timestamp() * 1000)
    if sharding.should_defer(images, oldest, max((_receive_count(r) for r in records), default=1),
                             min_images_per_job=settings.min_images_per_job, max_job_wait_s=settings.max_job_wait_s,
                             max_receive_count=settings.max_receive_count):
        delay = sharding.defer_delay_s(oldest, settings.max_job_wait_s, step_s=settings.throttle_backoff_s)
        write_enqueue_failures(s3, settings.bucket, _failures_not_returned(batch))
        logger.info("batch below MIN_IMAGES_PER_JOB returned to the queue to accumulate",
                    extra={"images": images, "min_images_per_job": settings.min_images_per_job,
                           "oldest_age_s": round(oldest, 1), "max_job_wait_s": settings.max_job_wait_s,
                           "retry_in_s": delay, "messages": len(records)})
        return give_back(response, event, batch, delay)

    try:
        write_enqueue_failures(s3, settings.bucket, _failures_not_returned(batch))
        sm = sagemaker_client()
        submit(settings, admit(settings, batch.items, s3, sm), s3=s3, sm=sm)   # duplicates dropped
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code, message = str(err.get("Code", "")), str(err.get("Message", ""))
        if not sharding.is_retryable_create_error(code):
            raise   # the whole batch is redelivered after the queue's visibility timeout
        count = max((_receive_count(r) for r in records), default=1)
        delay = sharding.backoff_s(count, settings.throttle_backoff_s)
        quota = sharding.quota_name(settings.instance_type, code, message)
        logger.warning(f"CreateTransformJob refused ({code}); raise the SageMaker quota '{quota}' if this "
                       f"persists; batch returned to the queue, retry in {delay}s",
                       extra={"error_code": code, "error_message": message, "quota_to_raise": quota,
                              "instance_type": settings.instance_type, "instance_count": settings.instance_count,
                              "job_name": job_name(settings.job_prefix, manifest_text(batch.items)),
                              "images": images, "messages": len(records), "receive_count": count,
                              "retry_in_s": delay})
        return give_back(response, event, batch, delay)
    # Failure rows of returned messages are written when they are examined again.
    write_enqueue_failures(s3, settings.bucket,
                           [f for f in batch.failures if f.get("_message") in batch.item_messages])
    return response
