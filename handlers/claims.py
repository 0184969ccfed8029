"""Exactly one outcome per (upload, model) on at-least-once delivery: the image's JSON document is its claim.

S3 events, SQS and EventBridge all deliver *at least* once, enqueue and the dispatcher may die
half-way, and two jobs may carry the same upload (a duplicate event that arrived after the first
was dispatched). Every upload - ``(bucket, key, ETag)`` - must still end in exactly one place per
model that scored it: one prediction row or one failure row. A re-score with another model
(``handlers.rescore``) adds that model's outcome beside the first; a second re-score with the same
model adds nothing. Nothing is decided before scoring (no request per image on the way in); the
decision is taken where the outcome is written, by the one object collect writes for every image
anyway, its JSON document::

    results/images/<key without incoming/>.json  ->  {..., "etag": ..., "weights_sha256": ...,
                                                      "owner": "<job>/<file>#<line>",
                                                      "history": [{"etag", "model", "owner", ...}, ...]}

A **claim** is (ETag, model), the model being the weights sha256 of the answer (an outcome
without one, a failure the container did not name a model for, has the model ""). An arrival's
line (an S3 event, a duplicate, a retry) matches any claim of its upload, so a duplicate never adds
a row whatever model scored it; only a re-score's line (``ManifestLine.rescore``) makes a claim
of its own per model. Its **owner**
is the one manifest line (job, input file, line number) whose outcome counts for it. Collect
writes the document with ``PutObject(IfNoneMatch="*")``: S3 creates it only if no object of that
key exists (HTTP 412 otherwise), atomically and strongly consistent, so exactly one writer wins
however many race. A writer that loses reads the document:

* the same claim (in the document or its ``history``): the owner recorded there decides. A
  repeated event of the same job finds itself and rewrites the same rows; a duplicate line (in
  another job, or twice in one job) finds another owner and writes no row;
* another claim of the key (a re-upload, or another model's answer for this upload): both count.
  The document shows one (:func:`shows`: the newer upload by the S3 events' ``sequencer``; for
  one upload, a score over a failure, then the later answer, so a re-score shows the model
  deployed now) and keeps the other in ``history`` (the last :data:`HISTORY`, each with its
  model, top class, risk level, p(mel) and time), so a late duplicate of either is recognised.
  That rewrite is conditional on the ETag read (``IfMatch``): a concurrent writer makes it retry.
  A claim that falls out of ``history`` keeps an archive object of its own
  (:func:`dermscore.layout.archived_claim_key`, written once), which a writer that finds its
  claim in neither place reads: however often a key is uploaded or re-scored, nothing is forgotten.

Cost: one PUT per image (the document, which the results need anyway), a GET only where a
duplicate, a re-upload or a re-score meets an existing document. Why not a separate claim object
per upload, or Powertools' idempotency utility (DynamoDB)? The first costs a request per image
more, the second a second service and a lock that expires; the state to protect ("which line's
outcome counts for this upload and model") is written once, where the outcome is, and only read
afterwards.
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
from handlers.storage import CONFLICT, PRECONDITION_FAILED, put_json

WORKERS = 64                        # parallel document writes (I/O-bound; boto3 clients are thread-safe)
RETRIES = 6                         # a conflicting writer (409, or an IfMatch lost) makes a write retry
HISTORY = 16                        # earlier claims of a key (uploads, models) that its document remembers


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


def model_of(doc: dict[str, Any]) -> str:
    """The model of an outcome: its weights sha256 ("" for a failure no model was named for)."""
    return str(doc.get("weights_sha256") or doc.get("model") or "")


def _at(doc: dict[str, Any]) -> str:
    """When an outcome was written (ISO 8601 UTC: comparable as text)."""
    return str(doc.get("scored_at") or doc.get("failed_at") or doc.get("at") or "")


def shows(mine: dict[str, Any], current: dict[str, Any]) -> bool:
    """Should the key's document show ``mine`` rather than ``current`` (another claim of the key)?

    Two uploads: the newer, except that an upload the container found replaced (``superseded``)
    is older than what the key holds, whatever the sequencers say. One upload, two models: a score
    over a failure (a re-score of a since-deleted object keeps the last answer on show), then the
    later answer (the model deployed now)."""
    if mine.get("etag") and mine.get("etag") == current.get("etag"):
        scored_mine, scored_current = (d.get("status") == results.SCORED for d in (mine, current))
        if scored_mine != scored_current:
            return scored_mine
        return _at(mine) >= _at(current)
    stale_mine, stale_current = (d.get("reason") == reasons.SUPERSEDED for d in (mine, current))
    if stale_mine != stale_current:
        return stale_current
    return newer(str(mine.get("sequencer") or ""), str(current.get("sequencer") or ""))


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    """A claim as the document's ``history`` keeps it: who owns it, and the answer in short."""
    entry = {"etag": doc.get("etag"), "model": model_of(doc), "owner": doc.get("owner"),
             "status": doc.get("status"), "model_version": doc.get("model_version"),
             "top_class": doc.get("top_class"), "risk_level": doc.get("risk_level"),
             "prob_mel": doc.get("prob_mel"), "reason": doc.get("reason"), "at": _at(doc) or None}
    return {k: v for k, v in entry.items() if v is not None}


