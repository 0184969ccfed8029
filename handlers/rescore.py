"""Lambda ``rescore``: images already under ``incoming/`` -> pending parts, scored by the model deployed now.

A model change should not mean uploading an archive again. A re-score feeds the stored objects to
the same dispatcher as new arrivals (``handlers.pending``: the same parts, sized, batched and
priced the same way), without copying an object; the deployed model scores them and collect adds
its outcomes beside the earlier models' (``handlers.claims``: one outcome per upload and model, so
re-scoring twice with one model adds nothing). Invoked with a request (``dermscore rescore``, or
``aws lambda invoke`` on AWS)::

    {"prefix": "incoming/2026/", "since": "2026-01-01", "until": "2026-06-30"}   objects under a prefix,
                                                                                optionally by upload date
    {"keys": ["incoming/a.jpg", ...]}                                           or named keys (at most MAX_KEYS)
    {"run": "<run id>"}                                                         continue or resume a run

A run walks its objects in key order, up to :data:`CHUNK_IMAGES` lines a step. Each step writes
one pending part (addressed by its content and the run's id: a step done twice rewrites the same
part, while another run's, or the first arrival's, equal lines make another part; if the first
was dispatched already, makes a duplicate that is scored twice and collected once), then the
run's record ``rescore/<run>.json`` with the step's last key as its cursor. A run that dies
(timeout, crash) resumes from its cursor; one that runs out of time hands itself on by invoking
its own function with ``{"run": ...}``, so an archive of millions of images passes through
functions of bounded memory and time. The record is the run's progress: images listed, queued and
skipped, the parts written; ``dermscore rescore --status`` adds the parts still pending.

What a re-score queues is what the listing shows now: an object deleted since it was listed ends
as a ``read_error`` failure row of that upload, one overwritten since as ``superseded``, as for new
arrivals; keys that enqueue refused (folder markers, unsafe keys, empty or too large objects)
already have their failure row and are skipped.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime
from typing import Any

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError

from dermscore import layout, results
from dermscore.aws import is_missing
from dermscore.messages import ManifestLine
from handlers import runtime
from handlers.pending import refusal, wake_dispatcher, write_part
from handlers.runtime import Runtime
from handlers.storage import put_json, read_json

logger = Logger(service="dermscore-rescore")

CHUNK_IMAGES = 5_000          # lines per pending part (one LIST page is 1,000 keys)
MAX_KEYS = 10_000             # keys named in one request (more: a prefix and dates)
HAND_ON_MS = 60_000           # a run with less time left than this invokes its function again


class BadRequest(ValueError):
    """A request that names no objects to re-score, or names them wrongly (a user's mistake)."""


@dataclass(frozen=True)
class Request:
    """Which stored objects to re-score: a prefix under ``incoming/`` (with upload dates), or keys."""

    prefix: str = layout.INCOMING
    since: str | None = None        # first upload date (YYYY-MM-DD, UTC), inclusive
    until: str | None = None        # last upload date, inclusive
    keys: tuple[str, ...] = ()

    @classmethod
    def of(cls, doc: dict[str, Any]) -> Request:
        keys = tuple(str(k) for k in doc.get("keys") or ())
        req = cls(str(doc.get("prefix") or layout.INCOMING), doc.get("since") or None, doc.get("until") or None,
                  tuple(sorted(set(keys))))
        if not req.prefix.startswith(layout.INCOMING):
            raise BadRequest(f"prefix {req.prefix!r} is not under {layout.INCOMING}")
        if len(req.keys) > MAX_KEYS:
            raise BadRequest(f"{len(req.keys)} keys named; at most {MAX_KEYS} (re-score a prefix instead)")
        outside = [k for k in req.keys if not k.startswith(layout.INCOMING)]
        if outside:
            raise BadRequest(f"{len(outside)} named key(s) not under {layout.INCOMING}, e.g. {outside[0]!r}")
        for name in ("since", "until"):
            value = getattr(req, name)
            try:
                value is None or date.fromisoformat(value)
            except (TypeError, ValueError):
                raise BadRequest(f"{name} {value!r} is not a date (YYYY-MM-DD)") from None
        if req.since and req.until and req.since > req.until:
            raise BadRequest(f"since {req.since} is after until {req.until}")
        return req

    def wants(self, key: str, modified: datetime | None) -> bool:
        """Is a listed object in the request (its key under the prefix, its upload date in range)?"""
        day = modified.date().isoformat() if modified else None
        return (key.startswith(self.prefix) and not (self.since and day and day < self.since)
                and not (self.until and day and day > self.until))


@dataclass
class Progress:
    """A run's record (``rescore/<run>.json``): where it is and what it has queued."""

    run: str
    request: dict[str, Any]
    cursor: str = ""                # the last key handled (prefix runs) or its index + 1 (key runs)
    done: bool = False
    listed: int = 0
    queued: int = 0
    skipped: dict[str, int] = field(default_factory=dict)   # reason code -> objects not queued
    parts: list[str] = field(default_factory=list)
    started: str = ""
    updated: str = ""

    @classmethod
    def of(cls, doc: dict[str, Any]) -> Progress:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in doc.items() if k in known})


def new_run_id(now: datetime | None = None) -> str:
    """A run's id: when it started (sortable) and a random suffix."""
    return f"{(now or results.utcnow()).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"


def line_or_reason(bucket: str, key: str, etag: str, size: int) -> tuple[ManifestLine | None, str | None]:
    """A stored object -> the manifest line that re-scores it, or why it is skipped (enqueue's checks:
    such an upload already has its failure row). ``ManifestLine`` drops the quotes that ListObjects
    and HeadObject put around ETags, as S3 events (and so every claim) have none."""
    refused = refusal(key, size)
    if refused:
        return None, refused[0]
    return ManifestLine(bucket, key, etag, size, rescore=True), None


