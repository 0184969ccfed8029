"""Lambda ``reconcile`` (scheduled): no transform job's images stay unaccounted for.

A job's outcome reaches collect through one EventBridge event ("SageMaker Transform Job State
Change"). EventBridge retries it and keeps what it could not deliver in a dead-letter queue, but
an event lost anyway, or a submitter that died between its manifest and ``CreateTransformJob``
with nobody left to redeliver its batch, would leave images with neither a result nor a failure
row, and no alarm. Every ``ReconcileIntervalMinutes`` this function looks at every job that
should be done by now::

    list    manifests/   one folder per job; its newest LastModified is the job's age
            collected/   markers (collect wrote the job's outcome) and this function's re-drive records
    decide  every job older than RECONCILE_AFTER_MINUTES without a marker (:func:`due`, :func:`decide`),
            from DescribeTransformJob:
              Completed / Failed / Stopped -> re-drive: the job's state-change event, built from
                  DescribeTransformJob, goes to collect (asynchronous Invoke: collect's own retries and
                  failure destination apply; collect is idempotent, its keys are deterministic)
              no such job -> re-submit it from its manifest (dispatch.submit): its dispatcher died before
                  CreateTransformJob and its intent is gone (the dispatcher itself finishes intents)
              InProgress / Stopping -> left alone, logged and counted (metric JobsOverdue)
              re-driven MAX_REDRIVES times, the bound passed since the last, still no marker -> give up,
                  in two steps (:func:`fence`, :func:`give_up`)
    give up first the fence collected/<job>.give-up.json: collect ignores the job from then on, and a
              collect already running when it was written is over within GIVE_UP_WAIT_S (collect's
              timeout and a minute); only then, in a later run, a failure row 'unreconciled' for each
              image that has no row, one input file at a time, the fence recording each file done (a
              run that runs out of time or is killed resumes at the next file), and last the marker
              "Unreconciled". Give-ups come after every other job's action in a run, so a job too
              large to finish in one run never keeps younger jobs from being recovered.
    metrics JobsOverdue, JobsRecovered, ImagesUnreconciled (CloudWatch EMF) -> alarms (template.yaml)

Cost per run (docs/reliability.md): two listings, ceil(M / 1000) + ceil(C / 1000) LIST requests
for M manifest objects and C markers within the retention, plus one DescribeTransformJob per job
that is old enough and has no marker (none in steady state).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent
from botocore.exceptions import ClientError

from dermscore import batching, layout, reasons, results
from dermscore.aws import error_code, iter_objects
from dermscore.messages import ManifestLine
from handlers import claims, collect, dispatch, runtime
from handlers.runtime import Runtime
from handlers.storage import dt_of, put_json, read_json, read_lines, read_parquet, write_failures

logger = Logger(service="dermscore-reconcile")
metrics = Metrics(service="dermscore-reconcile")   # namespace: POWERTOOLS_METRICS_NAMESPACE (template.yaml)

MAX_REDRIVES = 3                   # re-drives (or re-submissions) of one job before giving up
RUNNING = ("InProgress", "Stopping")

# What decide() says about a due job.
OVERDUE, REDRIVE, RESUBMIT, GIVE_UP = "overdue", "redrive", "resubmit", "give_up"
FENCED, GIVING_UP = "fenced", "giving_up"   # the two steps of giving up that leave the job not yet given up
RESERVE_S = 60                     # a run stops starting input files this long before its Lambda timeout

_REDRIVE = re.compile(r"redrive-(\d+)\.json")
GIVE_UP_TAIL = layout.give_up_key("j").removeprefix(f"{layout.COLLECTED}j.")


@dataclass
class Job:
    """A transform job as the bucket shows it: its manifest's age and the reconciler's records."""

    name: str
    modified: datetime                                     # newest object of its manifest
    collected: bool = False                                # collected/<job>.json exists
    redrives: list[datetime] = field(default_factory=list)  # when each re-drive record was written
    fenced: bool = False                                   # collected/<job>.give-up.json exists


# --- pure decisions -----------------------------------------------------------------------------

def due(job: Job, now: datetime, after_s: float, retention_days: float | None = None) -> bool:
    """Old enough to be looked at: the manifest is older than the bound and so is the last re-drive
    (which gets as long as a job to show its outcome); but not within a day of the retention of
    manifests and markers (``ManifestRetentionDays``): S3 expires a job's objects in no set order,
    and a job whose marker expired first must not be re-driven over transform output that is gone.
    A job being given up on (its fence exists) is looked at every run: :func:`give_up` keeps its own time."""
    newest = max([job.modified, *job.redrives])
    if job.collected or (retention_days and (now - job.modified).total_seconds() >= (retention_days - 1) * 86_400):
        return False
    return job.fenced or (now - newest).total_seconds() >= after_s


def decide(status: str | None, redrives: int, max_redrives: int = MAX_REDRIVES) -> str:
    """What to do with a due job, from its DescribeTransformJob status (None: no such job)."""
    if status in RUNNING:
        return OVERDUE
    if redrives >= max_redrives:
        return GIVE_UP
    return RESUBMIT if status is None else REDRIVE


def job_of(key: str, prefix: str) -> tuple[str, str] | None:
    """(job, rest) of ``manifests/<job>/...``, ``manifests/<job>.jsonl`` or ``collected/<job>.<rest>``
    (SageMaker job names hold no '.' and no '/')."""
    rest = key[len(prefix):]
    name, _, tail = rest.partition("/") if prefix == layout.MANIFESTS and "/" in rest else rest.partition(".")
    return (name, tail) if name and tail else None


def jobs(s3, bucket: str, job_prefix: str) -> dict[str, Job]:
    """This stack's jobs that have a manifest, with their markers and re-drive records (two listings)."""
    found: dict[str, Job] = {}
    for key, modified in iter_objects(s3, bucket, layout.MANIFESTS):
        named = job_of(key, layout.MANIFESTS)
        if named and layout.is_job_of(job_prefix, named[0]):
            job = found.setdefault(named[0], Job(named[0], modified))
            job.modified = max(job.modified, modified)
    for key, modified in iter_objects(s3, bucket, layout.COLLECTED):
        named = job_of(key, layout.COLLECTED)
        if named is None or named[0] not in found:
            continue
        name, tail = named
        if tail == "json":
            found[name].collected = True
        elif tail == GIVE_UP_TAIL:
            found[name].fenced = True
        elif _REDRIVE.fullmatch(tail):
            found[name].redrives.append(modified)
    return found


