"""The report (dermscore.report): one build, one cost, one template behind the per-job page that
collect writes and the page of ``dermscore report`` (analytics/report.py) over exported results."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import stage_transform_job
from PIL import Image

from analytics import report as local_report
from dermscore import layout, report, results, scoring
from dermscore.labels import CLASSES
from dermscore.messages import ManifestLine, OutputLine
from infra.runner import state_change_event

MODEL = {"name": "m", "version": "1", "weights_sha256": "f" * 64}
EVIL = 'incoming/batch/<script>alert("x")</script>.jpg'
EVIL_ESCAPED = "incoming/batch/&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;.jpg"
ENDED = datetime(2026, 11, 23, 12, 30, tzinfo=UTC)
G4DN = 0.736


def upload(key: str) -> ManifestLine:
    return ManifestLine("bk", key, "e")


def probs(mel: float, nv: float) -> list[float]:
    rest = (1 - mel - nv) / 5
    return [rest, rest, rest, rest, mel, nv, rest]  # akiec bcc bkl df mel nv vasc


def rows_and_failures(job: str = "job-1", when: datetime = ENDED) -> tuple[list[dict], list[dict]]:
    lines = [("incoming/batch/a.jpg", probs(0.8, 0.1), -2.0), ("incoming/batch/b.jpg", probs(0.05, 0.9), -9.0),
             (EVIL, probs(0.2, 0.5), -7.0), ("incoming/batch/c.jpg", probs(0.01, 0.97), -8.0),
             ("incoming/batch/=HYPERLINK(1).jpg", probs(0.02, 0.9), -8.0)]
    rows = [results.prediction_row(scoring.score_line(upload(k), p, MODEL, 0.3, 600, 450,
                                                      image_sha256="0" * 64, processing_ms=40.0, ood_score=o,
                                                      ood_threshold=-3.0), job, when) for k, p, o in lines]
    for field, suffix in (("heatmap_key", layout.HEATMAP_SUFFIX), ("thumbnail_key", layout.THUMBNAIL_SUFFIX)):
        rows[0][field] = layout.image_artifact_key(rows[0]["image_key"], rows[0]["etag"], suffix,
                                                   MODEL["weights_sha256"])
    fails = [results.failure_row(upload("incoming/batch/bad.jpg"), "transform", "corrupt_image", "<b>truncated</b>",
                                 job, when),
             results.failure_row(upload("incoming/batch/bad2.jpg"), "transform", "corrupt_image", "truncated",
                                 job, when),
             results.failure_row(upload("incoming/batch/gone.jpg"), "collect", "missing_output", "no line",
                                 job, when)]
    return rows, fails


JOB = {"name": "job-1", "status": "Completed", "instance_type": "ml.g4dn.xlarge", "instance_count": 2,
       "started": ENDED - timedelta(minutes=10), "ended": ENDED}


def section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m, f"no section {sid}"
    return m.group(1)


def section_ids(page: str) -> list[str]:
    return re.findall(r'<section id="([\w-]+)">', page)


def class_bars(page: str) -> dict[str, int]:
    return {c: int(n) for c, n in re.findall(r'data-class="(\w+)"[^>]*><title>\w+: (\d+)</title>', page)}


def failure_rows(page: str) -> list[tuple[str, str, str]]:
    return re.findall(r"<tr><td>(\w+)</td><td>(\w+)</td><td>(\d+)</td>", section(page, "failures"))


def top_keys(page: str) -> list[str]:
    return re.findall(r'<td class="key">([^<]*)</td>', section(page, "top-risk"))


def measure(page: str, name: str) -> str:
    m = re.search(rf"<tr><td>{re.escape(name)}</td><td>([^<]*)</td></tr>", section(page, "throughput"))
    assert m, f"no measure {name}"
    return m.group(1)


def kpi(page: str, name: str) -> str:
    m = re.search(rf'<div class="kpi"><b>([^<]*)</b>{re.escape(name)}</div>', section(page, "kpis"))
    assert m, f"no kpi {name}"
    return m.group(1)


# ---- the model and the page ------------------------------------------------------------

def test_build_counts_orders_groups_and_prices() -> None:
    rows, fails = rows_and_failures()
    data = report.job_page(rows, fails, JOB)
    assert {c.code: c.count for c in data.classes} == {c: sum(r["top_class"] == c for r in rows) for c in CLASSES}
    assert dict(data.risk) == {"high": 1, "moderate": 1, "low": 3} and data.ood == 1
    assert sum(b.high + b.moderate + b.low for b in data.histogram) == 5 and data.histogram[16].high == 1
    assert [t.image_key for t in data.top][:3] == ["incoming/batch/a.jpg", EVIL, "incoming/batch/b.jpg"]
    assert [(g.stage, g.reason, g.images, g.example) for g in data.failures] == [
        ("transform", "corrupt_image", 2, "incoming/batch/bad.jpg"), ("collect", "missing_output", 1,
                                                                      "incoming/batch/gone.jpg")]
    assert [p.href for p in data.top[0].pictures] == ["../images/batch/a.jpg.e.mffffffffffff.thumb.jpg",
                                                      "../images/batch/a.jpg.e.mffffffffffff.heatmap.png"]
    total = data.total
    assert (total.duration_s, total.job_images, total.ms_per_image) == (600, 8, pytest.approx(40.0))
    assert total.instance_hours == pytest.approx(2 * 600 / 3600) and total.images_per_s == pytest.approx(8 / 600)
    assert total.cost == pytest.approx(2 * 600 / 3600 * G4DN) == data.jobs[0].cost and data.unpriced == ()


def test_page_escapes_counts_classes_and_failures() -> None:
    rows, fails = rows_and_failures()
    page = report.render(report.job_page(rows, fails, JOB))
    assert section_ids(page) == ["kpis", "classes", "top-risk", "failures", "throughput"]
    assert "<script>" not in page and EVIL_ESCAPED in page
    assert "<b>truncated</b>" not in page and "&lt;b&gt;truncated&lt;/b&gt;" in page
    # class distribution: one bar per class with its count
    expected = {c: sum(r["top_class"] == c for r in rows) for c in CLASSES}
    assert class_bars(page) == expected and expected["mel"] == 1 and expected["nv"] == 4
    # failures by reason: corrupt_image x2 first, then missing_output x1
    assert failure_rows(page) == [("transform", "corrupt_image", "2"), ("collect", "missing_output", "1")]
    # top-risk table: most urgent first, pictures linked relative to results/reports/
    assert top_keys(page)[:3] == ["incoming/batch/a.jpg", EVIL_ESCAPED, "incoming/batch/b.jpg"]
    assert top_keys(page)[-1] == "incoming/batch/c.jpg"
    assert 'href="../images/batch/a.jpg.e.mffffffffffff.heatmap.png"' in page
    assert 'src="../images/batch/a.jpg.e.mffffffffffff.thumb.jpg"' in page
    assert 'href="job-1.csv"' in page
    assert "melanoma flag" in section(page, "top-risk") and "OOD / low quality" in section(page, "top-risk")
    # throughput and cost: 8 images in 600 s on 2 x ml.g4dn.xlarge at $0.736/h
    assert measure(page, "instances") == "2 x ml.g4dn.xlarge" and measure(page, "duration") == "600 s (10.0 min)"
    assert measure(page, "images/s") == f"{8 / 600:.2f}" and measure(page, "cost") == f"${2 * 600 / 3600 * G4DN:.4f}"
    assert measure(page, "ms / image in the transform") == "40.0"
    assert kpi(page, "cost") == f"${2 * 600 / 3600 * G4DN:.2f}" and kpi(page, "images/s") == f"{8 / 600:.2f}"
    assert "<script" not in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert report.render(report.job_page(rows, fails, JOB)) == page   # deterministic: a repeated event, same bytes


def test_cost_is_unknown_for_an_instance_type_not_in_the_table() -> None:
    rows, fails = rows_and_failures()
    assert report.job_cost(JOB) == pytest.approx(2 * 600 / 3600 * G4DN)
    other = {**JOB, "instance_type": "ml.p3.2xlarge"}
    assert report.job_cost(other) is None and report.job_cost({**JOB, "started": None}) is None
    assert report.job_cost({**JOB, "instance_count": None}) is None
    assert report.job_cost(other, prices={"ml.p3.2xlarge": 3.825}) == pytest.approx(2 * 600 / 3600 * 3.825)
    page = report.render(report.job_page(rows, fails, other))
    assert "<b>unknown</b>cost" in page and measure(page, "cost") == "unknown"
    assert "Cost unknown for 1 job(s) (job-1)" in page and measure(page, "duration") == "600 s (10.0 min)"
    empty = report.render(report.job_page([], [], {"name": "job-<x>"}))
    assert "No predictions in this job" in empty and "No failures" in empty and "job-&lt;x&gt;" in empty
    assert "<b>unknown</b>cost" in empty and section_ids(empty) == section_ids(page)


def test_totals_over_several_jobs() -> None:
    rows1, fails1 = rows_and_failures("job-1")
    rows2, _ = rows_and_failures("job-2")
    job2 = {**JOB, "name": "job-2", "instance_count": 1, "started": ENDED - timedelta(minutes=5),
            "ended": ENDED + timedelta(minutes=5)}
    enqueue = results.failure_row(upload("incoming/empty.jpg"), "enqueue", "zero_byte", "object is empty", None,
                                  ENDED)
    data = report.build(rows1 + rows2, fails1 + [enqueue], [JOB, job2])
    assert [ln.job.name for ln in data.jobs] == ["job-1", "job-2"]
    assert [(ln.scored, ln.failed) for ln in data.jobs] == [(5, 3), (5, 0)]
    assert data.failed == 4 and data.total.job_images == 13          # the enqueue failure belongs to no job
    assert data.total.duration_s == 900                               # earliest start to latest end
    assert data.total.images_per_s == pytest.approx(13 / 900)
    assert data.total.cost == pytest.approx(report.job_cost(JOB) + report.job_cost(job2))
    assert data.total.cost == pytest.approx((2 * 600 + 600) / 3600 * G4DN)
    page = report.render(data)
    assert len(re.findall(r'<tr><td class="key">job-\d</td>', section(page, "throughput"))) == 2
    # a job whose facts are missing has no cost, and then neither has the total
    partial = report.build(rows1 + rows2, fails1, [JOB])
    assert partial.total.cost is None and partial.unpriced == ("job-2",) and partial.jobs[0].cost is not None
    page = report.render(partial)
    assert "<b>unknown</b>cost" in page and "Cost unknown for 1 job(s) (job-2)" in page


def test_job_facts_round_trip() -> None:
    job = report.Job.of(JOB)
    data = job.to_json()
    assert report.Job.from_json(data) == job and json.loads(data)["started"] == "2026-11-23T12:20:00+00:00"
    assert report.Job.of(job) is job and report.Job.of({"name": "j"}).instance_hours is None


def test_csv_has_every_row_most_urgent_first() -> None:
    rows, _ = rows_and_failures()
    got = list(csv.DictReader(io.StringIO(report.to_csv(rows).decode("utf-8"))))
    assert len(got) == len(rows) and list(got[0]) == results.PREDICTION_SCHEMA.names
    assert [r["image_key"] for r in got][:2] == ["incoming/batch/a.jpg", EVIL]
    assert got[0]["risk_level"] == "high" and got[0]["scored_at"] == ENDED.isoformat()
    assert "incoming/batch/=HYPERLINK(1).jpg" in {r["image_key"] for r in got}   # keys are left as they are
    assert report._cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"


# ---- collect on the moto server stack --------------------------------------------------

@pytest.fixture()
def completed_job(make_stack):
    """A stack with a manifest of three images (one error line) and the Completed event."""
    stack = make_stack()
    name = f"{stack.job_prefix}-0123456789abcdef"
    items = [ManifestLine(stack.bucket, k, f"e{i}", 100)
             for i, k in enumerate(["incoming/a.jpg", "incoming/<script>.jpg", "incoming/corrupt.jpg"])]
    out = [scoring.score_line(items[0], probs(0.8, 0.1), MODEL, 0.5, 600, 450),
           scoring.score_line(items[1], probs(0.05, 0.9), MODEL, 0.5, 640, 480),
           OutputLine.error(items[2], "corrupt_image", "image file is truncated")]
    request = stage_transform_job(stack, name, items, out,
                                  TransformResources={"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 1})
    return stack, name, state_change_event(request, "Completed", None, ENDED - timedelta(minutes=5), ENDED)


def test_collect_writes_the_report_csv_and_facts_once_per_job(completed_job) -> None:
    stack, name, event = completed_job
    assert stack.invoke("collect", event)["scored"] == 2
    keys = sorted([layout.job_report_csv_key(name), layout.job_report_key(name), layout.job_facts_key(name)])
    assert sorted(stack.list_keys(layout.REPORTS)) == keys
    s3 = stack.client("s3")
    page = s3.get_object(Bucket=stack.bucket, Key=layout.job_report_key(name))
    assert page["ContentType"].startswith("text/html")
    body = page["Body"].read().decode()
    assert "<script>" not in body and failure_rows(body) == [("transform", "corrupt_image", "1")]
    assert measure(body, "cost") == f"${300 / 3600 * G4DN:.4f}" and measure(body, "duration") == "300 s (5.0 min)"
    rows = list(csv.DictReader(io.StringIO(
        s3.get_object(Bucket=stack.bucket, Key=layout.job_report_csv_key(name))["Body"].read().decode())))
    assert [r["image_key"] for r in rows] == ["incoming/a.jpg", "incoming/<script>.jpg"]
    facts = report.Job.from_json(s3.get_object(Bucket=stack.bucket, Key=layout.job_facts_key(name))["Body"].read())
    assert facts == report.Job(name, "Completed", "ml.g4dn.xlarge", 1, ENDED - timedelta(minutes=5), ENDED)

    stack.invoke("collect", event)     # EventBridge repeats the event: same keys, same bytes
    assert sorted(stack.list_keys(layout.REPORTS)) == keys
    assert s3.get_object(Bucket=stack.bucket, Key=layout.job_report_key(name))["Body"].read().decode() == body


def test_a_failing_report_does_not_fail_the_collection(completed_job, monkeypatch) -> None:
    stack, name, event = completed_job

    def boom(*args, **kwargs):
        raise RuntimeError("report bug")

    monkeypatch.setattr(report, "render", boom)
    assert stack.invoke("collect", event) == {"job_name": name, "status": "Completed", "scored": 2, "failed": 1}
    assert len(stack.list_keys(layout.PREDICTIONS)) == 1
    assert len(stack.list_keys(layout.IMAGES)) == 3    # 2 scored, 1 refused by the transform
    assert stack.list_keys(layout.REPORTS) == []     # nothing half-written: the page is rendered first


def export(stack, out: Path) -> Path:
    """results/ of the stack's bucket into ``out``, as ``dermscore demo`` / ``serve`` export it."""
    s3 = stack.client("s3")
    for key in stack.list_keys("results/"):
        target = out / key[len("results/"):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read())
    return out


