"""Athena named queries (template.yaml) vs their local DuckDB runs: same answers on the same data.

Images go through the local stack (moto server, the real handlers and inference, a random
model whose outputs vary between images and whose melanoma threshold makes some rows high risk); the export is what
Athena's tables would hold. Each named query's SQL text is read from the template and run in
DuckDB with the documented dialect shim (``analytics.query.ATHENA_SHIM``); its answer is compared
with the same question answered independently in Python over the Parquet files.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pyarrow.dataset as ds
import pytest
from conftest import preserved_environ, sample_images, unique_name

from analytics.query import named_queries, run_query
from dermscore import reasons

OLD_DT = "2020-01-01"  # outside every query's window: must not show up


@pytest.fixture(scope="module")
def exported(moto_endpoint: str, varied_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from infra.local import LocalPipeline
    from infra.stack import use_endpoint

    model_dir = varied_model
    files = sample_images(8)
    out = tmp_path_factory.mktemp("export")
    name = unique_name()
    with preserved_environ():
        use_endpoint(moto_endpoint)
        with LocalPipeline(model_dir, bucket=f"{name}-images", stack_name=name, endpoint=moto_endpoint,
                           batching_window_s=0.5, visibility_timeout=2,
                           overrides={"ModelName": f"{name}-model", "HeatmapMode": "high"}) as p:
            keys = p.upload(files, "incoming/q/")
            s3 = p.s3
            s3.put_object(Bucket=p.stack.bucket, Key="incoming/q/corrupt.jpg", Body=files[0].read_bytes()[:5000])
            s3.put_object(Bucket=p.stack.bucket, Key="incoming/q/empty.jpg", Body=b"")
            s3.put_object(Bucket=p.stack.bucket, Key="incoming/q/text.png", Body=b"hello, not a picture")
            p.drain(timeout_s=120)
            p.export(out)
    # An old partition of each table (a copy of today's file): outside every window.
    for table in ("predictions", "failures"):
        src = sorted((out / table).glob("dt=*/*.parquet"))[0]
        (out / table / f"dt={OLD_DT}").mkdir()
        shutil.copy(src, out / table / f"dt={OLD_DT}" / src.name)
    yield SimpleNamespace(out=out, keys=keys, files=files)


def rows_of(out: Path, table: str) -> list[dict]:
    dataset = ds.dataset(out / table, format="parquet", partitioning="hive")
    return dataset.to_table().to_pylist()


def since(days: int) -> str:
    return (datetime.now(UTC).date() - timedelta(days=days)).isoformat()


def as_dicts(columns: list[str], rows: list[tuple]) -> list[dict]:
    return [dict(zip(columns, r, strict=False)) for r in rows]


def test_the_template_has_the_three_named_queries() -> None:
    assert {"high-melanoma-risk-triage", "per-day-class-counts", "failures-by-reason"} <= set(named_queries())


def test_high_risk_triage(exported) -> None:
    cols, rows = run_query(named_queries()["high-melanoma-risk-triage"][1], exported.out)
    got = as_dicts(cols, rows)
    preds = [r for r in rows_of(exported.out, "predictions") if str(r["dt"]) >= since(7) and r["risk_level"] == "high"]
    preds.sort(key=lambda r: (not r["melanoma_flag"], -r["prob_mel"], -r["malignant_prob"]))
    assert 0 < len(got) == len(preds) < len(exported.keys)  # some, not all: the filter did something
    assert {g["image_key"] for g in got} == {p["image_key"] for p in preds}
    by_key = {p["image_key"]: p for p in preds}
    # same order (rows that tie on every ORDER BY column may come in either order, in both engines)
    sort_key = [(p["melanoma_flag"], p["prob_mel"], p["malignant_prob"]) for p in preds]
    assert [(by_key[g["image_key"]]["melanoma_flag"], by_key[g["image_key"]]["prob_mel"],
             by_key[g["image_key"]]["malignant_prob"]) for g in got] == sort_key
    for g in got:
        p = by_key[g["image_key"]]
        assert g["melanoma_flag"] == p["melanoma_flag"] and g["risk_level"] == "high"
        assert g["prob_mel"] == pytest.approx(round(p["prob_mel"], 3), abs=1e-6)
        assert g["malignant_prob"] == pytest.approx(round(p["malignant_prob"], 3), abs=1e-6)
        assert g["top_class_name"] == p["top_class_name"] and g["model_version"] == p["model_version"]


def test_per_day_class_counts(exported) -> None:
    cols, rows = run_query(named_queries()["per-day-class-counts"][1], exported.out)
    got = as_dicts(cols, rows)
    expected: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows_of(exported.out, "predictions"):
        if str(r["dt"]) >= since(30):
            e = expected[(str(r["dt"]), r["top_class"], r["top_class_name"])]
            e[0] += 1
            e[1] += r["risk_level"] == "high"
    assert {(g["dt"], g["top_class"], g["top_class_name"]): [g["images"], g["high_risk"]] for g in got} == expected
    assert sum(g["images"] for g in got) == len(exported.keys)  # the old partition is not counted
    order = [(g["dt"], g["images"]) for g in got]
    assert order == sorted(order, key=lambda t: (t[0], t[1]), reverse=True)


def test_failures_by_reason(exported) -> None:
    cols, rows = run_query(named_queries()["failures-by-reason"][1], exported.out)
    got = as_dicts(cols, rows)
    counts: Counter = Counter()
    example: dict[tuple, str] = {}
    for r in rows_of(exported.out, "failures"):
        if str(r["dt"]) >= since(30):
            k = (str(r["dt"]), r["stage"], r["reason"])
            counts[k] += 1
            example[k] = min(example.get(k, r["image_key"]), r["image_key"])
    assert {(g["dt"], g["stage"], g["reason"]): (g["images"], g["example_key"]) for g in got} == \
        {k: (n, example[k]) for k, n in counts.items()}
    found = {(g["stage"], g["reason"]) for g in got}
    assert {("enqueue", reasons.ZERO_BYTE), ("transform", reasons.CORRUPT)} <= found
    assert any(reason == reasons.NOT_AN_IMAGE for _, reason in found)


def test_cli_runs_named_queries(exported, capsys) -> None:
    from dermscore.cli import main

    assert main(["query", "--list"]) == 0
    assert "high-melanoma-risk-triage" in capsys.readouterr().out
    assert main(["query", "--named", "failures-by-reason", "--results", str(exported.out)]) == 0
    assert "zero_byte" in capsys.readouterr().out
    assert main(["query", "--named", "no-such-query", "--results", str(exported.out)]) == 2


def test_new_result_fields_on_the_local_stack(exported) -> None:
    """image_sha256 is the sha256 of the uploaded bytes; processing time is recorded."""
    sha = {f"incoming/q/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest() for f in exported.files}
    _, rows = run_query("SELECT image_key, image_sha256, processing_ms, ood_score FROM predictions "
                        f"WHERE dt <> '{OLD_DT}'", exported.out)
    assert {r[0]: r[1] for r in rows} == sha
    assert all(r[2] > 0 and r[3] is not None for r in rows)


def test_high_risk_images_link_heatmaps_stored_beside_their_json(exported) -> None:
    """HeatmapMode=high (the model environment of template.yaml) stores Grad-CAM + thumbnail for
    high-risk images only; JSON and Parquet link them; no original bytes are stored."""
    import json

    from PIL import Image

    from dermscore import layout

    _, rows = run_query("SELECT image_key, risk_level, heatmap_key, thumbnail_key, heatmap_class, etag, "
                        f"weights_sha256 FROM predictions WHERE dt <> '{OLD_DT}'", exported.out)
    assert any(r[1] == "high" for r in rows) and any(r[1] != "high" for r in rows)
    for key, risk, heat, thumb, cls, etag, model in rows:
        doc = json.loads((exported.out / layout.image_result_key(key)[len("results/"):]).read_text())
        assert doc["heatmap_key"] == heat and doc["thumbnail_key"] == thumb
        if risk != "high":
            assert heat is None and thumb is None and cls is None
            continue
        assert heat == layout.image_artifact_key(key, etag, layout.HEATMAP_SUFFIX, model)
        assert cls in ("mel", "akiec", "bcc")
        for k, fmt in ((heat, "PNG"), (thumb, "JPEG")):
            with Image.open(exported.out / k[len("results/"):]) as im:
                assert im.format == fmt and im.size == (64, 64) and not im.getexif()
    stored = {p.read_bytes() for p in (exported.out / "images").rglob("*") if p.is_file()}
    assert not stored & {f.read_bytes() for f in exported.files}