def listed_objects(s3, bucket: str, req: Request, cursor: str, limit: int):
    """Up to ``limit`` objects of a prefix request after ``cursor``, in key order: (key, etag, size,
    modified) tuples, and the key to resume after (None once the prefix is exhausted)."""
    found: list[tuple[str, str, int, datetime | None]] = []
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": req.prefix}
    if cursor:
        kwargs["StartAfter"] = cursor
    while len(found) < limit:
        page = s3.list_objects_v2(**kwargs, MaxKeys=min(1000, limit - len(found)))
        found += [(o["Key"], o.get("ETag", ""), int(o.get("Size") or 0), o.get("LastModified"))
                  for o in page.get("Contents") or []]
        if not page.get("IsTruncated"):
            return found, None
        kwargs["StartAfter"] = found[-1][0] if found else kwargs.get("StartAfter", "")
    return found, found[-1][0]


def named_objects(s3, bucket: str, req: Request, cursor: str, limit: int):
    """The next ``limit`` named keys after index ``cursor`` (HeadObject each; a missing key is listed
    with no ETag), and the index to resume at (None at the end)."""
    start = int(cursor or 0)
    found = []
    for key in req.keys[start:start + limit]:
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
            found.append((key, head.get("ETag", ""), int(head.get("ContentLength") or 0), head.get("LastModified")))
        except ClientError as exc:
            if not is_missing(exc):
                raise
            found.append((key, "", 0, None))
    end = start + limit
    return found, (str(end) if end < len(req.keys) else None)


def step(rt: Runtime, progress: Progress, limit: int | None = None) -> Progress:
    """One chunk of the run (``limit`` objects, default :data:`CHUNK_IMAGES`): its objects -> one
    pending part, then the record with the new cursor."""
    req, bucket, limit = Request.of(progress.request), rt.settings.bucket, limit or CHUNK_IMAGES
    walk = named_objects if req.keys else listed_objects
    objects, cursor = walk(rt.s3, bucket, req, progress.cursor, limit)
    lines, skipped = [], dict(progress.skipped)
    for key, etag, size, modified in objects:
        if not req.keys and not req.wants(key, modified):
            continue
        line, reason = line_or_reason(bucket, key, etag, size) if etag else (None, "not_found")
        if line:
            lines.append(line)
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
    part = write_part(rt, lines, scope=progress.run)
    progress = replace(progress, cursor=cursor or progress.cursor, done=cursor is None,
                       listed=progress.listed + len(objects), queued=progress.queued + len(lines), skipped=skipped,
                       parts=[*progress.parts, part] if part else progress.parts,
                       updated=results.utcnow().isoformat())
    save(rt, progress)
    return progress


def save(rt: Runtime, progress: Progress) -> None:
    put_json(rt.s3, rt.settings.bucket, layout.rescore_key(progress.run), asdict(progress))


def load(rt: Runtime, run: str) -> Progress | None:
    doc = read_json(rt.s3, rt.settings.bucket, layout.rescore_key(run))
    return Progress.of(doc) if doc else None


def start(rt: Runtime, event: dict[str, Any]) -> Progress:
    """The run an event names (``run``: its record; else a new run of the event's request)."""
    run = str(event.get("run") or "")
    progress = load(rt, run) if run else None
    if progress is None:
        if run and not any(k in event for k in ("prefix", "keys", "since", "until")):
            raise BadRequest(f"no re-score run {run!r}")
        now = results.utcnow()
        req = Request.of(event)
        progress = Progress(run or new_run_id(now), {k: v for k, v in asdict(req).items() if v not in (None, ())},
                            started=now.isoformat(), updated=now.isoformat())
        save(rt, progress)
    return progress


def rescore(rt: Runtime, event: dict[str, Any], time_left_ms: Callable[[], int] = lambda: 10**9,
            limit: int | None = None) -> Progress:
    """Run (or resume) the event's re-score until it is done or its time runs low."""
    progress = start(rt, event)
    while not progress.done and time_left_ms() > HAND_ON_MS:
        progress = step(rt, progress, limit)
        if progress.parts:
            wake_dispatcher(rt)
    logger.info("re-score progress", extra={"run": progress.run, "done": progress.done, "listed": progress.listed,
                                           "queued": progress.queued, "skipped": progress.skipped,
                                           "parts": len(progress.parts)})
    return progress


def hand_on(rt: Runtime, context: Any, progress: Progress) -> bool:
    """Invoke this function again (asynchronously) for a run that ran out of time."""
    if progress.done or rt.lambda_ is None or not getattr(context, "function_name", ""):
        return False
    rt.lambda_.invoke(FunctionName=context.function_name, InvocationType="Event",
                      Payload=json.dumps({"run": progress.run}).encode())
    logger.info("re-score handed on", extra={"run": progress.run, "cursor": progress.cursor})
    return True


def handle(event: dict[str, Any], context: Any, rt: Runtime) -> dict[str, Any]:
    try:
        progress = rescore(rt, event, getattr(context, "get_remaining_time_in_millis", lambda: 10**9))
    except BadRequest as exc:
        logger.warning("re-score request refused", extra={"error": str(exc)})
        return {"error": str(exc)}
    hand_on(rt, context, progress)
    return asdict(progress)


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any, rt: Runtime | None = None) -> dict[str, Any]:
    return handle(event, context, rt or runtime.default())
