"""Exactly one outcome per upload on at-least-once delivery: the image's JSON document is its claim.

S3 events, SQS and EventBridge all deliver *at least* once, enqueue and the dispatcher may die
half-way, and two jobs may carry the same upload (a duplicate event that arrived after the first
was dispatched). Every upload - ``(bucket, key, ETag)`` - must still end in exactly one place:
one prediction row or one failure row. Nothing is decided before scoring (no request per image
on the way in); the decision is taken where the outcome is written, by the one object collect
writes for every image anyway, its JSON document::

    results/images/<key without incoming/>.json  ->  {..., "etag": ..., "owner": "<job>/<file>#<line>",
                                                      "uploads": [{"etag", "owner"}, ...]}

The **owner** is the one manifest line (job, input file, line number) whose outcome counts for
that upload. Collect writes the document with ``PutObject(IfNoneMatch="*")``: S3 creates it only
if no object of that key exists (HTTP 412 otherwise), atomically and strongly consistent, so
exactly one writer wins however many race. A writer that loses reads the document:

* the same upload (its ETag, or one of the earlier ``uploads`` of the key): the owner recorded
  there decides. A repeated event of the same job finds itself and rewrites the same rows; a
  duplicate line (in another job, or twice in one job) finds another owner and writes no row;
* another upload of the same key (a re-upload): both uploads count. The document shows the newer
  one, by the S3 events' ``sequencer`` (the documented order of events on one key), and keeps the
  other in ``uploads`` (the last :data:`HISTORY`), so a late duplicate of either is recognised
  (an upload the container found ``superseded`` is never shown over another: it is the older).
  That rewrite is conditional on the ETag read (``IfMatch``): a concurrent writer makes it retry.
  An upload that falls out of ``uploads`` keeps its claim in an archive object of its own
  (:func:`dermscore.layout.archived_claim_key`, written once), which a writer that finds its
  upload in neither place reads: however often a key is uploaded again, no upload is forgotten.

Cost: one PUT per image (the document, which the results need anyway), a GET only where a
duplicate or a re-upload meets an existing document. Why not a separate claim object per upload,
or Powertools' idempotency utility (DynamoDB)? The first costs a request per image more, the
second a second service and a lock that expires; the state to protect ("which line's outcome
counts for this upload") is written once, where the outcome is, and only read afterwards.
"""

from __future__ import annotations

import json
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from dermscore import layout, reasons, results
from dermscore.aws import error_code, is_missing
from dermscore.messages import ManifestLine
from handlers.storage import put_json

WORKERS = 64                        # parallel document writes (I/O-bound; boto3 clients are thread-safe)
RETRIES = 6                         # a conflicting writer (409, or an IfMatch lost) makes a write retry
HISTORY = 16                        # earlier uploads of a key that its document remembers
PRECONDITION_FAILED = ("PreconditionFailed", "412")
CONFLICT = ("ConditionalRequestConflict", "409")


def owner_of(job: str, input_key: str, index: int) -> str:
    """The owner id of line ``index`` of a job's input file."""
    return f"{job}/{posixpath.basename(input_key)}#{index}"


@dataclass(frozen=True)
class Outcome:
    """What one manifest line produced, to be written as its upload's document if it owns it."""

    line: ManifestLine
    owner: str                      # :func:`owner_of` the line
    doc: dict[str, Any]             # the image's JSON document (dermscore.results.image_document)


def newer(a: str, b: str) -> bool:
    """Is sequencer ``a`` no earlier than ``b``? (S3: left-pad the shorter with zeros, compare as
    text; an unknown or equal sequencer counts as newer, so the latest collected upload is shown.)"""
    if not a or not b:
        return True
    width = max(len(a), len(b))
    return a.upper().rjust(width, "0") >= b.upper().rjust(width, "0")


