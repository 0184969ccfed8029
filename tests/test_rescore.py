"""Re-scoring stored images with another model (handlers.rescore), on the local stack (moto server).

The archive is scored with model A, re-scored with B, then with B again: one row per upload and
model, B shown in each document with A in its history, the comparison queries over both; a run
killed mid-way and resumed ends with the same rows.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import SAMPLES, preserved_environ, unique_name

from analytics.query import named_queries, run_query
from batch.bundle import ModelMeta
from dermscore import layout, results
from handlers import rescore

IMAGES = SAMPLES.parent / "images_200x150"
COUNT = 400


def archive(n: int) -> list[Path]:
    files = sorted(IMAGES.glob("*.jpg"))[:n]
    if len(files) < n:
        pytest.skip(f"needs {n} images in {IMAGES}")
    return files


def sha(model_dir: Path) -> str:
    return ModelMeta.read(model_dir / "metadata.json").weights_sha256


def pipeline(endpoint: str, model_dir: Path):
    from infra.local import LocalPipeline

    name = unique_name()
    return LocalPipeline(model_dir, bucket=f"{name}-images", stack_name=name, endpoint=endpoint,
                         batching_window_s=0.5, visibility_timeout=2, overrides={"ModelName": f"{name}-model"})


def rows_per_model(out: Path) -> Counter:
    _, rows = run_query("SELECT weights_sha256, count(*), count(DISTINCT image_key) FROM predictions GROUP BY 1", out)
    assert all(n == distinct for _, n, distinct in rows)      # never two rows of one upload and model
    return Counter({model: n for model, n, _ in rows})


@pytest.fixture(scope="module")
def rescored(moto_endpoint, varied_model, tiny_model, tmp_path_factory):
    """400 images scored with A, re-scored with B twice: the export after each step."""
    from infra.stack import use_endpoint

    outs = {step: tmp_path_factory.mktemp(step) for step in ("a", "b", "bb")}
    with preserved_environ():
        use_endpoint(moto_endpoint)
        with pipeline(moto_endpoint, varied_model) as p:
            p.upload(archive(COUNT), "incoming/archive/")
            p.drain(timeout_s=300)
            p.export(outs["a"])
            p.stack.register_model(tiny_model)
            first = p.rescore({"prefix": "incoming/archive/"})
            p.drain(timeout_s=300)
            p.export(outs["b"])
            second = p.rescore({"prefix": "incoming/"})
            p.drain(timeout_s=300)
            p.export(outs["bb"])
    return outs, first, second


def test_each_model_has_exactly_one_row_per_image(rescored, varied_model, tiny_model) -> None:
    outs, first, second = rescored
    a, b = sha(varied_model), sha(tiny_model)
    assert rows_per_model(outs["a"]) == {a: COUNT}
    assert rows_per_model(outs["b"]) == {a: COUNT, b: COUNT}
    assert rows_per_model(outs["bb"]) == {a: COUNT, b: COUNT}               # the second re-score added nothing
    for run in (first, second):
        assert (run["done"], run["queued"], run["listed"]) == (True, COUNT, COUNT) and run["parts"]


def test_documents_show_the_latest_model_and_keep_the_first(rescored, varied_model, tiny_model) -> None:
    outs, _, _ = rescored
    docs = [json.loads(p.read_text()) for p in (outs["bb"] / "images").rglob("*.json")]
    assert len(docs) == COUNT
    for doc in docs:
        assert doc["weights_sha256"] == sha(tiny_model) and doc["status"] == results.SCORED
        assert [(h["model"], h["status"]) for h in doc["history"]] == [(sha(varied_model), results.SCORED)]
        assert {"top_class", "risk_level", "prob_mel", "at", "owner"} <= set(doc["history"][0])


def test_the_comparison_queries_cover_every_image(rescored, varied_model, tiny_model) -> None:
    outs, _, _ = rescored
    queries, params = named_queries(), [sha(varied_model)[:12], sha(tiny_model)[:12]]
    columns, rows = run_query(queries["compare-models"][1], outs["bb"], params)
    assert len(rows) == COUNT and len({r[0] for r in rows}) == COUNT
    flag = columns.index("melanoma_flag_change")
    assert {r[flag] for r in rows} <= {"same", "gained", "lost"}
    _, matrix = run_query(queries["model-transitions"][1], outs["bb"], params)
    assert sum(n for _, _, n, _ in matrix) == COUNT
    _, latest = run_query("SELECT weights_sha256, count(*) FROM latest_predictions GROUP BY 1", outs["bb"])
    assert latest == [(sha(tiny_model), COUNT)]
    # pictures of the two models never share a key
    _, keys = run_query("SELECT count(DISTINCT thumbnail_key), count(thumbnail_key) FROM predictions", outs["bb"])
    assert keys[0][0] == keys[0][1]


def test_a_run_killed_mid_way_resumes_to_the_same_rows(moto_endpoint, varied_model, tiny_model, tmp_path,
                                                        monkeypatch) -> None:
    """The re-score dies after writing its third part but before recording it; what was queued is
    scored meanwhile; the resumed run (``{"run": id}``) ends with one row per image and model."""
    from infra.stack import use_endpoint

    saved, real_save = [], rescore.save

    def dies_on_the_fourth_save(rt, progress) -> None:    # the first records the run, then one per part
        if len(saved) == 3:
            raise RuntimeError("killed")
        saved.append(progress.cursor)
        real_save(rt, progress)

    files = archive(COUNT)
    with preserved_environ():
        use_endpoint(moto_endpoint)
        with pipeline(moto_endpoint, varied_model) as p:
            p.upload(files, "incoming/archive/")
            p.drain(timeout_s=300)
            p.stack.register_model(tiny_model)
            monkeypatch.setattr(rescore, "CHUNK_IMAGES", 100)
            monkeypatch.setattr(rescore, "save", dies_on_the_fourth_save)
            run = rescore.new_run_id()
            with pytest.raises(RuntimeError, match="killed"):
                p.rescore({"run": run, "prefix": "incoming/archive/"})
            p.drain(timeout_s=300)                         # the two recorded parts (and the third) are scored
            monkeypatch.setattr(rescore, "save", real_save)
            resumed = p.rescore({"run": run})
            p.drain(timeout_s=300)
            p.export(tmp_path)
    assert resumed["done"] and resumed["run"] == run
    assert rows_per_model(tmp_path) == {sha(varied_model): COUNT, sha(tiny_model): COUNT}


def test_requests_are_checked_before_anything_is_queued() -> None:
    for bad, message in (({"prefix": "results/"}, "not under incoming/"), ({"since": "2026-02-30"}, "not a date"),
                         ({"since": "2026-02-02", "until": "2026-02-01"}, "after"),
                         ({"keys": [f"incoming/{i}" for i in range(rescore.MAX_KEYS + 1)]}, "at most"),
                         ({"keys": ["incoming/a.jpg", "results/images/a.jpg.json"]}, "not under incoming/")):
        with pytest.raises(rescore.BadRequest, match=message):
            rescore.Request.of(bad)
    req = rescore.Request.of({"prefix": "incoming/x/", "since": "2026-01-02", "until": "2026-01-03"})
    from datetime import UTC, datetime

    assert req.wants("incoming/x/a.jpg", datetime(2026, 1, 2, 23, tzinfo=UTC))
    assert not req.wants("incoming/x/a.jpg", datetime(2026, 1, 4, tzinfo=UTC))
    assert not req.wants("incoming/y/a.jpg", datetime(2026, 1, 2, tzinfo=UTC))


@pytest.fixture()
def stack(make_stack):
    s = make_stack()
    yield s
    s.stop()


def test_what_enqueue_refused_is_skipped_and_named_keys_may_be_missing(stack) -> None:
    """Folder markers, empty objects and unsafe keys already have their failure row: skipped with
    their reason. A named key that no longer exists is counted, not queued. ETags lose their quotes.
    (Also collected by test_iam_local: under the function's own role.)"""
    s3 = stack.client("s3")
    for key, body in (("incoming/k/a.jpg", b"x" * 10), ("incoming/k/", b""), ("incoming/k/empty.jpg", b""),
                      ("incoming/k/./b.jpg", b"y" * 10)):
        s3.put_object(Bucket=stack.bucket, Key=key, Body=body)
    listed = stack.invoke("rescore", {"prefix": "incoming/k/"})
    assert (listed["queued"], listed["skipped"]) == (1, {"folder_marker": 1, "zero_byte": 1, "unsafe_key": 1})
    named = stack.invoke("rescore", {"keys": ["incoming/k/a.jpg", "incoming/k/gone.jpg"]})
    assert (named["queued"], named["skipped"], named["done"]) == (1, {"not_found": 1}, True)
    part = s3.get_object(Bucket=stack.bucket, Key=named["parts"][0])["Body"].read().decode()
    etag = s3.head_object(Bucket=stack.bucket, Key="incoming/k/a.jpg")["ETag"].strip('"')
    assert json.loads(part)["etag"] == etag
    assert stack.invoke("rescore", {"prefix": "results/"}) == {"error": "prefix 'results/' is not under incoming/"}
    record = json.loads(s3.get_object(Bucket=stack.bucket, Key=layout.rescore_key(named["run"]))["Body"].read())
    assert record["queued"] == 1 and record["done"]


def test_demo_rescore_prints_the_comparison_and_the_report_draws_it(varied_model, tiny_model, tmp_path) -> None:
    """`dermscore demo --rescore MODEL_DIR` as a user runs it (its own process and server; the
    container code in-process for speed), then `dermscore report --compare A B` on its output."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import sample_images

    images = tmp_path / "images"
    images.mkdir()
    for f in sample_images(6):
        shutil.copy(f, images / f.name)
    out = tmp_path / "output"
    env = {**os.environ, "DERMSCORE_TRANSFORM": "inprocess"}
    run = subprocess.run([sys.executable, "-m", "dermscore.cli", "demo", "--images", str(images), "--model",
                          str(varied_model), "--rescore", str(tiny_model), "--out", str(out),
                          "--batching-window", "0.5"], capture_output=True, text=True, timeout=600, env=env)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console
    assert "Traceback" not in console and "ERROR" not in console
    assert "6 images scored by both models" in run.stdout
    assert "top_class_a" in run.stdout and "melanoma_flag_change" in run.stdout
    assert "FROM latest_predictions ORDER BY prob_mel" in run.stdout     # the example: one row per upload
    assert rows_per_model(out) == {sha(varied_model): 6, sha(tiny_model): 6}

    report_run = subprocess.run([sys.executable, "-m", "dermscore.cli", "report", "--results", str(out), "--compare",
                                 sha(varied_model)[:10], sha(tiny_model)[:10]], capture_output=True, text=True,
                                timeout=300, env=env)
    assert report_run.returncode == 0, report_run.stdout + report_run.stderr
    page = (out / "report" / "compare.html").read_text()
    _, rows = run_query(named_queries()["compare-models"][1], out, [sha(varied_model), sha(tiny_model)])
    assert len(rows) == 6
    cells = [int(n) for n in re.findall(r"<td(?: class=\"same\")?>(\d+)</td>", page)]
    assert sum(cells) == 6                     # the transition matrix covers every image
    wrong = subprocess.run([sys.executable, "-m", "dermscore.cli", "report", "--results", str(out), "--compare",
                            "ffffff", sha(tiny_model)[:10]], capture_output=True, text=True, timeout=300, env=env)
    assert wrong.returncode == 2 and "no model matches 'ffffff'" in wrong.stderr and "Traceback" not in wrong.stderr


def test_a_run_short_of_time_hands_itself_on_and_finishes(stack, monkeypatch) -> None:
    """With less than HAND_ON_MS left after a step, the function invokes itself with the run's id
    (asynchronously; locally LocalLambda runs it at once) and the next invocation finishes the run."""
    from types import SimpleNamespace

    from infra.scheduler import LocalLambda

    s3 = stack.client("s3")
    for i in range(5):
        s3.put_object(Bucket=stack.bucket, Key=f"incoming/h/{i}.jpg", Body=b"x" * 10)
    monkeypatch.setattr(rescore, "CHUNK_IMAGES", 2)
    lambda_ = LocalLambda(stack)
    stack.inject("rescore", lambda_=lambda_)
    left = iter([rescore.HAND_ON_MS + 1, rescore.HAND_ON_MS - 1])
    context = SimpleNamespace(function_name=f"{stack.stack_name}-rescore",
                              get_remaining_time_in_millis=lambda: next(left))
    first = rescore.handle({"prefix": "incoming/h/"}, context, stack.runtime("rescore"))
    assert (first["done"], first["queued"]) == (False, 2)
    assert lambda_.invocations == [("rescore", {"run": first["run"]})]
    record = json.loads(s3.get_object(Bucket=stack.bucket, Key=layout.rescore_key(first["run"]))["Body"].read())
    assert (record["done"], record["queued"], len(record["parts"])) == (True, 5, 3)