def _known(doc: dict[str, Any]) -> dict[tuple[str, str], str]:
    """Every claim of the key the document knows: {(etag, model): owner}."""
    known = {(str(u.get("etag")), model_of(u)): str(u.get("owner")) for u in doc.get("history") or []}
    known[(str(doc.get("etag")), model_of(doc))] = str(doc.get("owner"))
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


def claim_once(s3, bucket: str, key: str, doc: dict[str, Any]) -> bool:
    """The first writer's claim at ``key`` wins (``IfNoneMatch``); True if ``doc``'s owner holds it
    (it wrote it now, or earlier: a redelivery). For outcomes without a document (enqueue's)."""
    for attempt in range(RETRIES):
        if _put(s3, bucket, key, doc, IfNoneMatch="*"):
            return True
        found = _read(s3, bucket, key)
        if found is not None:
            return found[0].get("owner") == doc["owner"]
        time.sleep(0.02 * 2 ** attempt)
    raise RuntimeError(f"{key}: no stable claim after {RETRIES} conditional writes")


def place(s3, bucket: str, outcome: Outcome) -> bool:
    """Does ``outcome.owner`` own its claim (upload, model)? Writes the document when it newly does."""
    line, key = outcome.line, layout.image_result_key(outcome.line.key)
    mine = {**outcome.doc, "etag": line.etag, "owner": outcome.owner, "sequencer": line.sequencer or None}
    claim = (line.etag, model_of(mine))
    archived = layout.archived_claim_key(line.key, *claim)
    for attempt in range(RETRIES):
        if _put(s3, bucket, key, mine, IfNoneMatch="*"):
            return True
        found = _read(s3, bucket, key)
        if found is not None:
            current, version = found
            owners = [owner for (etag, model), owner in _known(current).items()
                      if etag == line.etag and (model == claim[1] or not line.rescore)]
            if owners:   # an arrival's outcome counts once per upload; a re-score's, once per model
                return outcome.owner in owners
            old = _read(s3, bucket, archived)   # a claim that fell out of the document's history
            if old is not None:
                return old[0].get("owner") == outcome.owner
            # another claim of the key: this one counts too; the document shows one, keeps the other
            shown, other = (mine, current) if shows(mine, current) else (current, mine)
            history = [summary(other), *(current.get("history") or [])]
            for evicted in history[HISTORY:]:   # archived first: a crash here forgets nothing
                _put(s3, bucket, layout.archived_claim_key(line.key, str(evicted.get("etag")), model_of(evicted)),
                     {"image_key": line.key, **evicted}, IfNoneMatch="*")
            if _put(s3, bucket, key, {**shown, "history": history[:HISTORY]}, IfMatch=version):
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
