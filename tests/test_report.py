"""dermscore report: HTML page + results.csv from exported results (synthetic rows, no stack)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from analytics import report
from dermscore import layout, results

MODEL = {"name": "m", "version": "1", "weights_sha256": "f" * 64}
EVIL = 'incoming/batch/<script>alert("x")</script>.jpg'


def probs(mel: float, nv: float) -> list[float]:
    rest = (1 - mel - nv) / 5
    return [rest, rest, rest, rest, mel, nv, rest]  # akiec bcc bkl df mel nv vasc


def write_results(root: Path) -> None:
    when = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    lines = [("incoming/batch/a.jpg", probs(0.8, 0.1), -2.0), ("incoming/batch/b.jpg", probs(0.05, 0.9), -9.0),
             (EVIL, probs(0.2, 0.5), -7.0), ("incoming/batch/c.jpg", probs(0.01, 0.97), -8.0)]
    rows = [results.prediction_row(results.score_line({"bucket": "bk", "key": k, "etag": "e"}, p, MODEL, 0.3, 600, 450,
                                                      image_sha256="0" * 64, processing_ms=40.0, ood_score=o,
                                                      ood_threshold=-3.0), "job-1", when) for k, p, o in lines]
    path = root / "predictions" / "dt=2026-11-23" / "job-1.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(results.to_table(rows, results.PREDICTION_SCHEMA), path)
    fails = [results.failure_row("bk", "incoming/batch/empty.jpg", "e", "enqueue", "zero_byte", "object is empty",
                                 None, when),
             results.failure_row("bk", "incoming/batch/bad.jpg", "e", "transform", "corrupt_image", "truncated",
                                 "job-1", when)]
    path = root / "failures" / "dt=2026-11-23" / "job-1.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(results.to_table(fails, results.FAILURE_SCHEMA), path)
    # the pipeline's stored thumbnail + heatmap for the flagged image, next to its JSON
    for suffix, fmt in ((report.THUMB_SUFFIX, "JPEG"), (report.HEATMAP_SUFFIX, "PNG")):
        target = report.artifact_path(root, "incoming/batch/a.jpg", suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (200, 50, 50)).save(target, fmt)
    assert str(report.artifact_path(root, "incoming/batch/a.jpg", ".x")).endswith(
        layout.image_result_key("incoming/batch/a.jpg")[len("results/"):-len(".json")] + ".x")


def test_report_page_and_csv(tmp_path: Path) -> None:
    write_results(tmp_path)
    originals = tmp_path / "originals"
    originals.mkdir()
    exif = Image.Exif()
    exif[0x010F] = "SecretCameraMaker"
    Image.new("RGB", (300, 200), (10, 120, 10)).save(originals / "b.jpg", "JPEG", exif=exif)
    info = report.write_report(tmp_path, tmp_path / "report", images_dir=originals, top=3)
    page = info["html"].read_text()
    assert info["predictions"] == 4 and info["failures"] == 2
    assert page.count('src="data:image/png;base64,') >= 3        # two charts + one heatmap
    assert "Grad-CAM" in page and "Melanoma" in page and "zero_byte" in page and "corrupt_image" in page
    assert "<script>" not in page and "&lt;script&gt;" in page    # keys are escaped
    assert "SecretCameraMaker" not in page                         # thumbnails are re-encoded pixels only
    assert page.count('<div class="card risk-') == 3 and "OOD / low quality" in page
    assert "job-1" in page and "25.0" in page                      # 40 ms per image -> 25 images/s
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report" / "results.csv").read_text())))
    assert [r["image_key"] for r in rows][:2] == ["incoming/batch/a.jpg", EVIL]   # high, then moderate
    assert rows[0]["risk_level"] == "high" and set(results.PREDICTION_SCHEMA.names) <= set(rows[0])


def test_report_cli_and_empty_results(tmp_path: Path, capsys) -> None:
    from dermscore.cli import main

    assert main(["report", "--results", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", "--results", str(tmp_path / "empty")]) == 0
    assert "No predictions yet" in (tmp_path / "empty" / "report" / "report.html").read_text()
    write_results(tmp_path / "full")
    assert main(["report", "--results", str(tmp_path / "full"), "--out", str(tmp_path / "r")]) == 0
    assert "report.html" in capsys.readouterr().out and (tmp_path / "r" / "results.csv").is_file()
