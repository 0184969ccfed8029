"""The collect handler against the moto server: join, Parquet, per-image JSON, failure rows."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import UTC, datetime

import pyarrow.parquet as pq
import pytest
from conftest import recorded_event, stage_transform_job

from dermscore import layout, results, scoring
from dermscore.labels import CLASSES
from dermscore.messages import ManifestLine, OutputLine, Retry
from handlers import claims
from infra.runner import state_change_event

MODEL = {"name": "test", "version": "0", "weights_sha256": "0" * 64}
ENDED = datetime(2026, 11, 23, 12, 30, tzinfo=UTC)


def probs(i: int) -> list[float]:
    raw = [1.0 + (i + j) % 7 for j in range(len(CLASSES))]
    return [v / sum(raw) for v in raw]


@pytest.fixture()
def job(make_stack):
    """A stack with a manifest of three images and its transform output (one error line)."""
    stack = make_stack()
    name = f"{stack.job_prefix}-0123456789abcdef"
    items = [ManifestLine(stack.bucket, k, f"e{i}", 100)
             for i, k in enumerate(["incoming/a.jpg", "incoming/b c+d é.jpg", "incoming/corrupt.jpg"])]
    out = [scoring.score_line(items[0], probs(0), MODEL, 0.5, 600, 450),
           scoring.score_line(items[1], probs(1), MODEL, 0.5, 640, 480),
           OutputLine.error(items[2], "corrupt_image", "image file is truncated")]
    request = stage_transform_job(
        stack, name, items, out, TransformJobArn=f"arn:aws:sagemaker:us-east-1:123456789012:transform-job/{name}")
    return stack, name, items, request


def parquet_rows(stack, prefix: str) -> list[dict]:
    s3 = stack.client("s3")
    rows = []
    for key in stack.list_keys(prefix):
        rows += pq.read_table(io.BytesIO(s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read())).to_pylist()
    return rows


def test_completed_job_writes_parquet_json_and_failures(job) -> None:
    stack, name, items, request = job
    out = stack.invoke("collect", state_change_event(request, "Completed", None, ENDED, ENDED))
    assert out == {"job_name": name, "status": "Completed", "scored": 2, "failed": 1}

    parquet = layout.prediction_partition_key("2026-11-23", layout.job_file_name(name, layout.manifest_key(name)))
    assert stack.list_keys(layout.PREDICTIONS) == [parquet]    # one file per input file of the job
    s3 = stack.client("s3")
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=stack.bucket, Key=parquet)["Body"].read()))
    assert table.schema.equals(results.PREDICTION_SCHEMA)
    rows = table.to_pylist()
    assert [r["image_key"] for r in rows] == ["incoming/a.jpg", "incoming/b c+d é.jpg"]
    for r in rows:
        assert sum(r[c] for c in results.PROB_COLUMNS) == pytest.approx(1.0, abs=1e-5)
        assert r["job_name"] == name and r["scored_at"] == ENDED and r["model_name"] == "test"

    doc = json.loads(s3.get_object(Bucket=stack.bucket, Key=layout.image_result_key(items[1].key))["Body"].read())
    assert doc["image_key"] == "incoming/b c+d é.jpg" and doc["width"] == 640 and doc["status"] == results.SCORED
    assert sum(doc[c] for c in results.PROB_COLUMNS) == pytest.approx(1.0, abs=1e-5)
    assert doc["owner"] == claims.owner_of(name, layout.manifest_key(name), 1)   # the line whose outcome counts
    refused = json.loads(s3.get_object(Bucket=stack.bucket, Key=layout.image_result_key(items[2].key))["Body"].read())
    assert (refused["status"], refused["reason"]) == (results.FAILED, "corrupt_image")
    assert len(stack.list_keys(layout.IMAGES)) == 3            # one document per image, refused ones too

    failures = parquet_rows(stack, layout.FAILURES)
    assert [(f["image_key"], f["stage"], f["reason"]) for f in failures] == [
        ("incoming/corrupt.jpg", "transform", "corrupt_image")]


def test_repeated_event_overwrites_instead_of_duplicating(job) -> None:
    stack, name, _, request = job
    event = state_change_event(request, "Completed", None, ENDED, ENDED)
    stack.invoke("collect", event)
    before = sorted(stack.list_keys("results/"))
    stack.invoke("collect", event)
    assert sorted(stack.list_keys("results/")) == before
    assert len(parquet_rows(stack, layout.PREDICTIONS)) == 2
    assert len(parquet_rows(stack, layout.FAILURES)) == 1


def test_failed_job_requeues_its_images_as_the_next_attempt(job) -> None:
    stack, name, items, request = job
    event = state_change_event(request, "Failed", "AlgorithmError: boom", ENDED, ENDED)
    assert stack.invoke("collect", event)["requeued"] == 3
    stack.invoke("collect", event)      # EventBridge repeats: sent again (a retry scored twice is collected once)
    assert stack.list_keys("results/") == []
    sqs = stack.client("sqs")
    bodies = []
    while msgs := sqs.receive_message(QueueUrl=stack.queue_url, MaxNumberOfMessages=10).get("Messages"):
        bodies += [m["Body"] for m in msgs]
    retries = [r for r in map(Retry.from_json, bodies) if r is not None]   # (the queue's s3:TestEvent is none)
    assert len(retries) == 6
    assert {r.line for r in retries} == {it.next_attempt() for it in items}
    assert {(r.failed_job, r.reason) for r in retries} == {(name, "AlgorithmError: boom")}


def test_failed_job_gives_every_image_a_failure_row(job) -> None:
    stack, name, items, request = job
    last = int(stack.spec.collect_env["MAX_JOB_ATTEMPTS"]) - 1   # the images' final attempt
    stack.client("s3").put_object(Bucket=stack.bucket, Key=layout.manifest_key(name), Body="".join(
        replace(it, attempt=last).to_json() + "\n" for it in items).encode())
    out = stack.invoke("collect", state_change_event(request, "Failed", "AlgorithmError: boom", ENDED, ENDED))
    assert out["failed"] == 3 and out["scored"] == 0
    assert stack.list_keys(layout.PREDICTIONS) == []
    failures = parquet_rows(stack, layout.FAILURES)
    assert sorted(f["image_key"] for f in failures) == sorted(it.key for it in items)
    assert {(f["stage"], f["reason"], f["detail"], f["job_name"]) for f in failures} == {
        ("transform", "job_failed", "AlgorithmError: boom", name)}


def test_missing_output_lines_are_failures_not_silence(job) -> None:
    stack, name, items, request = job
    s3 = stack.client("s3")
    out_key = f"{layout.transform_output_prefix(name)}{name}.jsonl.out"
    first = s3.get_object(Bucket=stack.bucket, Key=out_key)["Body"].read().decode().splitlines()[0]
    s3.put_object(Bucket=stack.bucket, Key=out_key, Body=(first + "\n").encode())
    out = stack.invoke("collect", state_change_event(request, "Completed", None, ENDED, ENDED))
    assert (out["scored"], out["failed"]) == (1, 2)
    assert {f["reason"] for f in parquet_rows(stack, layout.FAILURES)} == {"missing_output"}


def test_events_of_other_jobs_and_states_are_ignored(job) -> None:
    stack, name, _, request = job
    other = dict(request, TransformJobName="someone-else-123")
    assert stack.invoke("collect", state_change_event(other, "Completed", None, ENDED, ENDED))["ignored"]
    # a sibling stack named "<stack>-x": its job names start with this stack's prefix too
    sibling = dict(request, TransformJobName=f"{stack.job_prefix}-x-0123456789abcdef")
    assert stack.invoke("collect", state_change_event(sibling, "Completed", None, ENDED, ENDED))["ignored"]
    assert stack.invoke("collect", state_change_event(request, "InProgress", None, ENDED, ENDED))["ignored"]
    assert stack.list_keys("results/") == []


def test_collect_rule_pattern_routes_only_this_stacks_terminal_events(job) -> None:
    from infra.runner import matches

    stack, name, _, request = job
    pattern = stack.spec.collect_event_pattern
    assert matches(pattern, state_change_event(request, "Completed", None, ENDED, ENDED))
    assert matches(pattern, state_change_event(request, "Failed", "x", ENDED, ENDED))
    assert not matches(pattern, state_change_event(request, "InProgress", None, ENDED, ENDED))
    assert not matches(pattern, state_change_event(dict(request, TransformJobName="other-1"), "Completed", None,
                                                   ENDED, ENDED))


def test_recorded_state_change_event_is_collected(job) -> None:
    """GIVEN a "SageMaker Transform Job State Change" event as AWS documents it (times in epoch
    milliseconds, S3Prefix input) WHEN collect handles it THEN the job's rows land in the
    partition of its end time."""
    stack, name, items, _ = job
    event = recorded_event("transform_job_state_change_completed.json", bucket=stack.bucket, job=name)
    # the recorded input is a shard folder; this job's manifest is one file: point the event at it
    event["detail"]["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] = \
        f"s3://{stack.bucket}/{layout.manifest_key(name)}"
    out = stack.invoke("collect", event)
    assert out == {"job_name": name, "status": "Completed", "scored": 2, "failed": 1}
    rows = parquet_rows(stack, layout.PREDICTIONS)
    assert {r["image_key"] for r in rows} == {items[0].key, items[1].key}
    assert {r["scored_at"] for r in rows} == {datetime(2026, 11, 23, 11, 30, 5, tzinfo=UTC)}
    assert stack.list_keys(layout.PREDICTIONS) == [layout.prediction_partition_key(
        "2026-11-23", layout.job_file_name(name, layout.manifest_key(name)))]


def test_a_collected_job_gets_its_marker_last(job) -> None:
    """collected/<job>.json tells the reconciler that the job's outcome is written: for a completed
    job and for a failed one (whose images went back to the queue), and not for an ignored event."""
    stack, name, _, request = job
    assert stack.invoke("collect", state_change_event(request, "InProgress", None, ENDED, ENDED))["ignored"]
    assert stack.list_keys(layout.COLLECTED) == []
    stack.invoke("collect", state_change_event(request, "Completed", None, ENDED, ENDED))
    s3 = stack.client("s3")
    marker = json.loads(s3.get_object(Bucket=stack.bucket, Key=layout.collected_key(name))["Body"].read())
    assert marker == {"job": name, "status": "Completed", "finished_at": ENDED.isoformat(), "scored": 2, "failed": 1}
    stack.invoke("collect", state_change_event(request, "Failed", "AlgorithmError: boom", ENDED, ENDED))
    marker = json.loads(s3.get_object(Bucket=stack.bucket, Key=layout.collected_key(name))["Body"].read())
    assert (marker["status"], marker["requeued"]) == ("Failed", 3)


def test_an_event_for_a_job_the_reconciler_gave_up_on_is_ignored(job) -> None:
    """Its images have 'unreconciled' failure rows already: a late event must not add result rows."""
    from handlers import collect

    stack, name, _, request = job
    collect.mark(stack.runtime("collect"), name, collect.UNRECONCILED, images=3)
    out = stack.invoke("collect", state_change_event(request, "Completed", None, ENDED, ENDED))
    assert out["ignored"] and stack.list_keys("results/") == []


def test_state_change_event_from_describe_transform_job_is_what_sagemaker_sends(job) -> None:
    """The reconciler's event for a lost one: the recorded event's envelope and detail fields, built
    from a DescribeTransformJob response (datetimes -> epoch ms), and collected the same way."""
    from handlers import collect

    stack, name, items, _ = job
    recorded = recorded_event("transform_job_state_change_completed.json", bucket=stack.bucket, job=name)
    detail = dict(recorded["detail"])
    description = {**{k: v for k, v in detail.items() if k not in ("Tags",)},
                   **{k: datetime.fromtimestamp(detail[k] / 1000, tz=UTC)
                      for k in ("CreationTime", "TransformStartTime", "TransformEndTime")},
                   "ResponseMetadata": {"HTTPStatusCode": 200}}
    event = collect.state_change_event(description)
    assert {k: event[k] for k in ("detail-type", "source", "account", "region", "resources")} == {
        k: recorded[k] for k in ("detail-type", "source", "account", "region", "resources")}
    assert event["detail"] == {k: v for k, v in detail.items() if k != "Tags"}
    assert event["time"] == "2026-11-23T11:30:05Z"                         # the job's end
    assert event["id"] == collect.state_change_event(description)["id"]    # the same job and state: same id
    event["detail"]["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] = \
        f"s3://{stack.bucket}/{layout.manifest_key(name)}"
    assert stack.invoke("collect", event) == {"job_name": name, "status": "Completed", "scored": 2, "failed": 1}


def second_job(stack, lines: list[ManifestLine], suffix: str = "fedcba9876543210") -> tuple[str, dict]:
    """Another job of this stack over ``lines``, every line scored: (its name, its request)."""
    name = f"{stack.job_prefix}-{suffix}"
    out = [scoring.score_line(ln, probs(i), MODEL, 0.5, 600, 450) for i, ln in enumerate(lines)]
    return name, stage_transform_job(stack, name, lines, out)


def test_an_upload_another_job_collected_first_gets_no_second_row(job) -> None:
    """A duplicate event dispatched in a second job: whichever job is collected first owns the
    upload (its document); the other writes no row for it."""
    stack, name, items, request = job
    other, other_request = second_job(stack, [items[0]])
    assert stack.invoke("collect", state_change_event(other_request, "Completed", None, ENDED, ENDED))["scored"] == 1
    out = stack.invoke("collect", state_change_event(request, "Completed", None, ENDED, ENDED))
    assert (out["scored"], out["failed"]) == (1, 1)
    rows = parquet_rows(stack, layout.PREDICTIONS)
    assert sorted((r["image_key"], r["job_name"]) for r in rows) == [(items[0].key, other), (items[1].key, name)]
    stack.invoke("collect", state_change_event(request, "Completed", None, ENDED, ENDED))   # repeated: the same
    assert len(parquet_rows(stack, layout.PREDICTIONS)) == 2


def test_the_same_upload_twice_in_one_job_gets_one_row(make_stack) -> None:
    stack = make_stack()
    line = ManifestLine(stack.bucket, "incoming/twice.jpg", "e1", 10)
    name, request = second_job(stack, [line, line])
    out = stack.invoke("collect", state_change_event(request, "Completed", None, ENDED, ENDED))
    assert (out["scored"], out["failed"]) == (1, 0)
    assert len(parquet_rows(stack, layout.PREDICTIONS)) == 1


def test_a_reupload_gets_its_own_row_and_the_document_shows_the_newer_upload(make_stack) -> None:
    """Two uploads of one key (ETags v1, v2; S3 sequencers order them) collected newest first: both
    get a row, the key's document shows v2 and remembers v1, and a late duplicate of v1 gets none."""
    stack = make_stack()
    old = ManifestLine(stack.bucket, "incoming/re.jpg", "v1", 10, sequencer="0A")
    new = ManifestLine(stack.bucket, "incoming/re.jpg", "v2", 10, sequencer="0B")
    for i, line in enumerate([new, old, old]):          # the second `old` is a duplicate event
        _, request = second_job(stack, [line], suffix=f"{i:016x}")
        stack.invoke("collect", state_change_event(request, "Completed", None, ENDED, ENDED))
    assert sorted(r["etag"] for r in parquet_rows(stack, layout.PREDICTIONS)) == ["v1", "v2"]
    doc = json.loads(stack.client("s3").get_object(Bucket=stack.bucket,
                                                   Key=layout.image_result_key(old.key))["Body"].read())
    assert doc["etag"] == "v2" and [u["etag"] for u in doc["history"]] == ["v1"]


