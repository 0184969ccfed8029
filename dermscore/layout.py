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
RESCORE = "rescore/"                # one progress record per re-score run (handlers.rescore)
REJECTED = "rejected/"              # one claim per upload enqueue refused (its one failure row)
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
    pictures = (image_artifact_key(key, "0" * ETAG_IN_KEY, s, "0" * MODEL_IN_KEY)
                for s in (HEATMAP_SUFFIX, THUMBNAIL_SUFFIX))
    longest = max(len(k.encode()) for k in (image_result_key(key), *pictures))
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


def rejected_key(bucket: str, key: str, etag: str) -> str:
    """The claim of an upload enqueue refused (``handlers.enqueue``): by bucket, key and ETag, so the
    same rejected content uploaded again to the same key is recognised as the same upload."""
    return f"{REJECTED}{content_digest(bucket, key, etag, length=32)}.json"


def rescore_key(run: str) -> str:
    """A re-score run's record: its request, cursor and counts (``handlers.rescore``)."""
    return f"{RESCORE}{run}.json"


def manifest_key(job_name: str) -> str:
    return f"{MANIFESTS}{job_name}.jsonl"


def job_input_prefix(job_name: str, shards: int) -> str:
    """The folder of a job's shard files: the job's ``S3Uri`` (``S3DataType=S3Prefix``).

    The shard count is part of the folder, so a batch re-sharded after a settings change
    (e.g. a larger instance count once a quota was raised) never mixes with stale shards.
    """
    return f"{MANIFESTS}{job_name}/{shards}-shards/"


JOB_DIGEST_LENGTH = 16
MAX_JOB_NAME = 63


def job_name(prefix: str, part_keys: list[str] | tuple[str, ...]) -> str:
    """Deterministic, valid SageMaker name (^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}) for a set of pending
    parts: ``<prefix>-<16 hex digits of their keys>``."""
    digest = content_digest(*sorted(part_keys), length=JOB_DIGEST_LENGTH)
    clean = job_prefix(prefix)
    return f"{clean}-{digest}" if clean else digest


def job_prefix(prefix: str) -> str:
    """The stack's part of its job names (the stack name, made a valid name and shortened)."""
    return re.sub(r"[^a-zA-Z0-9-]", "-", prefix).strip("-")[: MAX_JOB_NAME - JOB_DIGEST_LENGTH - 1].rstrip("-")


def is_job_of(prefix: str, name: str) -> bool:
    """Is ``name`` a job of the stack ``prefix``? Exactly ``<prefix>-`` and 16 hex digits: a
    sibling stack named ``<prefix>-x`` shares the prefix but its names are longer (stack names and
    job names have no character a stack name cannot contain, so only the length tells them apart)."""
    return re.fullmatch(rf"{re.escape(job_prefix(prefix))}-[0-9a-f]{{{JOB_DIGEST_LENGTH}}}", name) is not None


def shard_count(folder: str) -> int | None:
    """The shard count a job's input folder announces (``manifests/<job>/<n>-shards/``), or None."""
    m = re.fullmatch(r"(\d+)-shards", folder.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


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


MODEL_IN_KEY = 12                  # hex digits of a model's weights sha256 in its pictures' and claims' keys


def archived_claim_key(image_key: str, etag: str, model: str = "") -> str:
    """The claim of one (upload, model) that fell out of its key's document history
    (``handlers.claims``): beside the document, named by the upload's ETag and the model's weights
    sha256; it never expires, like the document."""
    return f"{image_result_key(image_key)[: -len('.json')]}.{_etag_in_key(etag)}{_model_in_key(model)}.claim.json"


# Derived pictures carry this S3 object tag: their lifecycle rule (PictureRetentionDays) filters on
# it, as they sit beside the JSON documents, which never expire.
PICTURE_TAG = "dermscore-derived=picture"
ETAG_IN_KEY = 40                  # most characters of an upload's ETag in its pictures' keys


def image_artifact_key(image_key: str, etag: str, suffix: str, model: str = "") -> str:
    """A derived picture of one upload as one model saw it (heatmap, thumbnail), beside its JSON
    document and named by the upload's ETag and the model's weights sha256: two uploads of one key,
    or one upload re-scored by another model, never share or overwrite each other's picture,
    whatever order they are scored in."""
    return f"{image_result_key(image_key)[: -len('.json')]}.{_etag_in_key(etag)}{_model_in_key(model)}{suffix}"


def _etag_in_key(etag: str) -> str:
    return re.sub(r"[^0-9A-Za-z-]", "", etag or "")[:ETAG_IN_KEY] or "no-etag"


def _model_in_key(model: str) -> str:
    digits = re.sub(r"[^0-9a-f]", "", (model or "").lower())[:MODEL_IN_KEY]
    return f".m{digits}" if digits else ""


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


def give_up_key(job_name: str) -> str:
    """The reconciler's fence of a job it is giving up on (collect then ignores the job), and the
    record of the give-up's progress (the last input file done), beside the marker."""
    return f"{COLLECTED}{job_name}.give-up.json"


def redrive_key(job_name: str, attempt: int) -> str:
    """The reconciler's record of its ``attempt``-th re-drive (or re-submission) of a job, beside
    the markers so that one listing gives both (SageMaker job names hold no '.')."""
    return f"{COLLECTED}{job_name}.redrive-{attempt}.json"