# --- acting on one job ----------------------------------------------------------------------------

def describe(rt: Runtime, name: str) -> dict[str, Any] | None:
    """DescribeTransformJob, or None if there is no such job."""
    try:
        return rt.sagemaker.describe_transform_job(TransformJobName=name)
    except ClientError:
        if not dispatch.job_exists(rt.sagemaker, name):   # the not-found test, written once in dispatch
            return None
        raise


def record(rt: Runtime, job: Job, action: str, **facts: Any) -> None:
    """The re-drive record: counts the attempt and starts its grace period (its LastModified)."""
    put_json(rt.s3, rt.settings.bucket, layout.redrive_key(job.name, len(job.redrives) + 1),
             {"job": job.name, "action": action, "at": results.utcnow().isoformat(), **facts})


def redrive(rt: Runtime, job: Job, description: dict[str, Any]) -> None:
    """Send the job's state-change event to collect, as EventBridge would have (asynchronously)."""
    event = collect.state_change_event(description)
    rt.lambda_.invoke(FunctionName=rt.settings.collect_function, InvocationType="Event",
                      Payload=json.dumps(event, default=str).encode())
    record(rt, job, REDRIVE, status=description.get("TransformJobStatus"))
    logger.warning("transform job finished but was never collected (its event was lost): collect re-driven",
                   extra={"job_name": job.name, "status": description.get("TransformJobStatus"),
                          "attempt": len(job.redrives) + 1})


