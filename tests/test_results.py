"""One result schema: transform output line -> Parquet row -> per-image JSON."""

from __future__ import annotations

import json

import pyarrow as pa

from dermscore import results, scoring
from dermscore.labels import CLASSES
from dermscore.messages import ManifestLine, OutputLine

MODEL = {"name": "m", "version": "1", "weights_sha256": "abc"}
ITEM = ManifestLine("b", "incoming/x y.jpg", "e1")


def line(probs: list[float], threshold: float = 0.3) -> OutputLine:
    return scoring.score_line(ITEM, probs, MODEL, threshold, 600, 450)


def test_derived_fields() -> None:
    out = line([0.05, 0.05, 0.1, 0.0, 0.4, 0.35, 0.05])
    assert out.top_class == "mel" and out.melanoma_flag is True
    assert abs(out.malignant_prob - 0.5) < 1e-9 and out.risk_level == "high"
    low = line([0.01, 0.01, 0.05, 0.01, 0.02, 0.85, 0.05])
    assert (low.top_class, low.melanoma_flag, low.risk_level) == ("nv", False, "low")
    moderate = line([0.1, 0.1, 0.1, 0.0, 0.05, 0.6, 0.05], threshold=0.5)
    assert moderate.risk_level == "moderate"


def test_row_matches_schema_and_json_round_trips() -> None:
    row = results.prediction_row(line([1 / 7] * 7), "job-1", results.utcnow())
    table = results.to_table([row], results.PREDICTION_SCHEMA)
    assert table.schema.equals(results.PREDICTION_SCHEMA) and table.num_rows == 1
    doc = json.loads(json.dumps(results.image_document(row)))
    assert set(doc) == {*results.PREDICTION_SCHEMA.names, "status"} and doc["status"] == results.SCORED
    assert abs(sum(doc[f"prob_{c}"] for c in CLASSES) - 1) < 1e-6


def test_failure_row_matches_schema() -> None:
    row = results.failure_row(ManifestLine("b", "incoming/x.jpg", "e"), "enqueue", "zero_byte", "object is empty")
    assert results.to_table([row], results.FAILURE_SCHEMA).column("reason").to_pylist() == ["zero_byte"]
    doc = json.loads(json.dumps(results.image_document(row, results.FAILED)))   # a refused image's document
    assert set(doc) == {*results.FAILURE_SCHEMA.names, "status"} and doc["status"] == results.FAILED
    assert results.FAILURE_SCHEMA.field("failed_at").type == pa.timestamp("ms", tz="UTC")


def test_issue7_fields_sha_time_and_ood_flag() -> None:
    out = scoring.score_line(ITEM, [1 / 7] * 7, MODEL, 0.3, 600, 450, image_sha256="ab" * 32,
                             processing_ms=12.34567, ood_score=-3.0, ood_threshold=-4.0)
    assert out.ood_flag is True and out.processing_ms == 12.346 and out.image_sha256 == "ab" * 32
    row = results.prediction_row(out, "job-1", results.utcnow())
    assert results.to_table([row], results.PREDICTION_SCHEMA).column("ood_flag").to_pylist() == [True]
    in_distribution = scoring.score_line(ITEM, [1 / 7] * 7, MODEL, 0.3, 1, 1, ood_score=-5.0, ood_threshold=-4.0)
    assert in_distribution.ood_flag is False
    # a model without a threshold (older metadata) gives no flag, and older output lines still collect
    assert scoring.score_line(ITEM, [1 / 7] * 7, MODEL, 0.3, 1, 1, ood_score=-5.0).ood_flag is None
    doc = json.loads(line([1 / 7] * 7).to_json())
    for k in ("image_sha256", "processing_ms", "ood_score", "ood_flag"):
        doc.pop(k, None)
    row = results.prediction_row(OutputLine.from_json(doc), "job-1", results.utcnow())
    assert row["ood_flag"] is None and results.to_table([row], results.PREDICTION_SCHEMA).num_rows == 1


def test_every_column_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    documented = {ln.split("|")[1].strip().strip("`") for ln in doc.splitlines() if ln.startswith("| `")}
    missing = (set(results.PREDICTION_SCHEMA.names) | set(results.FAILURE_SCHEMA.names)) - documented
    assert not missing, f"columns missing from docs/results.md: {sorted(missing)}"
