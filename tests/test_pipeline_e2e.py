"""End to end on the local stack: real images -> S3 -> SQS -> enqueue -> transform -> collect -> SQL.

Everything goes over HTTP to the moto server; the handlers, the inference code and the runner
are the ones the demo and AWS use, and the transform runs through the real serving stack (the
SageMaker PyTorch inference toolkit + TorchServe on model.tar.gz, as the demo's default). The
model is a tiny random network (plumbing only).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import preserved_environ, sample_images, unique_name

from analytics.query import run_query
from dermscore import layout, reasons, results
from infra.runner import state_change_event

SPECIAL_KEY = "incoming/e2e/lésion été + copy (1).jpg"


@pytest.fixture(scope="module", autouse=True)
def _through_the_serving_stack(serving_mode):
    yield


def make_pipeline(endpoint: str, model_dir: Path | None, **kwargs):
    from infra.local import LocalPipeline

    name = unique_name()
    return LocalPipeline(model_dir, bucket=f"{name}-images", stack_name=name, endpoint=endpoint,
                         batching_window_s=0.5, visibility_timeout=kwargs.pop("visibility_timeout", 2),
                         overrides={"ModelName": f"{name}-model", **kwargs.pop("overrides", {})})


@pytest.fixture(scope="module")
def scored(moto_endpoint: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from score_the_sample(moto_endpoint, tiny_model, tmp_path_factory)


def score_the_sample(moto_endpoint: str, tiny_model: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """Ten real images (one under a key with spaces, unicode and '+'), a corrupt JPEG and an
    empty file go through the whole pipeline once; the tests below look at the outcome (also
    tests/test_iam_local.py, with every function under its own role)."""
    from infra.stack import use_endpoint

    files = sample_images(10)
    with preserved_environ():
        use_endpoint(moto_endpoint)
        p = make_pipeline(moto_endpoint, tiny_model)
        s3 = p.s3
        keys = p.upload(files[:9], "incoming/e2e/")
        s3.upload_file(str(files[9]), p.stack.bucket, SPECIAL_KEY)
        keys.append(SPECIAL_KEY)
        s3.put_object(Bucket=p.stack.bucket, Key="incoming/e2e/corrupt.jpg", Body=files[0].read_bytes()[:6000])
        s3.put_object(Bucket=p.stack.bucket, Key="incoming/e2e/empty.jpg", Body=b"")
        p.drain(timeout_s=120)
        out = tmp_path_factory.mktemp("export")
        counts = p.export(out)
        yield SimpleNamespace(pipeline=p, keys=keys, out=out, counts=counts)
        p.close()


def test_every_real_image_gets_one_row(scored) -> None:
    cols, rows = run_query("SELECT image_key, dt, prob_akiec + prob_bcc + prob_bkl + prob_df + prob_mel + prob_nv "
                           "+ prob_vasc AS total FROM predictions ORDER BY image_key", scored.out)
    assert [r[0] for r in rows] == sorted(scored.keys)
    assert all(r[2] == pytest.approx(1.0, abs=1e-4) for r in rows)
    assert all(isinstance(r[1], str) and len(r[1]) == 10 for r in rows)   # dt partition, as Athena sees it
    assert scored.counts["predictions"] == 1                             # one Parquet file for the one job
    assert scored.counts["reports"] == 3                                 # and its report page, CSV and facts


def test_one_json_document_per_image(scored) -> None:
    docs = [json.loads(p.read_text()) for p in sorted((scored.out / "images").rglob("*.json"))]
    assert len(docs) == 11                     # 10 scored, 1 refused by the transform (an image rejected
    for doc in docs:                           # by enqueue, the empty file, has its failure row only)
        if doc["status"] == results.SCORED:
            assert sum(doc[c] for c in results.PROB_COLUMNS) == pytest.approx(1.0, abs=1e-4)
            assert doc["image_key"] in scored.keys
        else:
            assert (doc["image_key"], doc["reason"]) == ("incoming/e2e/corrupt.jpg", reasons.CORRUPT)
    assert sum(d["status"] == results.SCORED for d in docs) == 10
    special = scored.out / layout.image_result_key(SPECIAL_KEY)[len("results/"):]
    assert json.loads(special.read_text())["image_key"] == SPECIAL_KEY


def test_bad_files_give_failure_rows_with_reasons(scored) -> None:
    _, rows = run_query("SELECT image_key, stage, reason, detail FROM failures ORDER BY image_key", scored.out)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("incoming/e2e/corrupt.jpg", "transform", reasons.CORRUPT),
        ("incoming/e2e/empty.jpg", "enqueue", reasons.ZERO_BYTE),
    ]
    assert all(r[3] for r in rows)


def test_sql_example_and_nothing_left_in_flight(scored) -> None:
    from analytics.query import TOP_MELANOMA_SQL

    cols, rows = run_query(TOP_MELANOMA_SQL, scored.out)
    assert cols[:2] == ["image_key", "prob_mel"] and len(rows) == 10
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    stack = scored.pipeline.stack
    assert stack.queue_depth() == {"visible": 0, "in_flight": 0}
    assert stack.queue_depth(dlq=True) == {"visible": 0, "in_flight": 0}
    assert len(scored.pipeline.runner.results) == 1 and scored.pipeline.runner.results[0]["status"] == "Completed"
    assert scored.pipeline.runner.mode == "serving"


def test_the_readme_query_runs_on_the_exported_results(scored, capsys) -> None:
    """The query the README shows after `make demo`, as printed there."""
    import re

    from dermscore.cli import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (sql,) = re.findall(r'bin/dermscore query "([^"]+)"', readme)
    assert main(["query", " ".join(sql.split()), "--results", str(scored.out)]) == 0
    out = capsys.readouterr().out
    assert "image_key" in out and "risk_level" in out and "(10 rows)" in out


def test_redelivered_batch_and_repeated_event_add_no_rows(moto_endpoint, tiny_model, tmp_path) -> None:
    from infra.stack import use_endpoint

    with preserved_environ():
        use_endpoint(moto_endpoint)
        with make_pipeline(moto_endpoint, tiny_model) as p:
            p.upload(sample_images(3), "incoming/redelivery/")
            messages = p.poller.receive()
            assert len(messages) == 4            # 3 images + the s3:TestEvent
            p.poller.dispatch(messages)
            p.poller.dispatch(messages)          # SQS redelivers the same batch before the job ran
            p.dispatcher.run_once()
            p.dispatcher.run_once()              # a second dispatcher run finds nothing new
            p.runner.run_pending()
            p.poller.dispatch(messages)          # ... and once more after it ran: the same part again,
            p.dispatcher.run_once()              # whose job exists
            assert p.runner.run_pending() == []  # no second job
            event_job = p.runner.results[0]
            assert event_job["status"] == "Completed"
            p.drain(timeout_s=60)
            job = p.stack.client("sagemaker").describe_transform_job(TransformJobName=event_job["job_name"])
            now = datetime.now(UTC)
            p.runner.deliver(state_change_event(job, "Completed", None, now, now))   # EventBridge repeats itself
            p.export(tmp_path)
    _, rows = run_query("SELECT count(*), count(DISTINCT image_key) FROM predictions", tmp_path)
    assert rows == [(3, 3)]
    assert len(list((tmp_path / "images").rglob("*.json"))) == 3


def test_failed_transform_job_gives_failure_rows(moto_endpoint, tmp_path) -> None:
    """No model registered: every attempt fails (the images are re-queued MAX_JOB_ATTEMPTS - 1
    times), then every image gets one failure row with the job's reason."""
    from infra.stack import use_endpoint

    with preserved_environ():
        use_endpoint(moto_endpoint)
        with make_pipeline(moto_endpoint, None) as p:
            p.upload(sample_images(2), "incoming/fail/")
            p.drain(timeout_s=60)
            attempts = int(p.stack.spec.collect_env["MAX_JOB_ATTEMPTS"])
            assert [r["status"] for r in p.runner.results] == ["Failed"] * attempts
            p.export(tmp_path)
    _, rows = run_query("SELECT image_key, stage, reason, detail FROM failures ORDER BY 1", tmp_path)
    assert [(r[1], r[2]) for r in rows] == [("transform", "job_failed")] * 2
    assert all("Could not find model" in r[3] for r in rows), rows
    assert run_query("SELECT count(*) FROM predictions", tmp_path)[1] == [(0,)]


