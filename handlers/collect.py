"""Lambda ``collect``: "SageMaker Transform Job State Change" -> results.

On ``Completed``, one input file at a time (memory stays flat in the job's size)::

    each shard under the job's S3Uri (manifests/<job>/<n>-shards/part-*.jsonl)
      + transform-output/<job>/<shard file name>.out              (joined line by line)
      -> results/images/<key without incoming/>.json             one document per image, written
                                                                 first: it is the upload's claim
                                                                 (handlers.claims), 64 in parallel
      -> results/predictions/dt=<date>/<job>-<shard>.parquet     the rows of the lines that own
      -> results/failures/dt=<date>/<job>-<shard>-transform.parquet   their uploads
    then results/reports/<job>.html + .csv + .json              the job's report (dermscore.report),
                                                                 last; its failure is logged, not raised

On ``Failed`` / ``Stopped`` the job's images go back to the queue as a new attempt
(a :class:`dermscore.messages.Retry` per image, ``attempt + 1``, at most ``MAX_JOB_ATTEMPTS``
attempts in all); after the last attempt every image gets a failure row carrying the job's
FailureReason (``<job>-<shard>-job.parquet``).

Last, either way: the job's marker ``collected/<job>.json`` (its status and counts), which the
reconciler (``handlers.reconcile``) lists to find jobs whose event was lost. A job the reconciler
is giving up on (its fence ``collected/<job>.give-up.json``, checked at the start and before
each input file) is left to the reconciler: collect stops without a marker, so a late event
cannot add a second row for an image, and the reconciler places the rest once no collect can
still be running.

File names derive from the job name and the date from the job's end time, so a repeated
event overwrites the same objects instead of adding rows; rows are written only for lines that
own their upload's document, so an upload two jobs scored (a duplicate) still gets one row.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent

from dermscore import layout, reasons, report, results
from dermscore.aws import chunks, iter_keys, parse_s3_uri
from dermscore.messages import ManifestLine, OutputLine, Retry
from handlers import claims, runtime
from handlers.runtime import Runtime
from handlers.storage import dt_of, put_json, put_parquet, read_json, read_lines, write_failures

logger = Logger(service="dermscore-collect")

DETAIL_TYPE = "SageMaker Transform Job State Change"
TERMINAL = ("Completed", "Failed", "Stopped")
UNRECONCILED = "Unreconciled"   # marker status: the reconciler gave up on the job (handlers.reconcile)
REPORT_MAX_ROWS = 20_000        # a job with more images gets its facts but no report page (query it instead)


def _time(value: Any) -> datetime | None:
    """EventBridge carries SageMaker times as epoch milliseconds; accept ISO strings too."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def finished_at(event: EventBridgeEvent) -> datetime:
    detail = event.detail
    return (_time(detail.get("TransformEndTime")) or _time(event.get("time"))
            or _time(detail.get("LastModifiedTime")) or results.utcnow())


def input_files(s3, detail: dict[str, Any]) -> list[tuple[str, str]]:
    """(bucket, key) of every input file of the job (S3Prefix semantics: all objects under it)."""
    bucket, prefix = parse_s3_uri(detail["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"])
    return [(bucket, k) for k in sorted(iter_keys(s3, bucket, prefix))]


def job_lines(s3, detail: dict[str, Any]) -> Iterator[tuple[str, list[ManifestLine]]]:
    """(input key, its manifest lines) for each input file of the job, one file at a time."""
    for bucket, key in input_files(s3, detail):
        yield key, [ManifestLine.from_json(ln) for ln in read_lines(s3, bucket, key)]


def output_key(output_path: str, input_key: str) -> tuple[str, str]:
    bucket, prefix = parse_s3_uri(output_path)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, f"{prefix}{posixpath.basename(input_key)}.out"


def join(lines: list[ManifestLine], out_lines: list[str]) -> list[tuple[ManifestLine, OutputLine | None]]:
    """Pair manifest lines with output lines (same order); a missing line pairs with None."""
    pairs = []
    for i, line in enumerate(lines):
        out = OutputLine.from_json(out_lines[i]) if i < len(out_lines) else None
        if out is not None and out.key and out.key != line.key:
            raise ValueError(f"output line {i} is for {out.key!r}, manifest has {line.key!r}")
        pairs.append((line, out))
    return pairs