Folder = tuple[str, list[str]]   # a job's shard folder and its shard keys, sorted


def manifest_folder(rt: Runtime, name: str) -> Folder | None:
    """The shard folder of a job's manifest and its shard keys (one listing): the newest folder if
    several."""
    folders: dict[str, tuple[datetime, list[str]]] = {}
    for key, modified in iter_objects(rt.s3, rt.settings.bucket, f"{layout.MANIFESTS}{name}/"):
        folder, _, _ = key.rpartition("/")
        seen, keys = folders.get(folder, (modified, []))
        folders[folder] = (max(seen, modified), [*keys, key])
    if not folders:
        return None
    folder = max(folders, key=lambda f: folders[f][0])
    return folder + "/", sorted(folders[folder][1])


def manifest_files(rt: Runtime, found: Folder | None) -> Iterator[tuple[str, list[ManifestLine]]]:
    """(shard key, its lines) of a job's manifest folder (:func:`manifest_folder`), one file at a time."""
    for key in found[1] if found else []:
        yield key, [ManifestLine.from_json(ln) for ln in read_lines(rt.s3, rt.settings.bucket, key)]


def complete(found: Folder) -> bool:
    """Every shard the folder's name announces is there (a dispatcher that died while writing
    them leaves fewer)."""
    return layout.shard_count(found[0]) == len(found[1])


def not_ours(rt: Runtime, name: str, found: Folder | None) -> str | None:
    """Why a job that does not exist is not the reconciler's to submit or give up on, or None.
    While the dispatcher's intent for it exists the dispatcher owns it (it rewrites the shards and
    creates the job); an incomplete manifest folder (``found``) is never submitted or read (its
    missing shards' images would get neither a row nor a failure row)."""
    if read_json(rt.s3, rt.settings.bucket, layout.dispatch_key(name)) is not None:
        return "its dispatcher's intent exists: the dispatcher submits it"
    if found is not None and not complete(found):
        return f"its manifest folder {found[0]} holds {len(found[1])} of {layout.shard_count(found[0])} shards"
    return None


def left_alone(job: Job, why: str) -> tuple[str, int]:
    logger.warning("transform job missing: left alone", extra={"job_name": job.name, "reason": why})
    return OVERDUE, 0


def resubmit(rt: Runtime, job: Job) -> tuple[str, int]:
    """A complete manifest without its job and without an intent: submitted again. Returns (what
    happened, failure rows written)."""
    found = manifest_folder(rt, job.name)
    why = not_ours(rt, job.name, found)
    if why:
        return left_alone(job, why)
    if found is None:
        return fence(rt, job, "its manifest is gone")
    try:
        dispatch.submit(rt, job.name, found[0], len(found[1]))
    except ClientError as exc:
        if not batching.is_retryable_create_error(error_code(exc)):   # throttled or over quota: no attempt
            record(rt, job, RESUBMIT, error=f"{error_code(exc)}: {exc}"[:500])
        raise
    record(rt, job, RESUBMIT)
    logger.warning("transform job missing although its manifest exists (its dispatcher died): re-submitted",
                   extra={"job_name": job.name, "manifest": found[0], "attempt": len(job.redrives) + 1})
    return RESUBMIT, 0


def placed(rt: Runtime, name: str, dt: str) -> set[tuple[str, str, str]]:
    """Uploads that already have a row from one input file of a job (``name``: its
    :func:`dermscore.layout.job_file_name`): in the files a partial collection wrote for it
    (``<name>.parquet``, ``<name>-transform``, ``<name>-job``)."""
    s3, bucket = rt.s3, rt.settings.bucket
    done: set[tuple[str, str, str]] = set()
    for key in (layout.prediction_partition_key(dt, name), layout.failure_partition_key(dt, f"{name}-transform"),
                layout.failure_partition_key(dt, f"{name}-job")):
        table = read_parquet(s3, bucket, key)
        if table is not None:
            done |= {(r["bucket"], r["image_key"], r["etag"]) for r in
                     table.select(["bucket", "image_key", "etag"]).to_pylist()}
    return done


