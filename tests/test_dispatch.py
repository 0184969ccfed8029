"""The dispatcher against the moto server (HTTP): pending parts -> intents -> sharded jobs.

What issue 13 asks of it: jobs sized by volume (100,000 uploads at once make at most
ceil(100,000 / MinImagesPerJob) jobs), deterministic names, and no double submission or
stranded part when a run dies half-way or two runs meet the same parts. The transforms are not
run here (the fault suite runs them with the dispatcher in the loop: tests/test_faults.py).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from dermscore import layout
from dermscore.aws import iter_objects
from handlers import dispatch, enqueue
from handlers import pending as pending_parts
from infra.poller import sqs_event
from infra.runner import LocalSageMaker
from infra.scheduler import LocalLambda

BULK_UPLOADS = int(os.environ.get("DERMSCORE_BULK_UPLOADS", "100000"))
BULK_MIN_IMAGES = BULK_UPLOADS // 10        # the scaled-down MinImagesPerJob
SQS_BATCH = 3000                            # S3 notifications per enqueue invocation (Lambda's 6 MB)


def notification(bucket: str, i: int) -> dict:
    """The SQS message of one S3 ObjectCreated event (the upload itself is not needed: nothing is scored)."""
    record = {"eventVersion": "2.1", "eventSource": "aws:s3", "eventTime": "2026-12-02T10:00:00.000Z",
              "eventName": "ObjectCreated:Put",
              "s3": {"bucket": {"name": bucket}, "object": {"key": f"incoming/bulk/{i:07d}.jpg", "size": 54321,
                                                            "eTag": f"{i:032x}", "sequencer": f"{i:016X}"}}}
    return {"MessageId": f"m-{i}", "ReceiptHandle": f"rh-{i}", "Body": json.dumps({"Records": [record]}),
            "Attributes": {"ApproximateReceiveCount": "1"}}


def jobs(stack) -> list[dict]:
    sm = stack.client("sagemaker")
    pages = sm.get_paginator("list_transform_jobs").paginate(NameContains=stack.job_prefix)
    return [sm.describe_transform_job(TransformJobName=n)
            for n in pages.search("TransformJobSummaries[].TransformJobName") if n]


def manifest_keys(stack, job: str) -> list[str]:
    s3 = stack.client("s3")
    out = []
    for key in stack.list_keys(f"{layout.MANIFESTS}{job}/"):
        out += [json.loads(ln)["key"] for ln in s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read().splitlines()]
    return out


def dispatcher(stack, **settings):
    """The dispatch function's runtime with the local job states (every job InProgress)."""
    rt = replace(stack.runtime("dispatch"), sagemaker=LocalSageMaker(stack.client("sagemaker"), {}))
    return replace(rt, settings=replace(rt.settings, **settings)) if settings else rt


def test_a_bulk_upload_makes_at_most_ceil_n_over_min_jobs(make_stack) -> None:
    """GIVEN 100,000 uploads at once, MinImagesPerJob scaled down to 10,000 WHEN their notifications
    arrive in SQS batches of 3,000, enqueue waking the dispatcher whenever a job's worth is pending,
    and the latency bound finally flushes the rest THEN at most ceil(100,000 / 10,000) jobs hold
    every upload exactly once, and nothing is left pending."""
    stack = make_stack(overrides={"MinImagesPerJob": BULK_MIN_IMAGES, "MaxConcurrentJobs": 100})
    stack.inject("dispatch", sagemaker=LocalSageMaker(stack.client("sagemaker"), {}))
    stack.inject("enqueue", lambda_=LocalLambda(stack))      # enqueue's wake-up runs the dispatcher
    for start in range(0, BULK_UPLOADS, SQS_BATCH):
        batch = [notification(stack.bucket, i) for i in range(start, min(start + SQS_BATCH, BULK_UPLOADS))]
        assert stack.invoke("enqueue", sqs_event(batch, stack.queue_arn)) == {"batchItemFailures": []}
    woken = len(jobs(stack))
    assert woken >= 1                                           # bursts went out before the schedule's tick
    dispatch.handle({}, dispatcher(stack, max_latency_s=0))     # the latency bound passes for the rest

    made = jobs(stack)
    assert len(made) <= math.ceil(BULK_UPLOADS / BULK_MIN_IMAGES)
    keys = [k for job in made for k in manifest_keys(stack, job["TransformJobName"])]
    assert len(keys) == len(set(keys)) == BULK_UPLOADS
    assert stack.list_keys(layout.PENDING) == [] and stack.list_keys(layout.DISPATCH) == []
    sizes = sorted(len(manifest_keys(stack, j["TransformJobName"])) for j in made)
    assert all(n >= BULK_MIN_IMAGES for n in sizes[1:])          # only one job (the flushed rest) is smaller
    print(f"\n{BULK_UPLOADS} uploads in {math.ceil(BULK_UPLOADS / SQS_BATCH)} SQS batches: {len(made)} jobs "
          f"(MinImagesPerJob {BULK_MIN_IMAGES}; {woken} created by enqueue's wake-ups), sizes {sizes}")


