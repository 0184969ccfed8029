"""The per-job report (dermscore.jobreport): the page and CSV from rows, and collect writing them."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime, timedelta

import pytest
from conftest import stage_transform_job

from dermscore import jobreport, layout, results
from dermscore.labels import CLASSES
from infra.runner import state_change_event

MODEL = {"name": "m", "version": "1", "weights_sha256": "f" * 64}
EVIL = 'incoming/batch/<script>alert("x")</script>.jpg'
ENDED = datetime(2026, 11, 23, 12, 30, tzinfo=UTC)


def probs(mel: float, nv: float) -> list[float]:
    rest = (1 - mel - nv) / 5
    return [rest, rest, rest, rest, mel, nv, rest]  # akiec bcc bkl df mel nv vasc


def rows_and_failures() -> tuple[list[dict], list[dict]]:
    lines = [("incoming/batch/a.jpg", probs(0.8, 0.1), -2.0), ("incoming/batch/b.jpg", probs(0.05, 0.9), -9.0),
             (EVIL, probs(0.2, 0.5), -7.0), ("incoming/batch/c.jpg", probs(0.01, 0.97), -8.0),
             ("incoming/batch/=HYPERLINK(1).jpg", probs(0.02, 0.9), -8.0)]
    rows = [results.prediction_row(results.score_line({"bucket": "bk", "key": k, "etag": "e"}, p, MODEL, 0.3, 600, 450,
                                                      image_sha256="0" * 64, processing_ms=40.0, ood_score=o,
                                                      ood_threshold=-3.0), "job-1", ENDED) for k, p, o in lines]
    rows[0]["heatmap_key"] = layout.image_artifact_key(rows[0]["image_key"], layout.HEATMAP_SUFFIX)
    rows[0]["thumbnail_key"] = layout.image_artifact_key(rows[0]["image_key"], layout.THUMBNAIL_SUFFIX)
    fails = [results.failure_row("bk", "incoming/batch/bad.jpg", "e", "transform", "corrupt_image", "<b>truncated</b>",
                                 "job-1", ENDED),
             results.failure_row("bk", "incoming/batch/bad2.jpg", "e", "transform", "corrupt_image", "truncated",
                                 "job-1", ENDED),
             results.failure_row("bk", "incoming/batch/gone.jpg", "e", "collect", "missing_output", "no line",
                                 "job-1", ENDED)]
    return rows, fails


JOB = {"name": "job-1", "status": "Completed", "instance_type": "ml.g4dn.xlarge", "instance_count": 2,
       "started": ENDED - timedelta(minutes=10), "ended": ENDED}


def test_page_escapes_counts_classes_and_failures() -> None:
    rows, fails = rows_and_failures()
    page = jobreport.render(rows, fails, JOB)
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<b>truncated</b>" not in page and "&lt;b&gt;truncated&lt;/b&gt;" in page
    # class distribution: one bar per class with its count
    bars = dict(re.findall(r'data-class="(\w+)"[^>]*><title>\w+: (\d+)</title>', page))
    expected = {c: sum(r["top_class"] == c for r in rows) for c in CLASSES}
    assert {c: int(n) for c, n in bars.items()} == expected and expected["mel"] == 1 and expected["nv"] == 4
    # failures by reason: corrupt_image x2 first, then missing_output x1
    fail_rows = re.findall(r"<tr><td>(\w+)</td><td>(\w+)</td><td>(\d+)</td>", page)
    assert fail_rows == [("transform", "corrupt_image", "2"), ("collect", "missing_output", "1")]
    # top-risk table: most urgent first, pictures linked relative to results/reports/
    assert page.index("incoming/batch/a.jpg") < page.index("&lt;script&gt;") < page.index("incoming/batch/c.jpg")
    assert 'href="../images/batch/a.jpg.heatmap.png"' in page and 'src="../images/batch/a.jpg.thumb.jpg"' in page
    assert 'href="job-1.csv"' in page
    # throughput and cost: 8 images in 600 s on 2 x ml.g4dn.xlarge at $0.736/h
    assert "600 s" in page and f"{8 / 600:.2f}" in page and f"${2 * 600 / 3600 * 0.736:.4f}" in page
    assert jobreport.render(rows, fails, JOB) == page    # deterministic: a repeated event rewrites the same bytes


def test_cost_is_unknown_for_an_instance_type_not_in_the_table() -> None:
    rows, fails = rows_and_failures()
    assert jobreport.job_cost(JOB) == pytest.approx(2 * 600 / 3600 * 0.736)
    other = {**JOB, "instance_type": "ml.p3.2xlarge"}
    assert jobreport.job_cost(other) is None and jobreport.job_cost({**JOB, "started": None}) is None
    page = jobreport.render(rows, fails, other)
    assert "<b>unknown</b>cost" in page
    empty = jobreport.render([], [], {"name": "job-<x>"})
    assert "No predictions in this job" in empty and "No failures" in empty and "job-&lt;x&gt;" in empty


def test_csv_has_every_row_most_urgent_first() -> None:
    rows, _ = rows_and_failures()
    got = list(csv.DictReader(io.StringIO(jobreport.to_csv(rows).decode("utf-8"))))
    assert len(got) == len(rows) and list(got[0]) == results.PREDICTION_SCHEMA.names
    assert [r["image_key"] for r in got][:2] == ["incoming/batch/a.jpg", EVIL]
    assert got[0]["risk_level"] == "high" and got[0]["scored_at"] == ENDED.isoformat()
    assert "incoming/batch/=HYPERLINK(1).jpg" in {r["image_key"] for r in got}   # keys are left as they are
    assert jobreport._cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"


# ---- collect on the moto server stack --------------------------------------------------

@pytest.fixture()
def completed_job(make_stack):
    """A stack with a manifest of three images (one error line) and the Completed event."""
    stack = make_stack()
    name = f"{stack.job_prefix}-0123456789abcdef"
    items = [{"bucket": stack.bucket, "key": k, "etag": f"e{i}", "size": 100}
             for i, k in enumerate(["incoming/a.jpg", "incoming/<script>.jpg", "incoming/corrupt.jpg"])]
    out = [results.score_line(items[0], probs(0.8, 0.1), MODEL, 0.5, 600, 450),
           results.score_line(items[1], probs(0.05, 0.9), MODEL, 0.5, 640, 480),
           results.error_line(items[2], "corrupt_image", "image file is truncated")]
    request = stage_transform_job(stack, name, items, out,
                                  TransformResources={"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 1})
    return stack, name, state_change_event(request, "Completed", None, ENDED - timedelta(minutes=5), ENDED)


def test_collect_writes_the_report_and_csv_once_per_job(completed_job) -> None:
    stack, name, event = completed_job
    assert stack.invoke("collect", event)["scored"] == 2
    keys = [layout.job_report_csv_key(name), layout.job_report_key(name)]
    assert sorted(stack.list_keys(layout.REPORTS)) == keys
    s3 = stack.client("s3")
    page = s3.get_object(Bucket=stack.bucket, Key=layout.job_report_key(name))
    assert page["ContentType"].startswith("text/html")
    body = page["Body"].read().decode()
    assert "<script>" not in body and "corrupt_image" in body and f"${300 / 3600 * 0.736:.4f}" in body
    rows = list(csv.DictReader(io.StringIO(
        s3.get_object(Bucket=stack.bucket, Key=layout.job_report_csv_key(name))["Body"].read().decode())))
    assert [r["image_key"] for r in rows] == ["incoming/a.jpg", "incoming/<script>.jpg"]

    stack.invoke("collect", event)     # EventBridge repeats the event: same keys, same bytes
    assert sorted(stack.list_keys(layout.REPORTS)) == keys
    assert s3.get_object(Bucket=stack.bucket, Key=layout.job_report_key(name))["Body"].read().decode() == body


def test_a_failing_report_does_not_fail_the_collection(completed_job, monkeypatch) -> None:
    stack, name, event = completed_job

    def boom(*args, **kwargs):
        raise RuntimeError("report bug")

    monkeypatch.setattr(jobreport, "render", boom)
    assert stack.invoke("collect", event) == {"job_name": name, "status": "Completed", "scored": 2, "failed": 1}
    assert len(stack.list_keys(layout.PREDICTIONS)) == 1 and len(stack.list_keys(layout.IMAGES)) == 2
    assert layout.job_report_key(name) not in stack.list_keys(layout.REPORTS)