PICTURES = (("heatmap_key", layout.HEATMAP_SUFFIX), ("thumbnail_key", layout.THUMBNAIL_SUFFIX))


def picture_keys(line: OutputLine) -> dict[str, str | None]:
    """The Grad-CAM heatmap and thumbnail keys for the row: the container stored the pictures
    (``batch.scorer``); a key is kept only where the layout puts that image's picture."""
    keys: dict[str, str | None] = {}
    for name, suffix in PICTURES:
        key = getattr(line, name)
        expected = layout.image_artifact_key(line.key, line.etag, suffix, line.model.get("weights_sha256", ""))
        if key and key != expected:
            logger.warning("picture key not where the layout puts it; dropped",
                           extra={"image_key": line.key, "picture_key": key, "expected": expected})
            key = None
        keys[name] = key or None
    return keys


def outcome_row(job: str, line: ManifestLine, out: OutputLine | None, out_key: str,
                when: datetime) -> tuple[dict[str, Any], str]:
    """(its row, its document's status) for one manifest line and its output line."""
    if out is not None and out.ok:
        return results.prediction_row(out, job, when, **picture_keys(out)), results.SCORED
    if out is None:
        return (results.failure_row(line, reasons.COLLECT, reasons.MISSING_OUTPUT, f"no output line in {out_key}",
                                    job, when), results.FAILED)
    return (results.failure_row(line, reasons.TRANSFORM, out.reason or reasons.UNKNOWN, out.detail or "", job, when),
            results.FAILED)