def at(monkeypatch, when: datetime) -> None:
    """The dispatcher's clock (its ``now``): the local stack does not wait minutes of wall time."""
    monkeypatch.setattr(dispatch.results, "utcnow", lambda: when)


def test_a_drop_becomes_one_job_once_quiet_with_the_template_defaults(make_stack, monkeypatch) -> None:
    """GIVEN the template's defaults (a job's worth is 1,620,000 images, the latency bound 6 h) WHEN
    2,000 uploads arrive in SQS batches and then nothing more THEN the dispatcher leaves them
    pending while the drop may go on, and sends them as one job once no part has arrived for
    QuietSeconds: within QuietSeconds plus one dispatcher interval of the last part."""
    stack = make_stack()
    rt = dispatcher(stack)
    params = stack.spec.dispatch_env
    assert (params["MIN_IMAGES_PER_JOB"], params["MAX_LATENCY_S"], params["QUIET_S"]) == ("1620000", "21600", "120")
    pending(stack, *[list(range(i, i + 500)) for i in range(0, 2000, 500)])
    last = max(m for _, m in iter_objects(stack.client("s3"), stack.bucket, layout.PENDING))
    at(monkeypatch, last + timedelta(seconds=rt.settings.quiet_s - 1))
    assert dispatch.handle({}, rt)["jobs_created"] == 0                      # the drop may not be over
    at(monkeypatch, last + timedelta(seconds=rt.settings.quiet_s + stack.spec.dispatch_interval_s))
    report = dispatch.handle({}, rt)
    assert (report["jobs_created"], report["images_dispatched"], report["quiet_release"]) == (1, 2000, 1)
    (job,) = jobs(stack)
    assert len(manifest_keys(stack, job["TransformJobName"])) == 2000
    assert stack.list_keys(layout.PENDING) == []


def test_quiet_releases_are_spaced_so_a_trickle_still_batches(make_stack, monkeypatch) -> None:
    """A few images, a quiet gap, a few more: the second quiet release waits for
    QuietJobSpacingSeconds after the first, so the trickle becomes one job per spacing."""
    stack = make_stack()
    rt = dispatcher(stack)
    quiet, spacing = rt.settings.quiet_s, rt.settings.quiet_spacing_s
    pending(stack, [1, 2, 3])
    first = max(m for _, m in iter_objects(stack.client("s3"), stack.bucket, layout.PENDING))
    at(monkeypatch, first + timedelta(seconds=quiet))
    assert dispatch.handle({}, rt)["jobs_created"] == 1
    released = max(m for _, m in iter_objects(stack.client("s3"), stack.bucket, layout.DISPATCH))
    pending(stack, [4, 5])                                               # the trickle goes on
    at(monkeypatch, released + timedelta(seconds=quiet + 60))           # quiet again, but too soon
    assert dispatch.handle({}, rt)["jobs_created"] == 0
    at(monkeypatch, released + timedelta(seconds=spacing))
    assert dispatch.handle({}, rt)["jobs_created"] == 1
    assert sorted(len(manifest_keys(stack, j["TransformJobName"])) for j in jobs(stack)) == [2, 3]


def pending(stack, *batches: list[int]) -> list[str]:
    """One pending part per batch of upload numbers, as enqueue writes them; their keys."""
    rt = stack.runtime("enqueue")
    keys = []
    for numbers in batches:
        event = sqs_event([notification(stack.bucket, i) for i in numbers], stack.queue_arn)
        arrivals, _ = enqueue.parse(event, None, rt)
        keys.append(pending_parts.write_part(rt, [ln for a in arrivals for ln in a.lines]))
    return keys


class Killed(Exception):
    pass


def test_a_run_killed_before_the_create_is_finished_by_the_next(make_stack, monkeypatch) -> None:
    """The intent is written before the manifest and the job: a run killed between them leaves the
    parts pending and the intent; the next run creates that same job (not another) and only then
    deletes the parts."""
    stack = make_stack(overrides={"MinImagesPerJob": 1})
    parts = pending(stack, [1, 2, 3], [4, 5])
    name = layout.job_name(stack.job_prefix, parts)

    def killed(*args, **kwargs):
        raise Killed("dispatcher killed before CreateTransformJob")

    monkeypatch.setattr(dispatch, "submit", killed)
    with pytest.raises(Killed):
        dispatch.handle({}, dispatcher(stack))
    assert stack.list_keys(layout.DISPATCH) == [layout.dispatch_key(name)] and jobs(stack) == []
    assert sorted(stack.list_keys(layout.PENDING)) == sorted(parts)
    pending(stack, [6])                                          # a new part meanwhile: not in that job
    monkeypatch.undo()
    report = dispatch.handle({}, dispatcher(stack))
    assert (report["resumed"], report["jobs_created"]) == (1, 2)
    made = {j["TransformJobName"]: sorted(manifest_keys(stack, j["TransformJobName"])) for j in jobs(stack)}
    assert made[name] == [f"incoming/bulk/{i:07d}.jpg" for i in range(1, 6)]
    assert sorted(len(v) for v in made.values()) == [1, 5]
    assert stack.list_keys(layout.PENDING) == [] and stack.list_keys(layout.DISPATCH) == []