def test_the_job_page_and_dermscore_report_are_one_build_and_one_template(completed_job, tmp_path,
                                                                          monkeypatch) -> None:
    stack, name, event = completed_job
    built = []
    original = report.build

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(report, "build", spy)
    stack.invoke("collect", event)
    results_dir = export(stack, tmp_path / "output")
    job_page = (results_dir / "reports" / f"{name}.html").read_text()
    info = local_report.write_report(results_dir, results_dir / "report")
    local_page = info["html"].read_text()
    assert len(built) == 2 and built[1] is info["data"]            # collect's page, then dermscore report's

    job_data, local_data = built
    assert section_ids(job_page) == section_ids(local_page) == ["kpis", "classes", "top-risk", "failures", "throughput"]
    # the same cost, from the same job facts (collect's reports/<job>.json), by the same definition
    assert job_data.total.cost == local_data.total.cost == pytest.approx(300 / 3600 * G4DN)
    for what in ("cost", "duration", "images/s", "billed instance time", "price", "cost per 1,000 images"):
        assert measure(job_page, what) == measure(local_page, what), what
    assert kpi(job_page, "cost") == kpi(local_page, "cost") == f"${300 / 3600 * G4DN:.2f}"
    assert class_bars(job_page) == class_bars(local_page) and class_bars(job_page)["mel"] == 1
    assert failure_rows(job_page) == failure_rows(local_page) == [("transform", "corrupt_image", "1")]
    assert top_keys(job_page) == top_keys(local_page) == ["incoming/a.jpg", "incoming/&lt;script&gt;.jpg"]
    assert [r["image_key"] for r in csv.DictReader(io.StringIO(info["csv"].read_text()))] == \
        [r["image_key"] for r in csv.DictReader(io.StringIO((results_dir / "reports" / f"{name}.csv").read_text()))]


