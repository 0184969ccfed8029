"""The enqueue handler against the moto server (HTTP): validation, one pending part per batch."""

from __future__ import annotations

import contextlib
import io
import json
from urllib.parse import quote_plus

import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError
from conftest import recorded_event

from dermscore import layout, reasons
from infra.poller import sqs_event


def s3_message(bucket: str, key: str, size: int = 1, etag: str = "", event_time: str = "2026-11-23T10:00:00.000Z",
               s3=None):
    """An SQS message carrying one S3 ObjectCreated record, key URL-encoded as S3 does; with
    ``s3``, the object's own size and ETag, as S3's notification carries them."""
    if s3 is not None:
        with contextlib.suppress(ClientError):
            head = s3.head_object(Bucket=bucket, Key=key)
            size, etag = head["ContentLength"], head["ETag"].strip('"')
    record = {"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": event_time,
              "eventName": "ObjectCreated:Put",
              "s3": {"bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                     "object": {"key": quote_plus(key, safe=""), "size": size, "eTag": etag}}}
    body = json.dumps({"Records": [record]})
    return {"MessageId": f"m-{abs(hash((key, body))) % 10**8}", "ReceiptHandle": "rh", "Body": body,
            "Attributes": {"ApproximateReceiveCount": "1"}, "MD5OfBody": ""}


def read_failures(stack) -> list[dict]:
    s3 = stack.client("s3")
    rows = []
    for key in stack.list_keys(layout.FAILURES):
        rows += pq.read_table(io.BytesIO(s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read())).to_pylist()
    return rows


def jobs_of(stack) -> list[dict]:
    sm = stack.client("sagemaker")
    summaries = sm.list_transform_jobs(NameContains=stack.job_prefix)["TransformJobSummaries"]
    return [sm.describe_transform_job(TransformJobName=j["TransformJobName"]) for j in summaries]


def parts_of(stack) -> dict[str, list[dict]]:
    """Every pending part: its key -> its lines."""
    s3 = stack.client("s3")
    return {k: [json.loads(ln) for ln in s3.get_object(Bucket=stack.bucket, Key=k)["Body"].read().decode().splitlines()]
            for k in stack.list_keys(layout.PENDING)}


@pytest.fixture()
def stack(make_stack):
    return make_stack()


def test_batch_writes_one_pending_part_and_nothing_else(stack) -> None:
    """Arrival only: the batch's valid uploads, decoded and sorted, as one part whose key names its
    size; no job, no manifest, no request per image."""
    s3 = stack.client("s3")
    keys = ["incoming/a.jpg", "incoming/sub dir/b+c é.jpg", "incoming/z.png"]
    for k in keys:
        s3.put_object(Bucket=stack.bucket, Key=k, Body=b"\xff\xd8 not really a jpeg")
    messages = [s3_message(stack.bucket, k, s3=s3) for k in keys]
    test_event = {"MessageId": "t", "ReceiptHandle": "rh", "Body": json.dumps({"Event": "s3:TestEvent"})}
    resp = stack.invoke("enqueue", sqs_event(messages + [test_event], stack.queue_arn))
    assert resp == {"batchItemFailures": []}

    ((key, lines),) = parts_of(stack).items()
    assert layout.part_images(key) == 3
    assert [ln["key"] for ln in lines] == sorted(keys)            # decoded keys, sorted
    assert all(ln["bucket"] == stack.bucket and ln["etag"] and ln["size"] > 0 for ln in lines)
    assert read_failures(stack) == [] and jobs_of(stack) == [] and stack.list_keys(layout.MANIFESTS) == []


def test_redelivered_or_regrouped_batch_rewrites_the_same_part(stack) -> None:
    s3 = stack.client("s3")
    for k in ("incoming/1.jpg", "incoming/2.jpg"):
        s3.put_object(Bucket=stack.bucket, Key=k, Body=b"data")
    event = sqs_event([s3_message(stack.bucket, k, s3=s3) for k in ("incoming/1.jpg", "incoming/2.jpg")],
                      stack.queue_arn)
    stack.invoke("enqueue", event)
    stack.invoke("enqueue", event)
    # the same images in another order, with a duplicate event: the same part
    stack.invoke("enqueue", sqs_event([s3_message(stack.bucket, k, s3=s3) for k in
                                       ("incoming/2.jpg", "incoming/1.jpg", "incoming/2.jpg")], stack.queue_arn))
    assert [layout.part_images(k) for k in parts_of(stack)] == [2]


def test_rejections_become_failure_rows(stack) -> None:
    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.bucket, Key="incoming/empty.jpg", Body=b"")
    s3.put_object(Bucket=stack.bucket, Key="elsewhere/x.jpg", Body=b"data")
    s3.put_object(Bucket=stack.bucket, Key="incoming/big.jpg", Body=b"0" * (reasons.MAX_BYTES + 1))
    messages = [s3_message(stack.bucket, k, s3=s3) for k in
                ("incoming/empty.jpg", "elsewhere/x.jpg", "incoming/big.jpg")]
    event = sqs_event(messages, stack.queue_arn)
    assert stack.invoke("enqueue", event) == {"batchItemFailures": []}
    stack.invoke("enqueue", event)   # redelivery overwrites the same failure file

    assert parts_of(stack) == {}      # nothing valid, nothing pending
    files = stack.list_keys(layout.FAILURES)   # one file per rejected upload: duplicates overwrite it
    assert len(files) == 3 and all(f.startswith(f"{layout.FAILURES}dt=2026-11-23/enqueue-") for f in files)
    found = {r["image_key"]: (r["stage"], r["reason"]) for r in read_failures(stack)}
    assert found == {"incoming/empty.jpg": ("enqueue", reasons.ZERO_BYTE),
                       "elsewhere/x.jpg": ("enqueue", reasons.WRONG_PREFIX),
                       "incoming/big.jpg": ("enqueue", reasons.TOO_LARGE)}
    assert all(r["detail"] for r in read_failures(stack))


def test_enqueue_makes_no_request_per_image_and_leaves_gone_objects_to_the_transform(stack) -> None:
    """The event's size, ETag and sequencer are the line: no HeadObject. A deleted or overwritten
    object is found by the container's GetObject (read_error / superseded, stage transform)."""
    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.bucket, Key="incoming/here.jpg", Body=b"data")
    calls: list[str] = []
    stack.runtime("enqueue").s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    messages = [s3_message(stack.bucket, "incoming/here.jpg", s3=s3),
                s3_message(stack.bucket, "incoming/gone.jpg", size=10, etag="0123abcd")]
    assert stack.invoke("enqueue", sqs_event(messages, stack.queue_arn)) == {"batchItemFailures": []}

    (lines,) = parts_of(stack).values()
    assert [(ln["key"], ln["size"], ln["etag"]) for ln in lines] == [
        ("incoming/gone.jpg", 10, "0123abcd"),
        ("incoming/here.jpg", 4, s3.head_object(Bucket=stack.bucket, Key="incoming/here.jpg")["ETag"].strip('"'))]
    assert read_failures(stack) == []
    # per batch: the part, and one listing of pending/ (is there a job's worth?); nothing per image
    assert sorted(calls) == ["ListObjectsV2", "PutObject"]


