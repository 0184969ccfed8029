"""The result schema: one definition for the transform output, Parquet and JSON.

Flow of a record::

    container (batch.scorer)        -> scoring.score_line() / OutputLine.error()   one per ManifestLine
    collect   (handlers.collect)    -> prediction_row() / failure_row()    + job name, time
    Parquet / per-image JSON / SQL  -> PREDICTION_SCHEMA / FAILURE_SCHEMA

Everything derived from probabilities (top class, malignant probability,
melanoma flag, risk level) is computed once, in :func:`dermscore.scoring.score_line`
(pyarrow-free, so the container needs no pyarrow), where the model's threshold is at hand.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from dermscore import __version__
from dermscore.labels import CLASS_NAMES, CLASSES
from dermscore.messages import ManifestLine, OutputLine

PROB_COLUMNS = [f"prob_{c}" for c in CLASSES]

PREDICTION_SCHEMA = pa.schema([
    ("image_key", pa.string()),
    ("bucket", pa.string()),
    ("etag", pa.string()),
    ("job_name", pa.string()),
    ("scored_at", pa.timestamp("ms", tz="UTC")),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("weights_sha256", pa.string()),
    ("code_version", pa.string()),
    *[(c, pa.float32()) for c in PROB_COLUMNS],
    ("top_class", pa.string()),
    ("top_class_name", pa.string()),
    ("confidence", pa.float32()),
    ("malignant_prob", pa.float32()),
    ("melanoma_flag", pa.bool_()),
    ("risk_level", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    # (appended: older files lack them and read as NULL with union_by_name)
    ("image_sha256", pa.string()),    # sha256 of the bytes that were scored
    ("processing_ms", pa.float32()),  # fetch + decode + this image's share of its batch's forward pass
    ("ood_score", pa.float32()),      # the model's OOD score (ood_method): higher = less like the training data
    ("ood_flag", pa.bool_()),         # ood_score >= the model's ood_threshold (NULL: model has none)
    ("heatmap_key", pa.string()),     # Grad-CAM overlay PNG beside the JSON (NULL: none made)
    ("thumbnail_key", pa.string()),   # re-encoded small JPEG of the image (with the heatmap)
    ("heatmap_class", pa.string()),   # the class the heatmap explains
    ("orientation", pa.int8()),       # EXIF Orientation (1-8) applied before scoring; 1 = none
])

FAILURE_SCHEMA = pa.schema([
    ("image_key", pa.string()),
    ("bucket", pa.string()),
    ("etag", pa.string()),
    ("job_name", pa.string()),
    ("stage", pa.string()),       # enqueue | transform | collect
    ("reason", pa.string()),      # a code from dermscore.imaging (or job_failed, ...)
    ("detail", pa.string()),
    ("failed_at", pa.timestamp("ms", tz="UTC")),
])

PARTITION_COLUMN = "dt"  # Hive-style partition key (YYYY-MM-DD), lives in the path


def utcnow() -> datetime:
    return datetime.now(UTC)


def prediction_row(line: OutputLine, job_name: str, scored_at: datetime, heatmap_key: str | None = None,
                   thumbnail_key: str | None = None) -> dict[str, Any]:
    """Flatten a successful output line into a PREDICTION_SCHEMA row (picture keys: where collect stored them)."""
    model = line.model
    probs = line.probabilities or {}
    return {
        "image_key": line.key, "bucket": line.bucket, "etag": line.etag, "job_name": job_name,
        "scored_at": scored_at, "model_name": model["name"], "model_version": model["version"],
        "weights_sha256": model["weights_sha256"], "code_version": __version__,
        **{f"prob_{c}": probs[c] for c in CLASSES},
        "top_class": line.top_class, "top_class_name": CLASS_NAMES[line.top_class],
        "confidence": line.confidence, "malignant_prob": line.malignant_prob,
        "melanoma_flag": line.melanoma_flag, "risk_level": line.risk_level,
        "width": line.width, "height": line.height,
        "image_sha256": line.image_sha256 or None, "processing_ms": line.processing_ms,
        "ood_score": line.ood_score, "ood_flag": line.ood_flag,
        "heatmap_key": heatmap_key, "thumbnail_key": thumbnail_key,
        "heatmap_class": line.heatmap_class if heatmap_key else None,
        "orientation": line.orientation,
    }


def failure_row(upload: ManifestLine, stage: str, reason: str, detail: str,
                job_name: str | None = None, failed_at: datetime | None = None) -> dict[str, Any]:
    """A FAILURE_SCHEMA row: the upload, where it stopped (enqueue | transform | collect) and why."""
    bucket, key, etag = upload.upload
    return {"image_key": key, "bucket": bucket, "etag": etag, "job_name": job_name, "stage": stage,
            "reason": reason, "detail": detail, "failed_at": failed_at or utcnow()}


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


SCORED, FAILED = "scored", "failed"   # the ``status`` of a per-image JSON document


def image_document(row: dict[str, Any], status: str = SCORED) -> dict[str, Any]:
    """The per-image JSON document: the Parquet row (a prediction, or a failure of the transform
    stage), JSON-friendly, with its ``status``."""
    return {**{k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}, "status": status}