# ---- dermscore report over exported results (synthetic rows, no stack) --------------------

def write_results(root: Path, facts: bool = True) -> None:
    when = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    lines = [("incoming/batch/a.jpg", probs(0.8, 0.1), -2.0), ("incoming/batch/b.jpg", probs(0.05, 0.9), -9.0),
             (EVIL, probs(0.2, 0.5), -7.0), ("incoming/batch/c.jpg", probs(0.01, 0.97), -8.0)]
    rows = [results.prediction_row(scoring.score_line(upload(k), p, MODEL, 0.3, 600, 450,
                                                      image_sha256="0" * 64, processing_ms=40.0, ood_score=o,
                                                      ood_threshold=-3.0), "job-1", when) for k, p, o in lines]
    path = root / "predictions" / "dt=2026-11-23" / "job-1.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(results.to_table(rows, results.PREDICTION_SCHEMA), path)
    fails = [results.failure_row(upload("incoming/batch/empty.jpg"), "enqueue", "zero_byte", "object is empty",
                                 None, when),
             results.failure_row(upload("incoming/batch/bad.jpg"), "transform", "corrupt_image", "truncated",
                                 "job-1", when)]
    path = root / "failures" / "dt=2026-11-23" / "job-1.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(results.to_table(fails, results.FAILURE_SCHEMA), path)
    # the pipeline's stored thumbnail + heatmap for the flagged image, next to its JSON
    for suffix, fmt in ((local_report.THUMB_SUFFIX, "JPEG"), (local_report.HEATMAP_SUFFIX, "PNG")):
        target = local_report.artifact_path(root, "incoming/batch/a.jpg", "e", suffix, MODEL["weights_sha256"])
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (200, 50, 50)).save(target, fmt)
    assert str(local_report.artifact_path(root, "incoming/batch/a.jpg", "e", ".x")).endswith(
        layout.image_result_key("incoming/batch/a.jpg")[len("results/"):-len(".json")] + ".e.x")
    if facts:   # what collect writes beside the job's page: 2 instances for 10 minutes
        target = root / layout.job_facts_key("job-1")[len("results/"):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(report.Job("job-1", "Completed", "ml.g4dn.xlarge", 2, when - timedelta(minutes=10),
                                      when).to_json())


def test_report_page_and_csv(tmp_path: Path) -> None:
    write_results(tmp_path)
    originals = tmp_path / "originals"
    originals.mkdir()
    exif = Image.Exif()
    exif[0x010F] = "SecretCameraMaker"
    Image.new("RGB", (300, 200), (10, 120, 10)).save(originals / "b.jpg", "JPEG", exif=exif)
    info = local_report.write_report(tmp_path, tmp_path / "report", images_dir=originals, top=3)
    page = info["html"].read_text()
    assert info["predictions"] == 4 and info["failures"] == 2
    assert section_ids(page) == ["kpis", "classes", "top-risk", "failures", "throughput"]
    # the stored pictures of a.jpg, linked relative to the page; b.jpg's original re-encoded, pixels only
    assert 'src="../images/batch/a.jpg.e.mffffffffffff.thumb.jpg"' in page
    assert 'href="../images/batch/a.jpg.e.mffffffffffff.heatmap.png"' in page
    thumbs = list((tmp_path / "report" / local_report.THUMBNAILS).glob("*.jpg"))
    assert len(thumbs) == 1 and f'src="{local_report.THUMBNAILS}/{thumbs[0].name}"' in page
    assert b"SecretCameraMaker" not in thumbs[0].read_bytes() and "SecretCameraMaker" not in page
    with Image.open(thumbs[0]) as im:
        assert max(im.size) <= local_report.THUMB_PX and not im.getexif()
    assert "Grad-CAM" in page and "Melanoma" in page and "zero_byte" in page and "corrupt_image" in page
    assert "<script>" not in page and EVIL_ESCAPED in page    # keys are escaped
    assert len(re.findall(r'<tr class="risk-', page)) == 3 and "OOD / low quality" in page
    assert top_keys(page) == ["incoming/batch/a.jpg", EVIL_ESCAPED, "incoming/batch/b.jpg"]
    assert failure_rows(page) == [("enqueue", "zero_byte", "1"), ("transform", "corrupt_image", "1")]
    # throughput and cost of job-1 from its facts: 2 x 600 s, 4 scored + 1 failed in the job; 40 ms per image
    assert measure(page, "job") == "job-1" and measure(page, "ms / image in the transform") == "40.0"
    assert measure(page, "duration") == "600 s (10.0 min)" and measure(page, "images/s") == f"{5 / 600:.2f}"
    assert measure(page, "cost") == f"${2 * 600 / 3600 * G4DN:.4f}" and "Cost unknown" not in page
    assert info["data"].total.cost == pytest.approx(report.job_cost(report.Job.of(JOB)))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report" / "results.csv").read_text())))
    assert [r["image_key"] for r in rows][:2] == ["incoming/batch/a.jpg", EVIL]   # high, then moderate
    assert rows[0]["risk_level"] == "high" and set(results.PREDICTION_SCHEMA.names) <= set(rows[0])
    # --usd-per-hour replaces the table's price for the job's instance type; the definition stays
    info = local_report.write_report(tmp_path, tmp_path / "priced", usd_per_hour=1.0)
    assert measure(info["html"].read_text(), "cost") == f"${2 * 600 / 3600 * 1.0:.4f}"


def test_report_without_job_facts_says_the_cost_is_unknown(tmp_path: Path) -> None:
    write_results(tmp_path, facts=False)
    info = local_report.write_report(tmp_path, tmp_path / "elsewhere" / "r")
    page = info["html"].read_text()
    assert "<b>unknown</b>cost" in page and measure(page, "cost") == "unknown"
    assert "Cost unknown for 1 job(s) (job-1)" in page and measure(page, "duration") == "unknown"
    assert info["data"].total.cost is None and info["data"].unpriced == ("job-1",)
    assert 'src="../../images/batch/a.jpg.e.mffffffffffff.thumb.jpg"' in page   # links follow --out


def test_report_cli_and_empty_results(tmp_path: Path, capsys) -> None:
    from dermscore.cli import main

    assert main(["report", "--results", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", "--results", str(tmp_path / "empty")]) == 0
    empty = (tmp_path / "empty" / "report" / "report.html").read_text()
    assert "No predictions yet" in empty and "No failures" in empty and kpi(empty, "images scored") == "0"
    write_results(tmp_path / "full")
    assert main(["report", "--results", str(tmp_path / "full"), "--out", str(tmp_path / "r")]) == 0
    assert "report.html" in capsys.readouterr().out and (tmp_path / "r" / "results.csv").is_file()
    page = (tmp_path / "r" / "report.html").read_text()
    assert kpi(page, "images scored") == "4" and kpi(page, "cost") == f"${2 * 600 / 3600 * G4DN:.2f}"
