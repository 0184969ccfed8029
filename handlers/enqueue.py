"""Lambda ``enqueue``: an SQS batch of S3 ObjectCreated events -> one pending manifest part.

Arrival, the first of two steps (the dispatcher, ``handlers.dispatch``, is the second)::

    parse   every SQS message (Powertools BatchProcessor; typed SQSRecord / S3Event) -> an Arrival:
            its ManifestLines (valid uploads, or a collect Retry) and failure rows (wrong prefix,
            unsafe or too long key, folder marker, empty, too large: from the event alone, no
            request per image; superseded and deleted objects are found by the container's
            GetObject). Names decide nothing else: whether the bytes are an image is decided by
            content, in the container (unsupported_format / not_an_image rows). A message that
            raises is a batch item failure: SQS redelivers it alone.
    act     the batch's lines, sorted and de-duplicated -> pending/<digest>-<lines>.jsonl (one PUT)
            failure rows -> results/failures/dt=<event date>/enqueue-<digest of the upload>.parquet,
                            each once its upload's claim rejected/<digest>.json is this event's
            the pending volume (one LIST) reached MIN_IMAGES_PER_JOB -> wake the dispatcher

The part's name derives from its content only, so a redelivered batch rewrites the same object;
an upload delivered twice in two batches lands in two parts, and collect keeps one outcome
(``handlers.claims``); one failure file per rejected upload is overwritten by a duplicate. If a
write fails the invocation raises and SQS redelivers the whole batch (docs/reliability.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType
from aws_lambda_powertools.utilities.data_classes import S3Event
from aws_lambda_powertools.utilities.data_classes.s3_event import S3EventRecord
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from dermscore import layout, reasons, results
from dermscore.messages import ManifestLine, Retry
from handlers import claims, runtime
from handlers.pending import refusal, wake_dispatcher, write_part
from handlers.runtime import Runtime
from handlers.storage import dt_of, write_failures

logger = Logger(service="dermscore-enqueue")


@dataclass(frozen=True)
class Arrival:
    """What one SQS message brought: lines to score and failure rows, never half of them."""

    record: SQSRecord
    lines: tuple[ManifestLine, ...] = ()
    failures: tuple[dict[str, Any], ...] = ()


# --- pure functions -------------------------------------------------------------------------

def s3_records(body: str) -> list[S3EventRecord]:
    """The ObjectCreated records carried by one SQS message body ([] for s3:TestEvent)."""
    payload = json.loads(body)
    if payload.get("Event") == "s3:TestEvent":
        return []
    return [r for r in S3Event(payload).records if r.event_name.startswith("ObjectCreated")]


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
    event is scored twice at most and collected once (``handlers.claims``)."""
    obj = record.s3.get_object
    upload = ManifestLine(record.s3.bucket.name, layout.decode_event_key(obj.key), obj.get("eTag") or "",
                          int(obj.get("size") or 0), sequencer=str(obj.get("sequencer") or ""))
    when = _event_time(record.event_time)

    refused = refusal(upload.key, upload.size)   # the event's size: zero_byte / too_large without a request
    if refused:
        return None, results.failure_row(upload, reasons.ENQUEUE, *refused, failed_at=when)
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


# --- act ------------------------------------------------------------------------------------------

def write_enqueue_failures(s3, bucket: str, arrivals: list[Arrival]) -> list[str]:
    """One deterministic file per rejected upload (bucket, key, etag), in its event's date
    partition, once its claim (``layout.rejected_key``) is this event's: a redelivered event
    rewrites the same file; the same content uploaded again to the key (another event, another
    date) is the same upload, as on the scoring path, and adds no row."""
    keys, again = [], 0
    for row in (f for a in arrivals for f in a.failures):
        upload = (row["bucket"], row["image_key"], row["etag"])
        claim = {"image_key": row["image_key"], "etag": row["etag"], "owner": row["failed_at"].isoformat()}
        if not claims.claim_once(s3, bucket, layout.rejected_key(*upload), claim):
            again += 1
            continue
        keys.append(write_failures(s3, bucket, dt_of(row["failed_at"]), "enqueue-" + layout.content_digest(*upload),
                                   [row]))
    if keys or again:
        logger.warning("images rejected before scoring", extra={"failures": len(keys), "rejected_before": again})
    return sorted(set(keys))


# --- the Lambda handler -----------------------------------------------------------------------

def handle(event: dict[str, Any], context: Any, rt: Runtime) -> dict[str, Any]:
    arrivals, failed = parse(event, context, rt)
    part = write_part(rt, [ln for a in arrivals for ln in a.lines])
    write_enqueue_failures(rt.s3, rt.settings.bucket, arrivals)
    if part:
        wake_dispatcher(rt)
    return {"batchItemFailures": failed}


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any, rt: Runtime | None = None) -> dict[str, Any]:
    return handle(event, context, rt or runtime.default())