def fence(rt: Runtime, job: Job, why: str) -> tuple[str, int]:
    """The first step of giving up: the fence ``collected/<job>.give-up.json``. Collect checks it
    when it starts and before each input file, so after GIVE_UP_WAIT_S no collect of the job can
    be writing rows and :func:`give_up` may place the rest without racing one."""
    put_json(rt.s3, rt.settings.bucket, layout.give_up_key(job.name),
             {"job": job.name, "at": results.utcnow().isoformat(), "reason": why[:500], "done": "", "images": 0})
    logger.warning("giving up on a transform job: collect is fenced off, failure rows follow after "
                   "GIVE_UP_WAIT_S", extra={"job_name": job.name, "reason": why,
                                            "wait_s": rt.settings.give_up_wait_s})
    return FENCED, 0


def give_up(rt: Runtime, job: Job, deadline: float | None = None) -> tuple[str, int]:
    """The second step, once the fence is GIVE_UP_WAIT_S old: a failure row 'unreconciled' for each
    image of the job that has no outcome yet (placed as any outcome, ``handlers.claims``) and no row
    from a partial collection, one input file at a time in key order (``<file>-unreconciled``,
    deterministic: a file done twice is written twice, the same rows), the fence recording the last
    file done; then the marker "Unreconciled". Stops between files at ``deadline`` (monotonic
    seconds) and resumes there next run. Returns (what happened, failure rows written this run)."""
    s3, bucket = rt.s3, rt.settings.bucket
    state = read_json(s3, bucket, layout.give_up_key(job.name)) or {}
    fenced_at = datetime.fromisoformat(state.get("at") or results.utcnow().isoformat())
    if (results.utcnow() - fenced_at).total_seconds() < rt.settings.give_up_wait_s:
        return GIVING_UP, 0
    description = describe(rt, job.name)
    files = (collect.job_lines(s3, description) if description is not None
             else manifest_files(rt, manifest_folder(rt, job.name)))
    when = (collect.finished_at(EventBridgeEvent(collect.state_change_event(description))) if description
            else job.modified)
    why = state.get("reason") or "no outcome"
    written = 0
    for in_key, lines in files:
        if in_key <= state.get("done", ""):
            continue
        if deadline is not None and time.monotonic() > deadline:
            logger.info("out of time: the give-up resumes at this file next run",
                        extra={"job_name": job.name, "input": in_key})
            return GIVING_UP, written
        rows = give_up_file(rt, job.name, in_key, lines, why, when, description is not None)
        written += rows
        state.update(done=in_key, images=state.get("images", 0) + rows)
        put_json(s3, bucket, layout.give_up_key(job.name), state)
    collect.mark(rt, job.name, collect.UNRECONCILED, images=state.get("images", 0), reason=why)
    logger.error("transform job could not be reconciled: its images get failure rows", extra={
        "job_name": job.name, "images": state.get("images", 0), "reason": why})
    return GIVE_UP, written


def give_up_file(rt: Runtime, job: str, in_key: str, lines: list[ManifestLine], why: str, when: datetime,
                 known: bool) -> int:
    """One input file of a job given up on: its failure rows (see :func:`give_up`); returns how many.
    ``known``: the job exists, so a partial collection may have written rows for the file."""
    now, name, dt = results.utcnow(), layout.job_file_name(job, in_key), dt_of(when)
    done = placed(rt, name, dt) if known else set()
    entries = [(i, ln, results.failure_row(ln, reasons.RECONCILE, reasons.UNRECONCILED, why, job, now),
                results.FAILED) for i, ln in enumerate(lines)]
    rows = [row for _, line, row, _ in claims.owning(rt.s3, rt.settings.bucket, job, in_key, entries)
            if line.upload not in done]
    write_failures(rt.s3, rt.settings.bucket, dt, f"{name}-{reasons.UNRECONCILED}", rows)
    return len(rows)


