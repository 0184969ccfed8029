"""The enqueue handler against the moto server (HTTP): validation, manifest, one job per batch."""

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
from handlers import enqueue
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
    names = [j["TransformJobName"] for j in summaries]
    return [sm.describe_transform_job(TransformJobName=n) for n in names]


@pytest.fixture()
def stack(make_stack):
    return make_stack()


def test_batch_writes_one_manifest_and_starts_one_job(stack) -> None:
    s3 = stack.client("s3")
    keys = ["incoming/a.jpg", "incoming/sub dir/b+c é.jpg", "incoming/z.png"]
    for k in keys:
        s3.put_object(Bucket=stack.bucket, Key=k, Body=b"\xff\xd8 not really a jpeg")
    messages = [s3_message(stack.bucket, k, s3=s3) for k in keys]
    test_event = {"MessageId": "t", "ReceiptHandle": "rh", "Body": json.dumps({"Event": "s3:TestEvent"})}
    resp = stack.invoke("enqueue", sqs_event(messages + [test_event], stack.queue_arn))
    assert resp == {"batchItemFailures": []}

    jobs = jobs_of(stack)
    assert len(jobs) == 1
    job = jobs[0]
    name = job["TransformJobName"]
    assert name.startswith(f"{stack.job_prefix}-") and len(name) <= 63
    assert job["ModelName"] == stack.model_name
    assert job["TransformInput"]["DataSource"]["S3DataSource"] == {
        "S3DataType": "S3Prefix", "S3Uri": f"s3://{stack.bucket}/{layout.job_input_prefix(name, 1)}"}
    assert job["TransformInput"]["ContentType"] == "application/jsonlines"
    assert job["TransformInput"]["SplitType"] == "Line"
    assert job["BatchStrategy"] == "MultiRecord"
    assert job["MaxPayloadInMB"] == int(stack.spec.enqueue_env["MAX_PAYLOAD_MB"])
    assert job["TransformOutput"]["S3OutputPath"] == f"s3://{stack.bucket}/{layout.transform_output_prefix(name)}"
    assert job["TransformOutput"]["AssembleWith"] == "Line"
    assert job["TransformResources"]["InstanceType"] == stack.spec.enqueue_env["TRANSFORM_INSTANCE_TYPE"]
    timeout = int(stack.spec.enqueue_env["INVOCATIONS_TIMEOUT_S"])
    assert job["ModelClientConfig"]["InvocationsTimeoutInSeconds"] == timeout

    assert job["TransformResources"]["InstanceCount"] == 1     # 3 images: one shard, one instance
    body = s3.get_object(Bucket=stack.bucket, Key=layout.shard_key(name, 0, 1))["Body"].read().decode()
    lines = [json.loads(ln) for ln in body.splitlines()]
    assert [ln["key"] for ln in lines] == sorted(keys)            # decoded keys, sorted
    assert all(ln["bucket"] == stack.bucket and ln["etag"] and ln["size"] > 0 for ln in lines)
    assert read_failures(stack) == []
    # every line was claimed for this job: it says so, and collect reads no claim
    tags = stack.client("sagemaker").list_tags(ResourceArn=job["TransformJobArn"])["Tags"]
    assert {"Key": "dermscore:claims", "Value": "all"} in tags


def test_redelivered_batch_starts_no_second_job(stack) -> None:
    s3 = stack.client("s3")
    for k in ("incoming/1.jpg", "incoming/2.jpg"):
        s3.put_object(Bucket=stack.bucket, Key=k, Body=b"data")
    event = sqs_event([s3_message(stack.bucket, k, s3=s3) for k in ("incoming/1.jpg", "incoming/2.jpg")],
                      stack.queue_arn)
    stack.invoke("enqueue", event)
    stack.invoke("enqueue", event)
    # the same images in another order, with a duplicate event: same manifest, same job
    stack.invoke("enqueue", sqs_event([s3_message(stack.bucket, k, s3=s3) for k in
                                       ("incoming/2.jpg", "incoming/1.jpg", "incoming/2.jpg")], stack.queue_arn))
    assert len(jobs_of(stack)) == 1
    assert len(stack.list_keys(layout.MANIFESTS)) == 1


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

    assert jobs_of(stack) == []       # nothing valid, no job
    files = stack.list_keys(layout.FAILURES)   # one file per rejected upload: duplicates overwrite it
    assert len(files) == 3 and all(f.startswith(f"{layout.FAILURES}dt=2026-11-23/enqueue-") for f in files)
    found = {r["image_key"]: (r["stage"], r["reason"]) for r in read_failures(stack)}
    assert found == {"incoming/empty.jpg": ("enqueue", reasons.ZERO_BYTE),
                       "elsewhere/x.jpg": ("enqueue", reasons.WRONG_PREFIX),
                       "incoming/big.jpg": ("enqueue", reasons.TOO_LARGE)}
    assert all(r["detail"] for r in read_failures(stack))


