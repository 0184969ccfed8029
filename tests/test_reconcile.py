"""The reconciler against the moto server: what it does with each kind of job that has no outcome.

Jobs are created with the dispatcher's own code from a pending part; their state comes from an outcomes table, as the
local transform runner reports it (moto calls every job Completed at once); collect runs in
this process when the reconciler invokes it (infra.scheduler.LocalLambda).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from dermscore import layout, scoring
from dermscore.labels import CLASSES
from dermscore.messages import ManifestLine, OutputLine, Retry
from handlers import collect, dispatch, pending, reconcile
from infra.runner import LocalSageMaker
from infra.scheduler import Scheduler

MODEL = {"name": "test", "version": "0", "weights_sha256": "0" * 64}
ENDED = datetime(2026, 11, 23, 12, 30, tzinfo=UTC)
KEYS = ("incoming/a.jpg", "incoming/b c+d é.jpg", "incoming/corrupt.jpg")


def probs(i: int) -> list[float]:
    raw = [1.0 + (i + j) % 7 for j in range(len(CLASSES))]
    return [v / sum(raw) for v in raw]


class Killed(Exception):
    pass


class World:
    """A stack, the outcomes of its jobs (what SageMaker would say), and its reconciler."""

    def __init__(self, stack, after_s: float = 0) -> None:
        self.stack = stack
        self.outcomes: dict[str, dict] = {}
        self.view = LocalSageMaker(stack.client("sagemaker"), self.outcomes)
        self.scheduler = Scheduler(stack, self.view, after_s=after_s)
        self.items = [ManifestLine(stack.bucket, k, f"e{i}", 100) for i, k in enumerate(KEYS)]

    def submit(self, die_before_create: bool = False) -> str:
        """The items as one pending part (enqueue's code), made a job by the dispatcher's code
        (optionally killed just before CreateTransformJob); returns the job's name."""
        part = pending.write_part(self.stack.runtime("enqueue"), self.items)
        real = self.view

        class Dying:
            def __getattr__(self, name):
                if name == "create_transform_job":
                    raise Killed("dispatcher killed before CreateTransformJob")
                return getattr(real, name)

        rt = replace(self.stack.runtime("dispatch"), sagemaker=Dying() if die_before_create else real)
        dispatch.handle({}, rt)
        return layout.job_name(self.stack.job_prefix, [part])

    def finish(self, job: str, status: str = "Completed", reason: str | None = None) -> None:
        """The transform ran: its output (the third item an error line) and its state, as the
        runner leaves them, for each of the job's shards."""
        s3, items = self.stack.client("s3"), self.items
        out = {items[0].key: scoring.score_line(items[0], probs(0), MODEL, 0.5, 600, 450),
               items[1].key: scoring.score_line(items[1], probs(1), MODEL, 0.5, 640, 480),
               items[2].key: OutputLine.error(items[2], "corrupt_image", "image file is truncated")}
        if status == "Completed":
            for key in self.stack.list_keys(f"{layout.MANIFESTS}{job}/"):
                body = s3.get_object(Bucket=self.stack.bucket, Key=key)["Body"].read().decode()
                lines = [ManifestLine.from_json(ln) for ln in body.splitlines()]
                s3.put_object(Bucket=self.stack.bucket,
                              Key=f"{layout.transform_output_prefix(job)}{key.rsplit('/', 1)[1]}.out",
                              Body="".join(out[ln.key].to_json() + "\n" for ln in lines).encode())
        self.outcomes[job] = {"status": status, "failure_reason": reason, "started": ENDED - timedelta(minutes=9),
                              "ended": ENDED}

    def reconcile(self) -> dict[str, int]:
        report = self.scheduler.run_once()
        assert report is not None, "the reconciler raised (see the log)"
        return report

    def rows(self, prefix: str) -> list[dict]:
        s3, out = self.stack.client("s3"), []
        for key in self.stack.list_keys(prefix):
            body = s3.get_object(Bucket=self.stack.bucket, Key=key)["Body"].read()
            out += pq.read_table(io.BytesIO(body)).to_pylist()
        return out

    def marker(self, job: str) -> dict | None:
        return collect.marker(self.stack.runtime("collect"), job)

    def collect_invocations(self) -> list[dict]:
        return [e for f, e in self.scheduler.lambda_.invocations if f == "collect"]

    def event(self, job: str) -> dict:
        """The job's state-change event, as EventBridge (or a re-drive) delivers it to collect."""
        return collect.state_change_event(self.scheduler.runtime.sagemaker.describe_transform_job(TransformJobName=job))

    def exhaust_redrives(self, monkeypatch) -> None:
        """collect is killed at the start of every re-drive, until the reconciler has none left."""
        real = collect.collect_completed

        def killed(rt, detail, when):
            raise RuntimeError("injected: collect killed")

        monkeypatch.setattr(collect, "collect_completed", killed)
        for attempt in range(1, reconcile.MAX_REDRIVES + 1):
            assert acted(self.reconcile()) == {"redriven": 1}, attempt
        monkeypatch.setattr(collect, "collect_completed", real)

    def outcomes_per_key(self) -> dict[str, list[str]]:
        """Every row of the stack, by image key: 'scored' or the failure's reason."""
        found: dict[str, list[str]] = {}
        for r in self.rows(layout.PREDICTIONS):
            found.setdefault(r["image_key"], []).append("scored")
        for r in self.rows(layout.FAILURES):
            found.setdefault(r["image_key"], []).append(r["reason"])
        return found


@pytest.fixture()
def world(make_stack) -> World:
    return World(make_stack(overrides={"MinImagesPerJob": 1}))


def acted(report: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in report.items() if v and k not in ("jobs",)}


# --------------------------------------------------------------------------- decisions (pure)

def test_decisions() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    job = reconcile.Job("j", now - timedelta(minutes=30))
    assert reconcile.due(job, now, after_s=20 * 60) and not reconcile.due(job, now, after_s=40 * 60)
    assert not reconcile.due(replace(job, collected=True), now, after_s=0)
    # a re-drive gets as long as a job before the next look
    assert not reconcile.due(replace(job, redrives=[now - timedelta(minutes=5)]), now, after_s=20 * 60)
    assert [reconcile.decide(s, 0) for s in ("Completed", "Failed", "Stopped", None, "InProgress", "Stopping")] == [
        "redrive", "redrive", "redrive", "resubmit", "overdue", "overdue"]
    assert reconcile.decide("Completed", reconcile.MAX_REDRIVES) == reconcile.decide(None, 3) == "give_up"
    assert reconcile.decide("InProgress", 99) == "overdue"    # a running job is never given up on
    # a job within a day of the retention of manifests and markers is never looked at again: S3 may
    # expire its marker before its manifest, and its transform output with it
    old = reconcile.Job("j", now - timedelta(days=29, hours=1))
    assert reconcile.due(old, now, after_s=60) and not reconcile.due(old, now, after_s=60, retention_days=30)
    assert reconcile.due(job, now, after_s=20 * 60, retention_days=30)
    assert reconcile.job_of("manifests/j-1/2-shards/part-00000-of-00002.jsonl", layout.MANIFESTS)[0] == "j-1"
    assert reconcile.job_of("manifests/j-1.jsonl", layout.MANIFESTS) == ("j-1", "jsonl")
    assert reconcile.job_of(layout.redrive_key("j-1", 2), layout.COLLECTED) == ("j-1", "redrive-2.json")
    assert reconcile.job_of(layout.collected_key("j-1"), layout.COLLECTED) == ("j-1", "json")


# --------------------------------------------------------------------------- against the moto server

def test_completed_job_whose_event_was_lost_is_collected(world) -> None:
    job = world.submit()
    world.finish(job)
    assert acted(world.reconcile()) == {"redriven": 1}
    (event,) = world.collect_invocations()
    assert (event["detail"]["TransformJobName"], event["detail"]["TransformJobStatus"]) == (job, "Completed")
    assert event["detail"]["TransformEndTime"] == int(ENDED.timestamp() * 1000)
    assert sorted(r["image_key"] for r in world.rows(layout.PREDICTIONS)) == sorted(KEYS[:2])
    assert [(r["image_key"], r["reason"]) for r in world.rows(layout.FAILURES)] == [(KEYS[2], "corrupt_image")]
    assert world.stack.list_keys(layout.PREDICTIONS) == [layout.prediction_partition_key(
        "2026-11-23", layout.job_file_name(job, layout.shard_key(job, 0, 1)))]
    assert world.marker(job)["status"] == "Completed"
    # collected now: the next run has nothing to do
    assert acted(world.reconcile()) == {"collected": 1}
    assert len(world.collect_invocations()) == 1


def test_collected_job_is_left_alone(world) -> None:
    job = world.submit()
    world.finish(job)
    description = world.scheduler.runtime.sagemaker.describe_transform_job(TransformJobName=job)
    world.stack.invoke("collect", collect.state_change_event(description))    # EventBridge delivered it
    before = world.stack.list_keys("")
    calls: list[str] = []
    rt = world.scheduler.runtime
    for client in (rt.s3, rt.sagemaker, rt.sqs):
        client.meta.events.register("before-call.*.*", lambda model, **_: calls.append(model.name))
    assert acted(world.reconcile()) == {"collected": 1}
    assert world.collect_invocations() == [] and world.stack.list_keys("") == before
    # the cost of a run in steady state: one listing of manifests/ and one of collected/, nothing per job
    assert calls == ["ListObjectsV2", "ListObjectsV2"]


def test_young_job_waits_for_the_bound(make_stack) -> None:
    world = World(make_stack(overrides={"MinImagesPerJob": 1}), after_s=3600)
    job = world.submit()
    world.finish(job)
    assert acted(world.reconcile()) == {"waiting": 1}
    assert world.collect_invocations() == [] and world.marker(job) is None


def test_missing_job_whose_dispatcher_died_is_left_to_its_intent(world) -> None:
    """The dispatcher died after the manifest, before CreateTransformJob: its intent still names
    the job, so the dispatcher owns the submission (one owner: the reconciler never submits what an
    intent covers). The reconciler reports it overdue; the dispatcher's next run creates it."""
    with pytest.raises(Killed):
        world.submit(die_before_create=True)
    (name,) = {k.split("/")[1] for k in world.stack.list_keys(layout.MANIFESTS)}
    sm = world.stack.client("sagemaker")
    assert not dispatch.job_exists(sm, name)
    assert acted(world.reconcile()) == {"overdue": 1}
    assert not dispatch.job_exists(sm, name)
    report = dispatch.handle({}, replace(world.stack.runtime("dispatch"), sagemaker=world.view))
    assert (report["resumed"], report["jobs_created"]) == (1, 1)    # its intent: the job is created now
    job = sm.describe_transform_job(TransformJobName=name)
    assert job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == \
        f"s3://{world.stack.bucket}/{layout.job_input_prefix(name, 1)}"
    assert world.stack.list_keys(layout.PENDING) == world.stack.list_keys(layout.DISPATCH) == []
    # it runs now (InProgress): past the bound, it is reported and left alone
    assert acted(world.reconcile()) == {"overdue": 1}
    world.finish(name)
    assert acted(world.reconcile()) == {"redriven": 1}     # ... and its event was lost too
    assert len(world.rows(layout.PREDICTIONS)) == 2 and world.marker(name)["status"] == "Completed"


def test_a_half_written_manifest_is_never_submitted(make_stack) -> None:
    """A dispatcher run wrote its intent and shard 0 of 3, then died, and the dispatcher does not
    come back to it in time: the reconciler neither submits the partial folder nor gives up over it,
    with or without the intent; the dispatcher's run writes every shard and submits all 3."""
    world = World(make_stack(overrides={"MinImagesPerJob": 1, "TransformInstanceCount": 3,
                                        "MinImagesPerShard": 1}))
    part = pending.write_part(world.stack.runtime("enqueue"), world.items)
    name = layout.job_name(world.stack.job_prefix, [part])
    rt = replace(world.stack.runtime("dispatch"), sagemaker=world.view)
    intent = dispatch.Intent(name, (part,), len(world.items))
    s3 = world.stack.client("s3")
    s3.put_object(Bucket=world.stack.bucket, Key=layout.dispatch_key(name), Body=json.dumps(asdict(intent)).encode())
    s3.put_object(Bucket=world.stack.bucket, Key=layout.shard_key(name, 0, 3), Body=(world.items[0].to_json() + "\n"))
    sm = world.stack.client("sagemaker")
    for _ in range(reconcile.MAX_REDRIVES + 1):                    # past every re-drive: still not its to act on
        assert acted(world.reconcile()) == {"overdue": 1}
    s3.delete_object(Bucket=world.stack.bucket, Key=layout.dispatch_key(name))   # the intent lost as well
    assert acted(world.reconcile()) == {"overdue": 1}
    assert not dispatch.job_exists(sm, name) and world.stack.list_keys(layout.FAILURES) == []
    s3.put_object(Bucket=world.stack.bucket, Key=layout.dispatch_key(name), Body=json.dumps(asdict(intent)).encode())
    assert dispatch.handle({}, rt)["jobs_created"] == 1
    assert len(world.stack.list_keys(layout.job_input_prefix(name, 3))) == 3


def test_failed_job_whose_event_was_lost_requeues_its_images(world) -> None:
    job = world.submit()
    world.finish(job, "Failed", "AlgorithmError: instance lost")
    assert acted(world.reconcile()) == {"redriven": 1}
    sqs, bodies = world.stack.client("sqs"), []
    while msgs := sqs.receive_message(QueueUrl=world.stack.queue_url, MaxNumberOfMessages=10).get("Messages"):
        bodies += [m["Body"] for m in msgs]
    retries = [r for r in map(Retry.from_json, bodies) if r is not None]
    assert {r.line for r in retries} == {it.next_attempt() for it in world.items}
    assert {(r.failed_job, r.reason) for r in retries} == {(job, "AlgorithmError: instance lost")}
    assert world.marker(job)["status"] == "Failed" and world.stack.list_keys("results/") == []


def test_failed_job_on_its_last_attempt_gets_failure_rows(world) -> None:
    last = int(world.stack.spec.collect_env["MAX_JOB_ATTEMPTS"]) - 1
    world.items = [replace(it, attempt=last) for it in world.items]
    job = world.submit()
    world.finish(job, "Stopped", "stopped by an operator")
    assert acted(world.reconcile()) == {"redriven": 1}
    assert {(r["image_key"], r["reason"], r["detail"]) for r in world.rows(layout.FAILURES)} == {
        (k, "job_stopped", "stopped by an operator") for k in KEYS}


def test_gives_up_after_the_redrives_and_accounts_for_every_image_once(world, monkeypatch) -> None:
    """collect never finishes this job (here: it wrote its predictions, then died every time):
    after MAX_REDRIVES re-drives the images without a row get 'unreconciled' failure rows, and a
    late event adds nothing."""
    job = world.submit()
    world.finish(job)
    real = collect.collect_completed

    def dies_after_predictions(rt, detail, when):
        real(rt, detail, when)
        name = layout.job_file_name(job, layout.shard_key(job, 0, 1))
        world.stack.client("s3").delete_object(               # its last file never made it
            Bucket=world.stack.bucket, Key=layout.failure_partition_key("2026-11-23", f"{name}-transform"))
        raise RuntimeError("injected: collect killed before its marker")

    monkeypatch.setattr(collect, "collect_completed", dies_after_predictions)
    for attempt in range(1, reconcile.MAX_REDRIVES + 1):
        assert acted(world.reconcile()) == {"redriven": 1}, attempt
    assert len(world.collect_invocations()) == reconcile.MAX_REDRIVES
    assert acted(world.reconcile()) == {"fenced": 1}          # first the fence, then (no wait in tests) the rows
    assert world.rows(layout.FAILURES) == []
    assert acted(world.reconcile()) == {"given_up": 1, "images_unreconciled": 1}
    scored = {r["image_key"] for r in world.rows(layout.PREDICTIONS)}
    failed = [(r["image_key"], r["stage"], r["reason"]) for r in world.rows(layout.FAILURES)]
    assert scored == set(KEYS[:2]) and failed == [(KEYS[2], "reconcile", "unreconciled")]
    assert world.marker(job)["status"] == collect.UNRECONCILED
    monkeypatch.setattr(collect, "collect_completed", real)
    assert world.stack.invoke("collect", world.event(job))["ignored"]
    assert len(world.rows(layout.PREDICTIONS)) == 2 and len(world.rows(layout.FAILURES)) == 1
    assert acted(world.reconcile()) == {"collected": 1}


def test_lambda_handler_reports_and_raises_when_a_job_could_not_be_looked_at(world, monkeypatch) -> None:
    job = world.submit()
    world.finish(job)

    def broken(rt, job, description):
        raise RuntimeError("injected: Invoke refused")

    monkeypatch.setattr(reconcile, "redrive", broken)
    with pytest.raises(RuntimeError, match="1 job"):
        world.stack.invoke("reconcile", {}, rt=world.scheduler.runtime)
    assert world.marker(job) is None and world.scheduler.lambda_.invocations == []


# --------------------------------------------------------------------------- giving up, in two steps

def test_give_up_never_races_a_collect_in_flight(world, monkeypatch) -> None:
    """The reconciler decides to give up on a job while a collect of it is running (the third
    re-drive's, slow; it has passed its fence check): the reconciler only fences the job, the
    collect finishes, and its rows are the only ones. Before the fence both wrote rows: a
    prediction row and an 'unreconciled' row for the same upload."""
    job = world.submit()
    world.finish(job)
    world.exhaust_redrives(monkeypatch)
    real, during = collect.collect_file, []

    def slow(*args):
        during.append(world.reconcile())           # the reconciler's run while this collect is in flight
        return real(*args)

    monkeypatch.setattr(collect, "collect_file", slow)
    assert world.stack.invoke("collect", world.event(job))["status"] == "Completed"
    assert [acted(r) for r in during] == [{"fenced": 1}]
    assert world.outcomes_per_key() == {KEYS[0]: ["scored"], KEYS[1]: ["scored"], KEYS[2]: ["corrupt_image"]}
    assert world.marker(job)["status"] == "Completed"
    assert acted(world.reconcile()) == {"collected": 1}


def test_a_fenced_collect_stops_and_the_give_up_places_the_rest(make_stack, monkeypatch) -> None:
    """Three shards: the reconciler fences the job while collect is on the first one; collect
    stops before the second (no marker), and the give-up writes failure rows for the two shards
    collect did not reach and none for the one it did."""
    world = World(make_stack(overrides={"MinImagesPerJob": 1, "TransformInstanceCount": 3, "MinImagesPerShard": 1}))
    job = world.submit()
    world.finish(job)
    world.exhaust_redrives(monkeypatch)
    real, during = collect.collect_file, []

    def slow(rt, detail, in_key, *rest):
        if not during:
            during.append(world.reconcile())
        return real(rt, detail, in_key, *rest)

    monkeypatch.setattr(collect, "collect_file", slow)
    assert world.stack.invoke("collect", world.event(job))["ignored"]
    assert [acted(r) for r in during] == [{"fenced": 1}] and world.marker(job) is None
    assert acted(world.reconcile()) == {"given_up": 1, "images_unreconciled": 2}
    assert world.outcomes_per_key() == {KEYS[0]: ["scored"], KEYS[1]: ["unreconciled"], KEYS[2]: ["unreconciled"]}
    assert world.marker(job) == {"job": job, "status": collect.UNRECONCILED, "images": 2,
                                 "reason": "no outcome after 3 re-drives (status Completed)"}


class LambdaTimeout(BaseException):
    """Lambda ends an invocation at its timeout (or an out-of-memory kill): no handler code runs after it."""


def test_a_give_up_too_large_for_one_run_resumes_and_blocks_no_younger_job(make_stack, monkeypatch) -> None:
    """The reconciler is killed while giving up on an old job of three shards (here: during its
    second file). A younger job whose event was lost is still re-driven in that run (give-ups
    come last), and the next run resumes the give-up at the second file: the first is not done
    again, and every image of both jobs ends as exactly one row. Before, the give-up read every
    line at once, ran first, and a killed run recorded nothing: due again every run, forever,
    with the younger jobs behind it."""
    world = World(make_stack(overrides={"MinImagesPerJob": 1, "TransformInstanceCount": 3, "MinImagesPerShard": 1}))
    old = world.submit()                         # its transform never wrote output: no collect can place a row
    world.outcomes[old] = {"status": "Completed", "failure_reason": None, "started": ENDED - timedelta(minutes=9),
                           "ended": ENDED}
    world.exhaust_redrives(monkeypatch)
    assert acted(world.reconcile()) == {"fenced": 1}
    world.items = [ManifestLine(world.stack.bucket, f"incoming/young/{i}.jpg", f"y{i}", 100) for i in range(3)]
    young = world.submit()
    world.finish(young)
    real, files = reconcile.give_up_file, []

    def killed_in_the_second_file(rt, job, in_key, *rest):
        files.append(in_key)
        if len(files) == 2:
            raise LambdaTimeout
        return real(rt, job, in_key, *rest)

    monkeypatch.setattr(reconcile, "give_up_file", killed_in_the_second_file)
    with pytest.raises(LambdaTimeout):
        world.reconcile()
    assert world.marker(young)["status"] == "Completed"          # re-driven before the give-up ran
    assert acted(world.reconcile()) == {"collected": 1, "given_up": 1, "images_unreconciled": 2}
    shards = [layout.shard_key(old, i, 3) for i in range(3)]
    assert files == [shards[0], shards[1], shards[1], shards[2]]  # resumed at the file the kill interrupted
    assert world.outcomes_per_key() == {
        **{k: ["unreconciled"] for k in KEYS}, **{it.key: o for it, o in zip(
            world.items, (["scored"], ["scored"], ["corrupt_image"]), strict=True)}}
    assert world.marker(old)["images"] == 3


def test_a_give_up_waits_for_collects_in_flight_and_stops_at_its_deadline(world, monkeypatch) -> None:
    job = world.submit()
    world.finish(job)
    world.exhaust_redrives(monkeypatch)
    assert acted(world.reconcile()) == {"fenced": 1}
    rt = world.scheduler.runtime
    waiting = replace(rt, settings=replace(rt.settings, give_up_wait_s=960))   # the template's wait
    assert acted(reconcile.handle({}, waiting)) == {"giving_up": 1}
    assert acted(reconcile.handle({}, rt, deadline=time.monotonic() - 1)) == {"giving_up": 1}
    assert world.rows(layout.FAILURES) == [] and world.marker(job) is None
    assert acted(reconcile.handle({}, rt)) == {"given_up": 1, "images_unreconciled": 3}
    assert sorted(world.outcomes_per_key().items()) == [(k, ["unreconciled"]) for k in sorted(KEYS)]