def test_sequencers_compare_as_s3_documents() -> None:
    assert claims.newer("0B", "0A") and not claims.newer("0A", "0B")
    assert claims.newer("100", "FF")                    # the shorter is left-padded with zeros
    assert claims.newer("", "0A") and claims.newer("0A", "") and claims.newer("0A", "0A")   # the latest collected
    superseded = {"reason": "superseded", "sequencer": "0F"}
    assert not claims.shows(superseded, {"sequencer": "0A"}) and claims.shows({"sequencer": "0A"}, superseded)


def test_an_upload_is_remembered_however_often_its_key_is_uploaded_again() -> None:
    """A key uploaded more often than the document's history holds: a late duplicate line of its
    first upload still finds that upload's owner (in its archived claim) and writes no second row.
    In-process S3 (moto's mock_aws): claims.place alone."""
    import boto3
    from moto import mock_aws

    from dermscore import results
    from dermscore.messages import ManifestLine
    from handlers import claims

    def outcome(etag: str, owner: str, sequencer: str) -> claims.Outcome:
        line = ManifestLine("claims", "incoming/again.jpg", etag, 10, sequencer=sequencer)
        return claims.Outcome(line, owner, {"status": results.SCORED})

    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="claims")
        uploads = claims.HISTORY + 3
        for i in range(uploads):                      # each upload of the key collected once, in order
            assert claims.place(s3, "claims", outcome(f"{i:032x}", f"job-{i}/part#0", f"{i:08X}"))
        doc = json.loads(s3.get_object(Bucket="claims", Key=layout.image_result_key("incoming/again.jpg"))
                         ["Body"].read())
        assert doc["etag"] == f"{uploads - 1:032x}" and len(doc["history"]) == claims.HISTORY
        first = outcome(f"{0:032x}", "job-late/part#7", "00000000")     # a duplicate line of the first upload
        assert claims.place(s3, "claims", first) is False
        assert claims.place(s3, "claims", outcome(f"{0:032x}", "job-0/part#0", "00000000")) is True
        assert claims.place(s3, "claims", outcome(f"{uploads - 1:032x}", "job-other/part#1", "F")) is False


