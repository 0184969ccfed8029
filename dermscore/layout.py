"""Where things live in the bucket.

Every component (the handlers, the transform runner, the template's
notification filter and lifecycle rules) takes its prefixes from here.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import unquote_plus

from dermscore import reasons

INCOMING = "incoming/"
MANIFESTS = "manifests/"
TRANSFORM_OUTPUT = "transform-output/"
PREDICTIONS = "results/predictions/"
IMAGES = "results/images/"
FAILURES = "results/failures/"
MODELS = "models/"                  # model.tar.gz artifacts (dermscore publish-model)
ATHENA_RESULTS = "athena-results/"  # the Athena workgroup's query results
PENDING = "pending/"                # arrival: one manifest part per enqueue invocation, until dispatched
DISPATCH = "dispatch/"              # the dispatcher's intent records: a job's parts, until it exists
REPORTS = "results/reports/"        # one HTML page + CSV + facts JSON per transform job (dermscore.report)

MAX_KEY_BYTES = 1024                # S3's limit on an object key (UTF-8 bytes)


def decode_event_key(raw: str) -> str:
    """Decode an object key as S3 puts it in event notifications.

    S3 URL-encodes keys in events with '+' for spaces ("incoming/a+b%2Bc.jpg"
    is the key "incoming/a b+c.jpg"), so ``unquote_plus`` is the exact inverse.
    """
    return unquote_plus(raw)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def key_problem(key: str) -> tuple[str, str] | None:
    """Why an upload's key cannot be laid out under results/ (reason code, detail), or None.

    Every key derived from an upload (``results/images/<rest>.json`` and its pictures, local
    export paths) mirrors the part after ``incoming/``; a key with ``.``/``..`` segments,
    backslashes or control characters could escape its folder once mirrored onto a file
    system, and one whose longest derived key exceeds S3's 1,024 bytes cannot be written.
    """
    if key.endswith("/"):
        return reasons.FOLDER_MARKER, "a folder placeholder, not a file"
    rest = key[len(INCOMING):] if key.startswith(INCOMING) else key
    if _CONTROL.search(key):
        return reasons.UNSAFE_KEY, "key contains control characters"
    if "\\" in key:
        return reasons.UNSAFE_KEY, "key contains a backslash"
    if any(part in ("", ".", "..") for part in rest.split("/")):
        return reasons.UNSAFE_KEY, "key has an empty, '.' or '..' path segment"
    longest = max(len(image_artifact_key(key, s).encode()) for s in (".json", HEATMAP_SUFFIX, THUMBNAIL_SUFFIX))
    if longest > MAX_KEY_BYTES:
        return reasons.KEY_TOO_LONG, f"its result key would be {longest} bytes (S3 allows {MAX_KEY_BYTES})"
    return None


def local_path(root: Path, relative: str) -> Path:
    """``root / relative`` for a path derived from an object key, refused when it would leave
    ``root`` (``..``, absolute parts, links): every local export and report path goes through here."""
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base) or target == base:
        raise ValueError(f"{relative!r} would leave {base}")
    return target


_PART = re.compile(r"(?P<digest>[0-9a-f]{16})-(?P<images>\d{7,})\.jsonl")


def pending_part_key(digest: str, images: int) -> str:
    """A manifest part waiting for the dispatcher: named by its content's digest (a redelivered
    batch rewrites the same object) and its number of lines, so that one listing of ``pending/``
    tells the dispatcher the pending volume without reading a part."""
    return f"{PENDING}{digest}-{images:07d}.jsonl"


def part_images(key: str) -> int | None:
    """The number of lines a pending part's key announces, or None for a key that is not a part."""
    m = _PART.fullmatch(key[len(PENDING):]) if key.startswith(PENDING) else None
    return int(m.group("images")) if m else None


def dispatch_key(job_name: str) -> str:
    """The dispatcher's intent: the parts of a job it is creating (deleted once the job exists)."""
    return f"{DISPATCH}{job_name}.json"