def test_unparseable_message_is_a_partial_batch_failure(stack) -> None:
    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.bucket, Key="incoming/ok.jpg", Body=b"data")
    good = s3_message(stack.bucket, "incoming/ok.jpg", s3=s3)
    bad = {"MessageId": "bad-1", "ReceiptHandle": "rh", "Body": "{not json"}
    resp = stack.invoke("enqueue", sqs_event([good, bad], stack.queue_arn))
    assert resp == {"batchItemFailures": [{"itemIdentifier": "bad-1"}]}
    assert [[ln["key"] for ln in lines] for lines in parts_of(stack).values()] == [["incoming/ok.jpg"]]


def test_a_job_s_worth_of_pending_images_wakes_the_dispatcher(make_stack) -> None:
    """GIVEN MinImagesPerJob 3 WHEN parts of 2 and then 1 image arrive THEN the second enqueue
    invokes the dispatcher (asynchronously), the first does not."""
    stack = make_stack(overrides={"MinImagesPerJob": 3})
    woken: list[dict] = []

    class Lambda:
        def invoke(self, **kwargs):
            woken.append(kwargs)
            return {"StatusCode": 202}

    stack.inject("enqueue", lambda_=Lambda())
    stack.invoke("enqueue", sqs_event([s3_message(stack.bucket, f"incoming/{i}.jpg", etag=f"e{i}") for i in (1, 2)],
                                      stack.queue_arn))
    assert woken == []
    stack.invoke("enqueue", sqs_event([s3_message(stack.bucket, "incoming/3.jpg", etag="e3")], stack.queue_arn))
    assert woken == [{"FunctionName": f"{stack.stack_name}-dispatch", "InvocationType": "Event", "Payload": b"{}"}]