def collect_file(rt: Runtime, detail: dict[str, Any], in_key: str, lines: list[ManifestLine],
                 when: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One input file with its ``.out``: documents placed, then the file's Parquet and failure rows
    (``<job>-<file>``), for the lines that own their upload. Returns (rows, failures) written."""
    s3, bucket, job, dt = rt.s3, rt.settings.bucket, detail["TransformJobName"], dt_of(when)
    out_bucket, out_key = output_key(detail["TransformOutput"]["S3OutputPath"], in_key)
    try:
        out_lines = read_lines(s3, out_bucket, out_key)
    except s3.exceptions.NoSuchKey:
        out_lines = []
    made = [(i, line, *outcome_row(job, line, out, out_key, when))
            for i, (line, out) in enumerate(join(lines, out_lines))]
    owned = claims.owning(s3, bucket, job, in_key, made)
    rows = [row for _, _, row, status in owned if status == results.SCORED]
    failures = [row for _, _, row, status in owned if status == results.FAILED]
    if len(owned) < len(made):
        logger.info("duplicate lines: their uploads' outcomes come from other lines", extra={
            "job_name": job, "input": in_key, "duplicates": len(made) - len(owned)})
    name = layout.job_file_name(job, in_key)
    if rows:
        put_parquet(s3, bucket, layout.prediction_partition_key(dt, name),
                    results.to_table(rows, results.PREDICTION_SCHEMA))
    write_failures(s3, bucket, dt, f"{name}-transform", failures)
    return rows, failures


class Fenced(Exception):
    """The reconciler is giving up on the job (``handlers.reconcile.fence``): stop, write no marker."""


def check_fence(rt: Runtime, job: str) -> None:
    if read_json(rt.s3, rt.settings.bucket, layout.give_up_key(job)) is not None:
        raise Fenced(job)


def collect_completed(rt: Runtime, detail: dict[str, Any], when: datetime) -> dict[str, int]:
    """Every input file in turn (memory: one file's lines, plus the report's rows up to
    REPORT_MAX_ROWS), then the job's report."""
    job = detail["TransformJobName"]
    scored = failed = 0
    kept: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
    for in_key, lines in job_lines(rt.s3, detail):
        check_fence(rt, job)
        rows, failures = collect_file(rt, detail, in_key, lines, when)
        scored, failed = scored + len(rows), failed + len(failures)
        if scored + failed <= REPORT_MAX_ROWS:
            kept[0].extend(rows)
            kept[1].extend(failures)
    facts = job_summary(detail, when)
    if scored + failed <= REPORT_MAX_ROWS:
        write_report(rt.s3, rt.settings.bucket, *kept, facts)
    else:
        write_facts(rt.s3, rt.settings.bucket, facts)
        logger.info("job too large for a report page: query its rows (Athena, DuckDB)",
                    extra={"job_name": job, "images": scored + failed, "report_max_rows": REPORT_MAX_ROWS})
    logger.info("transform job collected", extra={"job_name": job, "scored": scored, "failed": failed})
    return {"scored": scored, "failed": failed}


def job_summary(detail: dict[str, Any], when: datetime) -> dict[str, Any]:
    """What the job report needs of the event (the fields of ``dermscore.report.Job``)."""
    resources = detail.get("TransformResources") or {}
    return {"name": detail["TransformJobName"], "status": detail.get("TransformJobStatus"),
            "instance_type": resources.get("InstanceType"), "instance_count": resources.get("InstanceCount"),
            "started": _time(detail.get("TransformStartTime")), "ended": when}


def write_facts(s3, bucket: str, job: dict[str, Any]) -> None:
    """The job's facts (``dermscore.report.Job``), which ``dermscore report`` reads to price the job."""
    s3.put_object(Bucket=bucket, Key=layout.job_facts_key(job["name"]), Body=report.Job.of(job).to_json(),
                  ContentType="application/json")


def write_report(s3, bucket: str, rows: list[dict[str, Any]], failures: list[dict[str, Any]],
                 job: dict[str, Any]) -> bool:
    """The job's report page, CSV and facts under results/reports/ (``dermscore.report``: the same
    build and template as ``dermscore report``, which reads the facts back to price the job).
    Deterministic keys and bytes: a repeated event overwrites them. Written after the results;
    a failure here is logged, never raised, so it cannot fail (and re-run) a collection whose
    Parquet and JSON are already in place."""
    try:
        name = job["name"]
        page = report.render(report.job_page(rows, failures, job)).encode("utf-8")
        s3.put_object(Bucket=bucket, Key=layout.job_report_csv_key(name), Body=report.to_csv(rows),
                      ContentType="text/csv; charset=utf-8", ContentDisposition=f'attachment; filename="{name}.csv"')
        write_facts(s3, bucket, job)
        s3.put_object(Bucket=bucket, Key=layout.job_report_key(name), Body=page, ContentType="text/html; charset=utf-8")
    except Exception:
        logger.exception("job report not written; the results are", extra={"job_name": job.get("name")})
        return False
    return True


def collect_failed(rt: Runtime, detail: dict[str, Any], when: datetime) -> dict[str, int]:
    """A failed or stopped job: its images go back to the queue as their next attempt; after the
    last attempt each gets a failure row (placed like any outcome: a duplicate gets none)."""
    settings = rt.settings
    job = detail["TransformJobName"]
    status = detail["TransformJobStatus"]
    reason = reasons.JOB_STOPPED if status == "Stopped" else reasons.JOB_FAILED
    why = detail.get("FailureReason") or f"transform job {status.lower()}"
    def another_attempt(line: ManifestLine) -> bool:
        return bool(settings.queue_url) and line.attempt + 1 < settings.max_job_attempts

    requeued = failed = 0
    for in_key, lines in job_lines(rt.s3, detail):
        check_fence(rt, job)
        requeued += requeue(rt, [Retry(ln.next_attempt(), job, why) for ln in lines if another_attempt(ln)])
        last = [(i, ln, results.failure_row(ln, reasons.TRANSFORM, reason, why, job, when), results.FAILED)
                for i, ln in enumerate(lines) if not another_attempt(ln)]
        failures = [row for _, _, row, _ in claims.owning(rt.s3, settings.bucket, job, in_key, last)]
        write_failures(rt.s3, settings.bucket, dt_of(when), f"{layout.job_file_name(job, in_key)}-job", failures)
        failed += len(failures)
    logger.error("transform job did not complete", extra={"job_name": job, "status": status, "reason": why,
                                                          "requeued": requeued, "images": failed})
    return {"scored": 0, "failed": failed, "requeued": requeued}


def requeue(rt: Runtime, retries: list[Retry]) -> int:
    """Send the images of a failed job back to the images queue, one :class:`Retry` message each.

    A repeated event sends them again: a retry scored twice is collected once (``handlers.claims``).
    A send that fails raises: Lambda retries the event, and nothing was written yet for them.
    """
    for chunk in chunks(retries):
        resp = rt.sqs.send_message_batch(QueueUrl=rt.settings.queue_url, Entries=[
            {"Id": str(j), "MessageBody": r.to_json()} for j, r in enumerate(chunk)])
        if resp.get("Failed"):
            raise RuntimeError(f"could not re-queue {len(resp['Failed'])} images of {chunk[0].failed_job}: "
                               f"{resp['Failed'][:1]}")
    if retries:
        logger.warning("images of a failed transform job re-queued",
                       extra={"job_name": retries[0].failed_job, "images": len(retries)})
    return len(retries)


def handle(event: EventBridgeEvent, rt: Runtime) -> dict[str, Any]:
    detail = event.detail
    job = detail.get("TransformJobName", "")
    status = detail.get("TransformJobStatus", "")
    if event.detail_type != DETAIL_TYPE or not layout.is_job_of(rt.settings.job_prefix, job):
        logger.info("event ignored", extra={"detail_type": event.detail_type, "job_name": job})
        return {"job_name": job, "status": status, "ignored": True}
    if status not in TERMINAL:
        logger.info("non-terminal state ignored", extra={"job_name": job, "status": status})
        return {"job_name": job, "status": status, "ignored": True}
    if (marker(rt, job) or {}).get("status") == UNRECONCILED:
        logger.warning("the reconciler gave up on this job and wrote its images' failure rows; event ignored",
                       extra={"job_name": job, "status": status})
        return {"job_name": job, "status": status, "ignored": True}
    when = finished_at(event)
    try:
        counts = (collect_completed if status == "Completed" else collect_failed)(rt, detail, when)
    except Fenced:
        logger.warning("the reconciler is giving up on this job: it writes the remaining images' rows; "
                       "collection stopped", extra={"job_name": job, "status": status})
        return {"job_name": job, "status": status, "ignored": True}
    mark(rt, job, status, finished_at=when.isoformat(), **counts)
    return {"job_name": job, "status": status, **counts}


# --- the job's marker, and the event of a job's current state (for handlers.reconcile) ----------

def marker(rt: Runtime, job: str) -> dict[str, Any] | None:
    """The job's marker (``collected/<job>.json``), or None while its outcome is not written."""
    return read_json(rt.s3, rt.settings.bucket, layout.collected_key(job))


def mark(rt: Runtime, job: str, status: str, **facts: Any) -> None:
    """Write the job's marker: its outcome is in results/ (or, ``Unreconciled``, in failure rows)."""
    put_json(rt.s3, rt.settings.bucket, layout.collected_key(job), {"job": job, "status": status, **facts})


def _epoch_ms(value: Any) -> Any:
    return int(value.timestamp() * 1000) if isinstance(value, datetime) else value


def state_change_event(job: Mapping[str, Any]) -> dict[str, Any]:
    """The "SageMaker Transform Job State Change" event for a DescribeTransformJob response: the
    event's detail is the job's description (times in epoch milliseconds), as SageMaker sends it.
    The reconciler re-drives a lost event with it; its id is derived from the job and status."""
    detail = {k: _epoch_ms(v) for k, v in job.items() if k != "ResponseMetadata" and v is not None}
    arn = str(detail.get("TransformJobArn") or "")
    parts = arn.split(":")
    region, account = (parts[3], parts[4]) if len(parts) > 5 else ("", "")
    end = job.get("TransformEndTime") or job.get("LastModifiedTime")
    when = end if isinstance(end, datetime) else _time(end) or results.utcnow()
    return {"version": "0", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{arn or detail.get('TransformJobName')}#"
                                                                      f"{detail.get('TransformJobStatus')}")),
            "detail-type": DETAIL_TYPE, "source": "aws.sagemaker", "account": account,
            "time": when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "region": region,
            "resources": [arn] if arn else [], "detail": detail}


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any, rt: Runtime | None = None) -> dict[str, Any]:
    return handle(EventBridgeEvent(event), rt or runtime.default())