def test_two_runs_over_the_same_parts_make_one_job(make_stack) -> None:
    """Nothing keeps runs apart on AWS by default (DispatchReservedConcurrency is off: new accounts
    refuse reservations); when two meet the same parts (or a run is repeated), the deterministic
    name makes the second CreateTransformJob a no-op."""
    stack = make_stack(overrides={"MinImagesPerJob": 1})
    parts = pending(stack, [1, 2], [3])
    rt = dispatcher(stack)
    intent = dispatch.Intent(layout.job_name(stack.job_prefix, parts), tuple(parts), 3)
    assert dispatch.finish(rt, intent) is True                  # the first run, with these parts
    assert dispatch.finish(rt, intent) is False                 # a second, which listed them too
    assert dispatch.handle({}, rt)["jobs_created"] == 0         # and a later run finds nothing
    assert len(jobs(stack)) == 1 and stack.list_keys(layout.PENDING) == []


def test_a_run_that_met_another_on_one_intent_never_shortens_its_manifest(make_stack, monkeypatch) -> None:
    """The schedule and enqueue's wake-up both finish one intent. B found no job yet and began its
    shard; between B's reads of part 1 and part 2, A wrote the shard, created the job and deleted
    the parts. B's shard holds part 1's lines only: written over A's, it would leave part 2's
    images in no job at all (the job reads its manifest when it starts, minutes later). Seen in the
    bench (789 of 1,000 images scored); here as a recorded interleaving."""
    stack = make_stack(overrides={"MinImagesPerJob": 1})
    parts = pending(stack, [1, 2], [3])
    name = layout.job_name(stack.job_prefix, parts)
    rt, intent, real = dispatcher(stack), dispatch.Intent(name, tuple(parts), 3), dispatch.part_lines
    reads: list[str] = []

    def b_reads(s3, bucket, key):
        reads.append(key)
        if len(reads) == 2:                                     # B has read part 1: A runs from start to end
            assert dispatch.finish(rt, intent) is True
        return real(s3, bucket, key)

    monkeypatch.setattr(dispatch, "part_lines", b_reads)
    assert dispatch.finish(rt, intent) is False                 # B: the job is A's
    assert sorted(manifest_keys(stack, name)) == [f"incoming/bulk/{i:07d}.jpg" for i in (1, 2, 3)]
    assert len(jobs(stack)) == 1 and stack.list_keys(layout.PENDING) == []


def test_shards_cut_a_job_into_bounded_files_without_reading_it_whole(make_stack) -> None:
    """MaxImagesPerShard bounds every manifest file (what the dispatcher and collect hold at once);
    the lines keep the parts' order and each appears once."""
    stack = make_stack(overrides={"MinImagesPerJob": 1})
    pending(stack, list(range(0, 700)), list(range(700, 1000)), list(range(1000, 1250)))
    rt = dispatcher(stack, max_images_per_shard=300)
    assert dispatch.handle({}, rt)["jobs_created"] == 1
    (job,) = jobs(stack)
    folder = job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"].split(f"{stack.bucket}/", 1)[1]
    files = stack.list_keys(folder)
    s3 = stack.client("s3")
    sizes = [len(s3.get_object(Bucket=stack.bucket, Key=k)["Body"].read().splitlines()) for k in files]
    assert len(files) == 5 and max(sizes) <= 300 and sum(sizes) == 1250
    assert len(set(manifest_keys(stack, job["TransformJobName"]))) == 1250


def test_a_part_another_run_dispatched_is_skipped_not_fatal(make_stack) -> None:
    """Run A dispatched part 1 alone and deleted it; run B had planned parts 1 and 2: B's job holds
    part 2 only (part 1's images are in A's job), and an intent whose parts are all gone ends
    without a job. Nothing stuck, nothing twice."""
    stack = make_stack(overrides={"MinImagesPerJob": 1})
    one, two = pending(stack, [1, 2], [3])
    rt, prefix = dispatcher(stack), stack.job_prefix
    assert dispatch.finish(rt, dispatch.Intent(layout.job_name(prefix, [one]), (one,), 2))
    assert dispatch.finish(rt, dispatch.Intent(layout.job_name(prefix, [one, two]), (one, two), 3))
    assert not dispatch.finish(rt, dispatch.Intent(layout.job_name(prefix, [one, "pending/gone"]),
                                                   (one, "pending/gone"), 9))
    made = sorted(sorted(manifest_keys(stack, j["TransformJobName"])) for j in jobs(stack))
    assert made == [[f"incoming/bulk/{i:07d}.jpg" for i in (1, 2)], ["incoming/bulk/0000003.jpg"]]
    assert stack.list_keys(layout.PENDING) == [] and stack.list_keys(layout.DISPATCH) == []
