"""Lambda ``enqueue``: an SQS batch of S3 ObjectCreated events -> one manifest + one transform job.

Flow for one invocation::

    SQS records --record_handler--> Item (valid) | failure row (wrong prefix, empty, too large)
    valid items --manifest_text--> manifests/<job>.jsonl  (sorted, de-duplicated JSON Lines)
    job name = <JOB_PREFIX>-<digest of the manifest>  -> CreateTransformJob (once)
    failure rows -> results/failures/dt=<event date>/enqueue-<digest>.parquet

The job name and the failure file name derive from content only, so a redelivered batch
finds its job already there and overwrites the same failure file: no duplicate work or rows.
If submitting the job fails, the invocation raises and SQS redelivers the whole batch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from botocore.exceptions import ClientError

from dermscore import imaging, layout, results
from dermscore.config import Settings
from handlers.common import dt_of, s3_client, sagemaker_client, write_failures

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

    def line(self) -> str:
        return json.dumps({"bucket": self.bucket, "key": self.key, "etag": self.etag, "size": self.size},
                          ensure_ascii=False, sort_keys=True)


@dataclass
class Batch:
    """What the records of one invocation add up to."""

    items: list[Item] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    ignored: int = 0


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


def transform_request(settings: Settings, name: str, manifest_uri: str) -> dict[str, Any]:
    """The CreateTransformJob request for one manifest (issue 8 shards it across instances)."""
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
        "TransformResources": {"InstanceType": settings.instance_type, "InstanceCount": settings.instance_count},
    }


# --- record handling --------------------------------------------------------------------------

def _event_time(record: dict[str, Any]) -> datetime:
    raw = record.get("eventTime")
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")) if raw else results.utcnow()
    except ValueError:
        return results.utcnow()


def examine(s3, record: dict[str, Any]) -> tuple[Item | None, dict[str, Any] | None]:
    """One S3 event record -> a valid Item or a failure row (never both, never neither)."""
    bucket = record["s3"]["bucket"]["name"]
    obj = record["s3"]["object"]
    key = layout.decode_event_key(obj["key"])
    etag = str(obj.get("eTag") or obj.get("etag") or "").strip('"')
    when = _event_time(record)

    def fail(reason: str, detail: str) -> tuple[None, dict[str, Any]]:
        row = results.failure_row(bucket, key, etag, "enqueue", reason, detail, failed_at=when)
        row["_dt"] = dt_of(when)
        return None, row

    if not layout.is_incoming(key):
        return fail(imaging.WRONG_PREFIX, f"key is outside {layout.INCOMING}")
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return fail(imaging.READ_ERROR, "object no longer exists")
        raise  # transient: the record fails and SQS redelivers it
    etag = str(head.get("ETag", etag)).strip('"')
    size = int(head.get("ContentLength", obj.get("size", 0)))
    try:
        imaging.check_size(size)
    except imaging.ImageRejected as exc:
        return fail(exc.reason, exc.detail)
    return Item(bucket, key, etag, size), None


def make_record_handler(batch: Batch, s3):
    def record_handler(record: SQSRecord) -> None:
        records = s3_records(record.body)
        if not records:
            batch.ignored += 1
            return
        # A record contributes all its items or none: if it raises half-way it is redelivered,
        # and its first items must not be scored now *and* again then.
        outcomes = [examine(s3, r) for r in records]
        batch.items += [item for item, _ in outcomes if item]
        batch.failures += [failure for _, failure in outcomes if failure]

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
    text = manifest_text(items)
    name = job_name(settings.job_prefix, text)
    if job_exists(sm, name):
        logger.info("transform job already submitted", extra={"job_name": name})
        return name
    key = layout.manifest_key(name)
    s3.put_object(Bucket=settings.bucket, Key=key, Body=text.encode(), ContentType=MANIFEST_CONTENT_TYPE)
    try:
        sm.create_transform_job(**transform_request(settings, name, f"s3://{settings.bucket}/{key}"))
    except ClientError as exc:
        err = exc.response.get("Error", {})
        if err.get("Code") == "ResourceInUse" or "already exists" in str(err.get("Message", "")):
            logger.info("transform job already exists", extra={"job_name": name})
            return name
        raise
    logger.info("transform job created", extra={"job_name": name, "images": len(manifest_items(items)),
                                                 "manifest": key})
    return name


def write_enqueue_failures(s3, bucket: str, failures: list[dict[str, Any]]) -> list[str]:
    """Failure rows grouped by event date, one deterministic file per (date, content)."""
    by_dt: dict[str, list[dict[str, Any]]] = {}
    for f in failures:
        row = dict(f)
        by_dt.setdefault(row.pop("_dt", dt_of(row["failed_at"])), []).append(row)
    keys = []
    for dt, rows in sorted(by_dt.items()):
        unique = {(r["bucket"], r["image_key"], r["etag"], r["reason"]): r for r in rows}
        rows = [unique[k] for k in sorted(unique)]
        name = "enqueue-" + layout.content_digest(*("\t".join(k) for k in sorted(unique)))
        keys.append(write_failures(s3, bucket, dt, name, rows))
        logger.warning("images rejected before scoring", extra={"failures": len(rows), "dt": dt})
    return keys


# --- the Lambda handler -----------------------------------------------------------------------

@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    settings = Settings.from_env()
    s3 = s3_client()
    batch = Batch()
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    response = process_partial_response(event=event, record_handler=make_record_handler(batch, s3),
                                        processor=processor, context=context)
    write_enqueue_failures(s3, settings.bucket, batch.failures)
    submit(settings, batch.items, s3=s3)
    return response