def test_each_model_gets_one_outcome_per_upload_and_the_document_shows_the_latest() -> None:
    """One upload scored by model A, re-scored by B, re-scored by B again (another job), plus late
    duplicates of each: A and B own one claim each, the second B and the duplicates none; the
    document shows B with A in its history; a later B failure (the object deleted since) counts as
    its own outcome but leaves B's score on show. In-process S3 (moto's mock_aws): claims.place alone."""
    import boto3
    from moto import mock_aws

    from dermscore import results

    arrival = ManifestLine("claims", "incoming/rescored.jpg", "e1", 10, sequencer="0A")
    line = replace(arrival, sequencer="", rescore=True)      # as handlers.rescore lists it

    def scored(model: str, owner: str, at: str, of: ManifestLine = line) -> claims.Outcome:
        doc = {"status": results.SCORED, "weights_sha256": model, "model_version": model[:3], "top_class": model[:1],
               "risk_level": "low", "prob_mel": 0.1, "scored_at": at}
        return claims.Outcome(of, owner, doc)

    a, b = "a" * 64, "b" * 64
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="claims")
        assert claims.place(s3, "claims", scored(a, "job-a/part#0", "2026-12-01T00:00:00+00:00", arrival))
        assert claims.place(s3, "claims", scored(b, "job-b/part#0", "2026-12-02T00:00:00+00:00"))
        # a duplicate arrival line, scored once B is deployed: the upload has its outcome already
        assert not claims.place(s3, "claims", scored(b, "job-dup/part#5", "2026-12-02T01:00:00+00:00", arrival))
        assert not claims.place(s3, "claims", scored(b, "job-b2/part#3", "2026-12-03T00:00:00+00:00"))
        assert not claims.place(s3, "claims", scored(a, "job-a-dup/part#1", "2026-12-04T00:00:00+00:00", arrival))
        assert claims.place(s3, "claims", scored(a, "job-a/part#0", "2026-12-01T00:00:00+00:00", arrival))   # repeated
        gone = claims.Outcome(line, "job-c/part#0", {"status": results.FAILED, "reason": "read_error",
                                                      "failed_at": "2026-12-05T00:00:00+00:00"})
        assert claims.place(s3, "claims", gone)
        doc = json.loads(s3.get_object(Bucket="claims", Key=layout.image_result_key(line.key))["Body"].read())
    assert (doc["weights_sha256"], doc["owner"], doc["status"]) == (b, "job-b/part#0", results.SCORED)
    assert [(h["model"], h["owner"], h["status"]) for h in doc["history"]] == [
        ("", "job-c/part#0", results.FAILED), (a, "job-a/part#0", results.SCORED)]
    assert doc["history"][1] == {"etag": "e1", "model": a, "owner": "job-a/part#0", "status": results.SCORED,
                                 "model_version": "aaa", "top_class": "a", "risk_level": "low", "prob_mel": 0.1,
                                 "at": "2026-12-01T00:00:00+00:00"}
