"""The messages that cross a boundary, one type each: what enqueue, the container and collect exchange.

::

    enqueue  --ManifestLine-->  pending/<part>.jsonl  --(dispatch)-->  manifests/<job>/...jsonl
    manifests/<job>/...jsonl  --(Batch Transform, SplitType=Line)-->  container
    container  --OutputLine-->  transform-output/<job>/...jsonl.out  -->  collect
    collect  --Retry (SQS)-->  enqueue      (the images of a failed job, as their next attempt)

Each type owns its JSON form (``to_json`` / ``from_json``), so no stage digs in another's dicts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


def _compact(doc: dict[str, Any]) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _object(text: str | bytes | dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(text) if isinstance(text, (str, bytes, bytearray)) else text
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


@dataclass(frozen=True, order=True)
class ManifestLine:
    """One upload to score, as one line of a transform job's input.

    ``(bucket, key, etag)`` is the upload; ``attempt`` counts transform jobs that failed on it
    (collect re-queues it with ``attempt + 1``); ``sequencer`` is the S3 event's, which orders the
    uploads of one key (so the key's JSON document shows the newest, ``handlers.claims``);
    ``rescore`` marks a line of a re-score (``handlers.rescore``), whose outcome counts beside the
    upload's outcomes from other models, where an arrival's counts once per upload.
    """

    bucket: str
    key: str
    etag: str
    size: int = 0
    attempt: int = 0
    sequencer: str = ""
    rescore: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "etag", str(self.etag or "").strip('"'))

    @property
    def upload(self) -> tuple[str, str, str]:
        return self.bucket, self.key, self.etag

    def next_attempt(self) -> ManifestLine:
        return replace(self, attempt=self.attempt + 1)

    def to_json(self) -> str:
        doc: dict[str, Any] = {"bucket": self.bucket, "key": self.key, "etag": self.etag, "size": self.size}
        if self.attempt:
            doc["attempt"] = self.attempt
        if self.sequencer:
            doc["sequencer"] = self.sequencer
        if self.rescore:
            doc["rescore"] = True
        return json.dumps(doc, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | dict[str, Any]) -> ManifestLine:
        """Parse one line; ``ValueError`` for anything that is not ``{"bucket": str, "key": str, ...}``."""
        doc = _object(text)
        bucket, key = doc.get("bucket"), doc.get("key")
        if not isinstance(bucket, str) or not isinstance(key, str) or not key:
            raise ValueError('needs string "bucket" and non-empty "key"')
        size = doc.get("size", 0)
        return cls(bucket, key, str(doc.get("etag") or ""), size if isinstance(size, int) else 0,
                   int(doc.get("attempt", 0) or 0), str(doc.get("sequencer") or ""), doc.get("rescore") is True)


@dataclass(frozen=True)
class OutputLine:
    """The container's answer for one manifest line: scores (``status="ok"``) or a refusal.

    Everything derived from probabilities (top class, malignant probability, flags, risk level)
    is computed once, in :func:`dermscore.scoring.score_line`, where the model's thresholds are at
    hand. Grad-CAM pictures never travel in the line: the container writes them to S3 beside the
    image's JSON (``layout.image_artifact_key``) and the line names their keys, so a line stays
    ~1 KB whether or not it has a heatmap.
    """

    bucket: str
    key: str
    etag: str
    status: str                                  # "ok" | "error"
    reason: str | None = None                    # error: a code of dermscore.reasons
    detail: str | None = None
    probabilities: dict[str, float] | None = None
    top_class: str | None = None
    confidence: float | None = None
    malignant_prob: float | None = None
    melanoma_flag: bool | None = None
    risk_level: str | None = None
    width: int | None = None                     # as displayed (after the EXIF orientation)
    height: int | None = None
    orientation: int | None = None               # EXIF Orientation applied before scoring (1 = none)
    model: dict[str, str] = field(default_factory=dict)   # name, version, weights_sha256
    image_sha256: str | None = None
    processing_ms: float | None = None
    ood_score: float | None = None
    ood_flag: bool | None = None
    heatmap_class: str | None = None
    heatmap_key: str | None = None               # Grad-CAM overlay PNG the container stored (same bucket)
    thumbnail_key: str | None = None             # JPEG of the model-input-size image, beside it

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def error(cls, line: ManifestLine | None, reason: str, detail: str) -> OutputLine:
        """The line for an image that could not be scored (``line`` None: the input was unreadable)."""
        bucket, key, etag = line.upload if line else ("", "", "")
        return cls(bucket, key, etag, "error", reason=reason, detail=detail)

    def to_json(self) -> str:
        return _compact({k: v for k, v in asdict(self).items() if v is not None and v != {}})

    @classmethod
    def from_json(cls, text: str | bytes | dict[str, Any]) -> OutputLine:
        doc = _object(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


@dataclass(frozen=True)
class Retry:
    """An SQS message from collect to enqueue: ``line`` (its next attempt) of a job that failed."""

    line: ManifestLine
    failed_job: str
    reason: str

    KIND = "dermscore.retry"

    def to_json(self) -> str:
        return json.dumps({"kind": self.KIND, "line": json.loads(self.line.to_json()), "failed_job": self.failed_job,
                           "reason": self.reason[:500]}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes | dict[str, Any]) -> Retry | None:
        """The retry a message body carries, or None when the body is something else (an S3 event)."""
        doc = _object(text)
        if doc.get("kind") != cls.KIND:
            return None
        return cls(ManifestLine.from_json(doc["line"]), str(doc.get("failed_job", "")), str(doc.get("reason", "")))