def test_recorded_s3_notification_delivered_by_sqs(stack) -> None:
    """GIVEN the S3 -> SQS event as AWS documents it (URL-encoded key, an s3:TestEvent beside it)
    WHEN enqueue handles it THEN its part holds the decoded key with the event's sequencer."""
    key = "incoming/clinic A/ISIC_0024306 + retake.jpg"
    etag = stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=b"\xff\xd8 bytes")["ETag"].strip('"')
    event = recorded_event("sqs_s3_object_created.json", bucket=stack.bucket, queue_arn=stack.queue_arn, etag=etag)
    assert stack.invoke("enqueue", event) == {"batchItemFailures": []}
    (lines,) = parts_of(stack).values()
    assert [(ln["key"], ln["sequencer"]) for ln in lines] == [(key, "0001")]
    assert read_failures(stack) == []


def test_keys_that_could_escape_the_result_layout_become_failure_rows(stack) -> None:
    """GIVEN events for keys with '..' segments, a backslash, a control character, a folder
    placeholder and one too long for results/ WHEN enqueue handles them THEN each is a failure
    row with its reason and no job is created (nothing reaches the container or the export)."""
    keys = {"incoming/../../x.jpg": reasons.UNSAFE_KEY, "incoming/a\\..\\b.jpg": reasons.UNSAFE_KEY,
            "incoming/bell\x07.jpg": reasons.UNSAFE_KEY, "incoming/sub/": reasons.FOLDER_MARKER,
            "incoming/" + "x" * 1000 + ".jpg": reasons.KEY_TOO_LONG}
    event = sqs_event([s3_message(stack.bucket, k) for k in keys], stack.queue_arn)
    assert stack.invoke("enqueue", event) == {"batchItemFailures": []}
    assert parts_of(stack) == {}
    assert {r["image_key"]: r["reason"] for r in read_failures(stack)} == keys


def test_the_same_rejected_content_uploaded_again_is_one_failure_row(stack) -> None:
    """An empty file uploaded to one key twice (the same ETag, events a day apart) is one upload, as
    on the scoring path: one failure row, in the first event's partition. A redelivery of the
    first event, or a crash between its claim and its row, rewrites that row; a new ETag is a new
    upload with its own row."""
    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.bucket, Key="incoming/empty.jpg", Body=b"")

    def event(when: str, etag: str = "") -> dict:
        message = s3_message(stack.bucket, "incoming/empty.jpg", s3=None if etag else s3, size=0, etag=etag,
                             event_time=when)
        return sqs_event([message], stack.queue_arn)

    first, again = event("2026-11-23T10:00:00.000Z"), event("2026-11-24T09:00:00.000Z")
    stack.invoke("enqueue", first)
    written = stack.list_keys(layout.FAILURES)
    for key in written:                       # as if enqueue died after the claim, before the row
        s3.delete_object(Bucket=stack.bucket, Key=key)
    stack.invoke("enqueue", first)            # SQS redelivers: the claim is this event's, the row comes back
    stack.invoke("enqueue", again)            # the same content again, the next day
    assert stack.list_keys(layout.FAILURES) == written and len(written) == 1
    assert written[0].startswith(f"{layout.FAILURES}dt=2026-11-23/")
    stack.invoke("enqueue", event("2026-11-25T09:00:00.000Z", etag="0123abcd"))   # other content: its own row
    assert len(stack.list_keys(layout.FAILURES)) == 2 and len(stack.list_keys(layout.REJECTED)) == 2