def test_enqueue_makes_no_request_per_image_and_leaves_gone_objects_to_the_transform(stack) -> None:
    """The event's size and ETag are the line: no HeadObject. A deleted or overwritten object
    is found by the container's GetObject (read_error / superseded, stage transform)."""
    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.bucket, Key="incoming/here.jpg", Body=b"data")
    calls: list[str] = []
    stack.runtime("enqueue").s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    messages = [s3_message(stack.bucket, "incoming/here.jpg", s3=s3),
                s3_message(stack.bucket, "incoming/gone.jpg", size=10, etag="0123abcd")]
    assert stack.invoke("enqueue", sqs_event(messages, stack.queue_arn)) == {"batchItemFailures": []}

    assert "HeadObject" not in calls
    (job,) = jobs_of(stack)
    body = s3.get_object(Bucket=stack.bucket, Key=layout.shard_key(job["TransformJobName"], 0, 1))["Body"].read()
    lines = [json.loads(ln) for ln in body.decode().splitlines()]
    assert [(ln["key"], ln["size"], ln["etag"]) for ln in lines] == [
        ("incoming/gone.jpg", 10, "0123abcd"),
        ("incoming/here.jpg", 4, s3.head_object(Bucket=stack.bucket, Key="incoming/here.jpg")["ETag"].strip('"'))]
    assert read_failures(stack) == []
    # per image: one claim GET (duplicates) and one conditional claim PUT; per job: the manifest
    assert calls.count("GetObject") == 2 and calls.count("PutObject") == 3


def test_unparseable_message_is_a_partial_batch_failure(stack) -> None:
    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.bucket, Key="incoming/ok.jpg", Body=b"data")
    good = s3_message(stack.bucket, "incoming/ok.jpg", s3=s3)
    bad = {"MessageId": "bad-1", "ReceiptHandle": "rh", "Body": "{not json"}
    resp = stack.invoke("enqueue", sqs_event([good, bad], stack.queue_arn))
    assert resp == {"batchItemFailures": [{"itemIdentifier": "bad-1"}]}
    assert len(jobs_of(stack)) == 1    # the good record still went through


def test_transform_request_uses_settings() -> None:
    from dermscore.config import Settings

    s = Settings(bucket="bk", model_name="m", instance_type="ml.c5.xlarge", instance_count=2, max_payload_mb=3,
                 max_concurrent_transforms=4, invocations_timeout_s=600)
    req = enqueue.transform_request(s, "dermscore-abc", "s3://bk/manifests/dermscore-abc.jsonl")
    assert req["TransformResources"] == {"InstanceType": "ml.c5.xlarge", "InstanceCount": 2}
    assert req["MaxPayloadInMB"] == 3 and req["MaxConcurrentTransforms"] == 4
    assert req["ModelClientConfig"] == {"InvocationsTimeoutInSeconds": 600}
    assert req["TransformOutput"]["S3OutputPath"] == "s3://bk/transform-output/dermscore-abc/"


def test_recorded_s3_notification_delivered_by_sqs(stack) -> None:
    """GIVEN the S3 -> SQS event as AWS documents it (URL-encoded key, an s3:TestEvent beside it)
    WHEN enqueue handles it THEN one job scores the decoded key and nothing fails."""
    key = "incoming/clinic A/ISIC_0024306 + retake.jpg"
    etag = stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=b"\xff\xd8 bytes")["ETag"].strip('"')
    event = recorded_event("sqs_s3_object_created.json", bucket=stack.bucket, queue_arn=stack.queue_arn, etag=etag)
    assert stack.invoke("enqueue", event) == {"batchItemFailures": []}
    (job,) = jobs_of(stack)
    shard = layout.shard_key(job["TransformJobName"], 0, 1)
    body = stack.client("s3").get_object(Bucket=stack.bucket, Key=shard)["Body"].read().decode()
    assert [json.loads(ln)["key"] for ln in body.splitlines()] == [key]
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
    assert jobs_of(stack) == []
    assert {r["image_key"]: r["reason"] for r in read_failures(stack)} == keys