# The dispatcher's record of its last quiet release (dermscore.batching.quiet): only its
# LastModified matters, read from the listing of dispatch/ the dispatcher makes anyway.
QUIET_RELEASE_KEY = f"{DISPATCH}last-quiet-release"


def manifest_key(job_name: str) -> str:
    return f"{MANIFESTS}{job_name}.jsonl"


def job_input_prefix(job_name: str, shards: int) -> str:
    """The folder of a job's shard files: the job's ``S3Uri`` (``S3DataType=S3Prefix``).

    The shard count is part of the folder, so a batch re-sharded after a settings change
    (e.g. a larger instance count once a quota was raised) never mixes with stale shards.
    """
    return f"{MANIFESTS}{job_name}/{shards}-shards/"


def shard_key(job_name: str, index: int, shards: int) -> str:
    """One manifest shard; its transform output is ``<output prefix><file name>.out``."""
    return f"{job_input_prefix(job_name, shards)}part-{index:05d}-of-{shards:05d}.jsonl"


def transform_output_prefix(job_name: str) -> str:
    return f"{TRANSFORM_OUTPUT}{job_name}/"


def image_result_key(image_key: str) -> str:
    """Per-image JSON document: the incoming key mirrored under results/images/."""
    return f"{IMAGES}{image_key[len(INCOMING):] if image_key.startswith(INCOMING) else image_key}.json"


HEATMAP_SUFFIX = ".heatmap.png"    # Grad-CAM overlay, next to the image's JSON (batch.gradcam)
THUMBNAIL_SUFFIX = ".thumb.jpg"    # re-encoded model-input-size image, next to the JSON


def image_artifact_key(image_key: str, suffix: str) -> str:
    """A derived picture of an image (heatmap, thumbnail), stored beside its JSON document."""
    return image_result_key(image_key)[: -len(".json")] + suffix


def job_file_name(job_name: str, input_key: str) -> str:
    """``<job>-<shard file stem>``: the name of a job's result files for one of its input files."""
    stem = input_key.rsplit("/", 1)[-1]
    return f"{job_name}-{stem[:-len('.jsonl')] if stem.endswith('.jsonl') else stem}"


def prediction_partition_key(dt: str, name: str) -> str:
    """One Parquet file per input file of a job (:func:`job_file_name`), Hive-partitioned by scoring
    date (dt=YYYY-MM-DD)."""
    return f"{PREDICTIONS}dt={dt}/{name}.parquet"


def failure_partition_key(dt: str, name: str) -> str:
    return f"{FAILURES}dt={dt}/{name}.parquet"


def job_report_key(job_name: str) -> str:
    """The report page of one transform job (written by collect; a repeated event overwrites it)."""
    return f"{REPORTS}{job_name}.html"


def job_report_csv_key(job_name: str) -> str:
    """The job's predictions as CSV, beside its report page."""
    return f"{REPORTS}{job_name}.csv"


def job_facts_key(job_name: str) -> str:
    """The job's facts (status, instances, start and end: ``dermscore.report.Job``), beside its report
    page, so ``dermscore report`` over exported results can price the job as its page does."""
    return f"{REPORTS}{job_name}.json"


def content_digest(*parts: str, length: int = 16) -> str:
    """Short, stable digest used for deterministic job and file names."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:length]


# --- outcomes of transform jobs (handlers.collect writes them, handlers.reconcile reads them) ---

COLLECTED = "collected/"            # one small marker per transform job whose outcome is written


def collected_key(job_name: str) -> str:
    """The job's marker: written by collect last, after a successful collection (Completed, Failed
    or Stopped), or by the reconciler when it gave up on the job. The reconciler lists these."""
    return f"{COLLECTED}{job_name}.json"


def redrive_key(job_name: str, attempt: int) -> str:
    """The reconciler's record of its ``attempt``-th re-drive (or re-submission) of a job, beside
    the markers so that one listing gives both (SageMaker job names hold no '.')."""
    return f"{COLLECTED}{job_name}.redrive-{attempt}.json"
