"""Exactly one outcome per upload on at-least-once delivery: claims written with S3 conditional writes.

S3 events, SQS and EventBridge all deliver *at least* once, and the enqueue Lambda may die
half-way through a batch. Every upload - ``(bucket, key, ETag)`` - must still end in exactly
one place: one prediction row or one failure row. The mechanism is a **claim**: one small
object per upload attempt under ``claims/``, created with ``PutObject(IfNoneMatch="*")``::

    claims/<sha256(bucket, key, etag, attempt)[:32]>.json  ->  {"job": <transform job name>, ...}

(the key is :attr:`dermscore.messages.ManifestLine.claim_key`)

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
  repeated EventBridge event rewrites the same deterministic files; a job that enqueue saw
  claimed line by line for itself is tagged (:data:`ALL_CLAIMED_TAG`) and collect reads none;
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
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from botocore.exceptions import ClientError

from dermscore.aws import error_code, is_missing
from dermscore.messages import ManifestLine

T = TypeVar("T")

WORKERS = 16                        # parallel claim requests (boto3 clients are thread-safe)
CONFLICT_RETRIES = 5                # S3 answers 409 ConditionalRequestConflict to simultaneous writers
PRECONDITION_FAILED = ("PreconditionFailed", "412")
CONFLICT = ("ConditionalRequestConflict", "409")


def owner(s3, bucket: str, line: ManifestLine) -> str | None:
    """The job named by the upload's claim, or None if it has none."""
    try:
        body = s3.get_object(Bucket=bucket, Key=line.claim_key)["Body"].read()
    except ClientError as exc:
        if is_missing(exc):
            return None
        raise
    return json.loads(body)["job"]


def claim(s3, bucket: str, line: ManifestLine, job: str) -> str:
    """Claim the upload for ``job`` unless it is claimed already; returns the owning job."""
    img_bucket, key, etag, attempt = line.identity
    body = json.dumps({"job": job, "bucket": img_bucket, "key": key, "etag": etag, "attempt": attempt},
                      ensure_ascii=False).encode()
    for i in range(CONFLICT_RETRIES):
        try:
            s3.put_object(Bucket=bucket, Key=line.claim_key, Body=body, IfNoneMatch="*",
                          ContentType="application/json")
            return job
        except ClientError as exc:
            code = error_code(exc)
            if code in PRECONDITION_FAILED:
                break
            if code not in CONFLICT or i == CONFLICT_RETRIES - 1:
                raise
            time.sleep(0.05 * 2 ** i)
    found = owner(s3, bucket, line)
    if found is None:  # cannot happen with S3's guarantees; never guess an owner
        raise RuntimeError(f"claim {line.claim_key} refused but not readable")
    return found


def _map(fn: Callable[[ManifestLine], T], lines: list[ManifestLine]) -> list[T]:
    if len(lines) <= 1:
        return [fn(ln) for ln in lines]
    with ThreadPoolExecutor(min(WORKERS, len(lines)), thread_name_prefix="claims") as pool:
        return list(pool.map(fn, lines))


def owners(s3, bucket: str, lines: Iterable[ManifestLine]) -> list[str | None]:
    return _map(lambda ln: owner(s3, bucket, ln), list(lines))


def claim_all(s3, bucket: str, lines: Iterable[ManifestLine], job: str) -> list[str]:
    """Claim every line for ``job``; returns each line's owner (another job where a duplicate won)."""
    return _map(lambda ln: claim(s3, bucket, ln, job), list(lines))


# The transform job tag by which enqueue records that it saw *every* line of the job's manifest
# claimed for that job. Claims are written once and never change (create-if-absent, expired only
# by the lifecycle rule, long after the job), so collect can then take the owners as known.
ALL_CLAIMED_TAG = "dermscore:claims"
ALL_CLAIMED = "all"


def all_claimed_tags(owners_seen: list[str], job: str) -> list[dict[str, str]]:
    """CreateTransformJob ``Tags`` for a job whose claims ``owners_seen`` (one per manifest line)."""
    return [{"Key": ALL_CLAIMED_TAG, "Value": ALL_CLAIMED}] if owners_seen and all(
        o == job for o in owners_seen) else []


def settle(s3, bucket: str, lines: Iterable[ManifestLine], job: str, all_claimed: bool = False) -> list[str]:
    """Owners of a finished job's images (collect): unclaimed images are claimed for ``job``.

    ``all_claimed``: the job carries :data:`ALL_CLAIMED_TAG` (its submitter saw every line claimed
    for it): every owner is ``job``, no request. Without the tag (a race with another job, a job
    from an older version, an event without tags) each claim is read, as before."""
    lines = list(lines)
    if all_claimed:
        return [job] * len(lines)
    found: list[Any] = owners(s3, bucket, lines)
    missing = [i for i, o in enumerate(found) if o is None]
    for i, o in zip(missing, claim_all(s3, bucket, [lines[i] for i in missing], job), strict=True):
        found[i] = o
    return found


def admit(s3, bucket: str, lines: list[ManifestLine], job_exists: Callable[[str], bool],
          resubmit: Callable[[str], bool]) -> tuple[list[ManifestLine], dict[str, int]]:
    """Enqueue's filter: the lines no job owns yet, after finishing jobs whose submitter died.

    A line claimed by a job that does not exist was claimed by an invocation that failed
    between claiming and CreateTransformJob; ``resubmit(job)`` submits that job again from its
    manifest (True if it could). Returns (lines to submit, counts for the log).
    """
    found = owners(s3, bucket, lines)
    resubmitted, lost = [], []
    for job in sorted({o for o in found if o}):
        if not job_exists(job):
            (resubmitted if resubmit(job) else lost).append(job)
    if lost:  # raise: the messages return to the queue, then the DLQ (alarm) - never dropped
        raise RuntimeError(f"images claimed by jobs that neither exist nor have a manifest: {lost}")
    fresh = [ln for ln, o in zip(lines, found, strict=True) if o is None]
    return fresh, {"duplicates": len(lines) - len(fresh), "resubmitted": len(resubmitted)}