def reconcile(rt: Runtime, job: Job) -> tuple[str, int]:
    """Look at one due job that is not being given up on and act; returns (what happened, failure
    rows written)."""
    description = describe(rt, job.name)
    status = description.get("TransformJobStatus") if description else None
    action = decide(status, len(job.redrives))
    if action == OVERDUE:
        logger.warning("transform job still running past RECONCILE_AFTER_MINUTES: left alone", extra={
            "job_name": job.name, "status": status, "manifest_written": job.modified.isoformat(),
            "started": str(description.get("TransformStartTime"))})
        return OVERDUE, 0
    if action == REDRIVE:
        redrive(rt, job, description)
        return REDRIVE, 0
    if action == RESUBMIT:
        return resubmit(rt, job)
    # giving up on a job that never existed: the same ownership as resubmit
    if description is None and (why := not_ours(rt, job.name, manifest_folder(rt, job.name))):
        return left_alone(job, why)
    return fence(rt, job, f"no outcome after {len(job.redrives)} re-drives (status {status or 'no such job'})")


# --- the Lambda handler ---------------------------------------------------------------------------

COUNTS = ("jobs", "collected", "waiting", "overdue", "redriven", "resubmitted", "fenced", "giving_up", "given_up",
          "images_unreconciled", "deferred", "errors")
TALLY = {OVERDUE: "overdue", REDRIVE: "redriven", RESUBMIT: "resubmitted", FENCED: "fenced", GIVING_UP: "giving_up",
         GIVE_UP: "given_up"}


def handle(event: dict[str, Any], rt: Runtime, deadline: float | None = None) -> dict[str, int]:
    """One pass over the bucket, oldest job first, give-ups last (they alone may take long; they
    stop starting files at ``deadline``, monotonic seconds); returns the counts (also logged, and
    published as metrics)."""
    settings = rt.settings
    after_s = settings.reconcile_after_minutes * 60
    now = results.utcnow()
    found = jobs(rt.s3, settings.bucket, settings.job_prefix)
    report = dict.fromkeys(COUNTS, 0)
    report["jobs"] = len(found)
    ordered = sorted(found.values(), key=lambda j: (j.fenced, j.modified))
    for job in ordered:
        if job.collected:
            report["collected"] += 1
            continue
        if not due(job, now, after_s, settings.manifest_retention_days):
            report["waiting"] += 1
            continue
        try:
            action, rows = give_up(rt, job, deadline) if job.fenced else reconcile(rt, job)
        except Exception as exc:   # one job's trouble must not keep the others waiting
            if isinstance(exc, ClientError) and batching.is_retryable_create_error(error_code(exc)):
                report["deferred"] += 1
                logger.warning("throttled or over quota; the next run tries again",
                               extra={"job_name": job.name, "error_code": error_code(exc)})
            else:
                report["errors"] += 1
                logger.exception("job not reconciled this run", extra={"job_name": job.name})
            continue
        report[TALLY[action]] += 1
        report["images_unreconciled"] += rows
    logger.info("reconciled", extra=report)
    return report


def publish(report: dict[str, int], stack: str) -> None:
    """The run's figures as CloudWatch metrics (the JobsOverdue, JobsRecovered, ImagesUnreconciled alarms)."""
    runtime.publish_metrics(metrics, stack, [
        ("JobsOverdue", report["overdue"], MetricUnit.Count),
        ("JobsRecovered", report["redriven"] + report["resubmitted"], MetricUnit.Count),
        ("ImagesUnreconciled", report["images_unreconciled"], MetricUnit.Count)])


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any, rt: Runtime | None = None) -> dict[str, int]:
    rt = rt or runtime.default()
    deadline = time.monotonic() + context.get_remaining_time_in_millis() / 1000 - RESERVE_S
    report = handle(event, rt, deadline)
    publish(report, rt.settings.job_prefix)
    if report["errors"]:   # after the other jobs were done: the function's Errors alarm
        raise RuntimeError(f"{report['errors']} job(s) could not be reconciled this run (see the log)")
    return report
