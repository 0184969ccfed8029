"""Exactly one outcome per upload on at-least-once delivery: claims written with S3 conditional writes.

S3 events, SQS and EventBridge all deliver *at least* once, and the enqueue Lambda may die
half-way through a batch. Every upload - ``(bucket, key, ETag)`` - must still end in exactly
one place: one prediction row or one failure row. The mechanism is a **claim**: one small
object per upload attempt under ``claims/``, created with ``PutObject(IfNoneMatch="*")``::

    claims/<sha256(bucket, key, etag, attempt)[:32]>.json  ->  {"job": <transform job name>, ...}

S3 creates the object only if no object of that key exists (HTTP 412 otherwise), atomically
and strongly consistent, so exactly one writer wins, however many duplicates race. **The claim
names the one transform job whose output counts for that upload**; everything else follows:

* enqueue skips uploads already claimed (duplicate S3 events, redelivered or regrouped SQS
  batches): no second job for them;
* enqueue writes a job's manifest *before* claiming its images and creates the job *after*:
  a claim always points at a manifest, so if the Lambda dies in between, the next delivery
  finds a claim whose job does not exist and submits that job from its manifest
  (:func:`admit`'s ``resubmit``) - nothing is lost and nothing runs twice;
* collect writes rows only for images whose claim names its job (:func:`settle` claims the
  ones nobody claimed yet), so even two jobs that raced on one image give one row, and a
  repeated EventBridge event rewrites the same deterministic files;
* a failed or stopped job re-queues its images with ``attempt + 1``: a fresh claim per
  attempt, so the retry is admitted once, however often the failure event repeats.

Why S3 conditional writes and not Powertools' idempotency utility (DynamoDB): the state that
needs protecting is "which job owns this image", and it has to be read by two functions
(enqueue, collect) and written once; Powertools' idempotency caches the *return value of a
function call* keyed on its input, with an in-progress lock that expires, and cannot express
"the job that owns this image" across functions. A conditional ``PutObject`` is the primitive
S3 offers for exactly this (create-if-absent), needs no second service, lives in the bucket the
user chose, works unchanged on the moto server, and expires with a lifecycle rule
(``ClaimRetentionDays`` in template.yaml: longer than SQS + DLQ retention, so no duplicate can
outlive its claim). It is not a lock: nothing waits, nothing is released; a claim is written
once and only read afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import ClientError

from dermscore import layout

WORKERS = 16                        # parallel claim requests (boto3 clients are thread-safe)
CONFLICT_RETRIES = 5                # S3 answers 409 ConditionalRequestConflict to simultaneous writers
PRECONDITION_FAILED = ("PreconditionFailed", "412")
CONFLICT = ("ConditionalRequestConflict", "409")
MISSING = ("NoSuchKey", "404", "NotFound")


def _get(item: Any, name: str, default: Any = None) -> Any:
    return item.get(name, default) if isinstance(item, Mapping) else getattr(item, name, default)


def identity(item: Any) -> tuple[str, str, str, int]:
    """(bucket, key, etag, attempt) of a manifest line (dict) or an enqueue ``Item``."""
    return (str(_get(item, "bucket", "")), str(_get(item, "key", "")), str(_get(item, "etag", "") or "").strip('"'),
            int(_get(item, "attempt", 0) or 0))


def claim_key(item: Any) -> str:
    bucket, key, etag, attempt = identity(item)
    return f"{layout.CLAIMS}{layout.content_digest(bucket, key, etag, str(attempt), length=32)}.json"


def _code(exc: ClientError) -> str:
    err = exc.response.get("Error", {})
    return str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def owner(s3, bucket: str, item: Any) -> str | None:
    """The job named by the upload's claim, or None if it has none."""
    try:
        body = s3.get_object(Bucket=bucket, Key=claim_key(item))["Body"].read()
    except ClientError as exc:
        if _code(exc) in MISSING:
            return None
        raise
    return json.loads(body)["job"]


def claim(s3, bucket: str, item: Any, job: str) -> str:
    """Claim the upload for ``job`` unless it is claimed already; returns the owning job."""
    img_bucket, key, etag, attempt = identity(item)
    body = json.dumps({"job": job, "bucket": img_bucket, "key": key, "etag": etag, "attempt": attempt},
                      ensure_ascii=False).encode()
    for i in range(CONFLICT_RETRIES):
        try:
            s3.put_object(Bucket=bucket, Key=claim_key(item), Body=body, IfNoneMatch="*",
                          ContentType="application/json")
            return job
        except ClientError as exc:
            code = _code(exc)
            if code in PRECONDITION_FAILED:
                break
            if code not in CONFLICT or i == CONFLICT_RETRIES - 1:
                raise
            time.sleep(0.05 * 2 ** i)
    found = owner(s3, bucket, item)
    if found is None:  # cannot happen with S3's guarantees; never guess an owner
        raise RuntimeError(f"claim {claim_key(item)} refused but not readable")
    return found


def _map(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    if len(items) <= 1:
        return [fn(it) for it in items]
    with ThreadPoolExecutor(min(WORKERS, len(items)), thread_name_prefix="claims") as pool:
        return list(pool.map(fn, items))


def owners(s3, bucket: str, items: Iterable[Any]) -> list[str | None]:
    return _map(lambda it: owner(s3, bucket, it), list(items))


def claim_all(s3, bucket: str, items: Iterable[Any], job: str) -> list[str]:
    """Claim every item for ``job``; returns each item's owner (another job where a duplicate won)."""
    return _map(lambda it: claim(s3, bucket, it, job), list(items))


def settle(s3, bucket: str, items: Iterable[Any], job: str) -> list[str]:
    """Owners of a finished job's images (collect): unclaimed images are claimed for ``job``."""
    items = list(items)
    found = owners(s3, bucket, items)
    missing = [i for i, o in enumerate(found) if o is None]
    for i, o in zip(missing, claim_all(s3, bucket, [items[i] for i in missing], job), strict=False):
        found[i] = o
    return found  # type: ignore[return-value]


def admit(s3, bucket: str, items: list[Any], job_exists: Callable[[str], bool],
          resubmit: Callable[[str], bool]) -> tuple[list[Any], dict[str, int]]:
    """Enqueue's filter: the items no job owns yet, after finishing jobs whose submitter died.

    An item claimed by a job that does not exist was claimed by an invocation that failed
    between claiming and CreateTransformJob; ``resubmit(job)`` submits that job again from its
    manifest (True if it could). Returns (items to submit, counts for the log).
    """
    found = owners(s3, bucket, items)
    resubmitted, lost = [], []
    for job in sorted({o for o in found if o}):
        if not job_exists(job):
            (resubmitted if resubmit(job) else lost).append(job)
    if lost:  # raise: the messages return to the queue, then the DLQ (alarm) - never dropped
        raise RuntimeError(f"images claimed by jobs that neither exist nor have a manifest: {lost}")
    fresh = [it for it, o in zip(items, found, strict=False) if o is None]
    return fresh, {"duplicates": len(items) - len(fresh), "resubmitted": len(resubmitted)}


def read_manifest(s3, bucket: str, job: str) -> list[dict[str, Any]]:
    """The manifest lines of ``job`` (every ``.jsonl`` under ``manifests/<job>``: one file or shards)."""
    lines: list[dict[str, Any]] = []
    prefix = f"{layout.MANIFESTS}{job}"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rest = obj["Key"][len(prefix):]
            if obj["Key"].endswith(".jsonl") and (rest == ".jsonl" or rest.startswith("/")):
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
                lines += [json.loads(ln) for ln in body.splitlines() if ln.strip()]
    return lines