def shows(mine: dict[str, Any], current: dict[str, Any]) -> bool:
    """Should the key's document show ``mine`` rather than ``current`` (another upload of the key)?
    The newer upload, except that an upload the container found replaced (``superseded``) is
    older than what the key holds, whatever the sequencers say."""
    stale_mine, stale_current = (d.get("reason") == reasons.SUPERSEDED for d in (mine, current))
    if stale_mine != stale_current:
        return stale_current
    return newer(str(mine.get("sequencer") or ""), str(current.get("sequencer") or ""))


def _known(doc: dict[str, Any]) -> dict[str, str]:
    """Every upload of the key the document knows: {etag: owner}."""
    known = {str(u.get("etag")): str(u.get("owner")) for u in doc.get("uploads") or []}
    known[str(doc.get("etag"))] = str(doc.get("owner"))
    return known


def _read(s3, bucket: str, key: str) -> tuple[dict[str, Any], str] | None:
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_missing(exc):
            return None
        raise
    return json.loads(obj["Body"].read()), obj["ETag"]


def _put(s3, bucket: str, key: str, doc: dict[str, Any], **condition: str) -> bool:
    """A conditional PUT; False if the condition failed or a concurrent writer conflicted."""
    try:
        put_json(s3, bucket, key, doc, **condition)
        return True
    except ClientError as exc:
        if error_code(exc) in PRECONDITION_FAILED + CONFLICT:
            return False
        raise


def place(s3, bucket: str, outcome: Outcome) -> bool:
    """Does ``outcome.owner`` own its upload? Writes the document when it newly does."""
    line, key = outcome.line, layout.image_result_key(outcome.line.key)
    mine = {**outcome.doc, "etag": line.etag, "owner": outcome.owner, "sequencer": line.sequencer or None}
    archived = layout.archived_claim_key(line.key, line.etag)
    for attempt in range(RETRIES):
        if _put(s3, bucket, key, mine, IfNoneMatch="*"):
            return True
        found = _read(s3, bucket, key)
        if found is not None:
            current, version = found
            known = _known(current)
            if line.etag in known:
                return known[line.etag] == outcome.owner
            old = _read(s3, bucket, archived)   # an upload that fell out of the document's history
            if old is not None:
                return old[0].get("owner") == outcome.owner
            # another upload of the key: this one counts too; the document shows the newer
            if shows(mine, current):
                shown, other = mine, {"etag": current.get("etag"), "owner": current.get("owner")}
            else:
                shown, other = current, {"etag": line.etag, "owner": outcome.owner}
            history = [other, *(current.get("uploads") or [])]
            for evicted in history[HISTORY:]:   # archived first: a crash here forgets nothing
                _put(s3, bucket, layout.archived_claim_key(line.key, str(evicted.get("etag"))),
                     {"image_key": line.key, **evicted}, IfNoneMatch="*")
            if _put(s3, bucket, key, {**shown, "uploads": history[:HISTORY]}, IfMatch=version):
                return True
        time.sleep(0.02 * 2 ** attempt)
    raise RuntimeError(f"{key}: no stable document after {RETRIES} conditional writes")


Entry = tuple[int, ManifestLine, dict[str, Any], str]   # (line number in its file, line, row, document status)


def owning(s3, bucket: str, job: str, in_key: str, entries: list[Entry]) -> list[Entry]:
    """Place each entry's row as its upload's document (``status``: ``results.SCORED`` or
    ``FAILED``), :data:`WORKERS` at a time; the entries whose line owns its upload, in order."""
    outcomes = [Outcome(line, owner_of(job, in_key, i), results.image_document(row, status))
                for i, line, row, status in entries]
    if len(outcomes) <= 1:
        owns = [place(s3, bucket, o) for o in outcomes]
    else:
        with ThreadPoolExecutor(min(WORKERS, len(outcomes)), thread_name_prefix="claims") as pool:
            owns = list(pool.map(lambda o: place(s3, bucket, o), outcomes))
    return [e for e, own in zip(entries, owns, strict=True) if own]