def test_poison_message_goes_to_the_dlq(moto_endpoint, tiny_model) -> None:
    from infra.stack import use_endpoint

    with preserved_environ():
        use_endpoint(moto_endpoint)
        with make_pipeline(moto_endpoint, tiny_model, visibility_timeout=1, overrides={"MaxReceiveCount": 2}) as p:
            sqs = p.stack.client("sqs")
            sqs.send_message(QueueUrl=p.stack.queue_url, MessageBody="{this is not an S3 event")
            p.drain(timeout_s=60)
            assert p.stack.queue_depth() == {"visible": 0, "in_flight": 0}
            assert p.stack.queue_depth(dlq=True)["visible"] == 1     # the s3:TestEvent was consumed
            body = sqs.receive_message(QueueUrl=p.stack.dlq_url)["Messages"][0]["Body"]
            assert body == "{this is not an S3 event"


def test_demo_command_end_to_end(tiny_model, tmp_path, capsys) -> None:
    """`dermscore demo` as a user runs it, in a process of its own with its own server (tiny model:
    this test checks plumbing, not scores): a clean console (progress bars and the results, no
    traceback, no ERROR or WARNING line, no log record) and every log record in the log file."""
    import shutil
    import subprocess
    import sys

    from PIL import Image

    from dermscore.cli import main

    images = tmp_path / "images"
    images.mkdir()
    files = sample_images(4)
    for f in files[:3]:
        shutil.copy(f, images / f.name)
    # Every file is uploaded and ends in one place, whatever its name (S3 notifies on the prefix):
    shutil.copy(files[3], images / "IMG_0001.Jpg")                      # a JPEG with a mixed-case suffix
    (images / "readme.txt").write_text("not an image")                   # -> not_an_image
    with Image.open(files[0]) as im:
        im.save(images / "scan.webp", "WEBP")                            # -> unsupported_format
    out = tmp_path / "output"
    run = subprocess.run([sys.executable, "-m", "dermscore.cli", "demo", "--images", str(images), "--model",
                          str(tiny_model), "--out", str(out), "--batching-window", "0.5"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console
    for noise in ("Traceback", "ERROR", "WARNING", '"level":', " INFO "):
        assert noise not in console, f"{noise!r} on the console:\n{console}"
    printed = run.stdout
    assert "scored:   4 images, failures: 2" in printed
    assert "transform: SageMaker PyTorch inference toolkit 2.0.25 + TorchServe 0.12.0 (Java " in printed
    assert "images/s" in printed and str(out / "predictions") in printed
    assert "The 4 images with the highest melanoma probability" in printed   # the scored ones
    assert printed.count("incoming/demo/ISIC_") == 3          # the example query's table
    header = next(ln for ln in printed.splitlines() if ln.startswith("image_key"))
    assert all(c in header for c in ("prob_mel", "malignant_prob", "melanoma_flag", "risk_level", "ood_flag"))
    log = out / "dermscore.log"
    assert f"Logs:     {log}" in printed
    records = log.read_text()
    assert '"service":"dermscore-collect"' in records and "dermscore.stack" in records
    statuses = [json.loads(f.read_text())["status"] for f in (out / "images" / "demo").glob("*.json")]
    assert sorted(statuses) == [results.FAILED] * 2 + [results.SCORED] * 4   # both failures reached the transform

    assert main(["query", "SELECT image_key, reason FROM failures ORDER BY image_key", "--results", str(out)]) == 0
    table = capsys.readouterr().out
    assert "incoming/demo/readme.txt" in table and reasons.NOT_AN_IMAGE in table
    assert "incoming/demo/scan.webp" in table and reasons.UNSUPPORTED_FORMAT in table


def test_demo_refuses_to_run_without_a_trained_model(tmp_path, capsys) -> None:
    from dermscore.cli import main

    not_a_model = tmp_path / "nothing"
    not_a_model.mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--model", str(not_a_model), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert "is not a model folder" in capsys.readouterr().err
