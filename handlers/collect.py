"""Lambda ``collect``: "SageMaker Transform Job State Change" -> results.

On ``Completed``::

    every shard under the job's S3Uri (manifests/<job>/<n>-shards/part-*.jsonl)
      + transform-output/<job>/<shard file name>.out            (each joined line by line)
      -> results/predictions/dt=<date>/<job>.parquet       one file per job (PREDICTION_SCHEMA)
      -> results/images/<key without incoming/>.json       one document per image
      -> results/failures/dt=<date>/<job>-transform.parquet error lines (stage "transform")
      -> results/reports/<job>.html + <job>.csv             the job's report (dermscore.jobreport),
                                                            last; its failure is logged, not raised

On ``Failed`` / ``Stopped`` the job's images go back to the queue as a new attempt
(``attempt + 1``, at most ``MAX_JOB_ATTEMPTS`` attempts in all); after the last attempt every
image gets a failure row carrying the job's FailureReason (``<job>-job.parquet``).

File names derive from the job name and the date from the job's end time, so a repeated
event overwrites the same objects instead of adding rows; rows are written only for images
whose claim names this job (``handlers.claims``), so an image two jobs scored (a
duplicate that raced) still gets one row.
"""

from __future__ import annotations

import json
import posixpath
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent

from dermscore import layout, report, results
from dermscore.aws import parse_s3_uri
from dermscore.config import Settings
from handlers import claims
from handlers.storage import dt_of, put_json, put_parquet, s3_client, sqs_client, write_failures

logger = Logger(service="dermscore-collect")

DETAIL_TYPE = "SageMaker Transform Job State Change"
JOB_FAILED = "job_failed"
JOB_STOPPED = "job_stopped"
MISSING_OUTPUT = "missing_output"


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


def read_lines(s3, bucket: str, key: str) -> list[str]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [ln for ln in body.splitlines() if ln.strip()]


def input_files(s3, detail: dict[str, Any]) -> list[tuple[str, str]]:
    """(bucket, key) of every input file of the job (S3Prefix semantics: all objects under it)."""
    src = detail["TransformInput"]["DataSource"]["S3DataSource"]
    bucket, prefix = parse_s3_uri(src["S3Uri"])
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return [(bucket, k) for k in sorted(keys)]


def output_key(output_path: str, input_key: str) -> tuple[str, str]:
    bucket, prefix = parse_s3_uri(output_path)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, f"{prefix}{posixpath.basename(input_key)}.out"


def join(items: list[dict[str, Any]], out_lines: list[str]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Pair manifest items with output lines (same order); a missing line pairs with None."""
    pairs = []
    for i, item in enumerate(items):
        line = json.loads(out_lines[i]) if i < len(out_lines) else None
        if line is not None and line.get("key") and line["key"] != item["key"]:
            raise ValueError(f"output line {i} is for {line.get('key')!r}, manifest has {item['key']!r}")
        pairs.append((item, line))
    return pairs


PICTURES = (("heatmap_png", "heatmap_key", layout.HEATMAP_SUFFIX, "image/png"),
            ("thumbnail_jpeg", "thumbnail_key", layout.THUMBNAIL_SUFFIX, "image/jpeg"))


def store_pictures(s3, bucket: str, line: dict[str, Any]) -> dict[str, Any]:
    """Write a line's Grad-CAM heatmap and thumbnail (base64 in the transform output, from
    ``batch.gradcam``) beside the image's JSON; the line keeps their keys instead of the bytes."""
    import base64

    for field, key_field, suffix, ctype in PICTURES:
        data = line.pop(field, None)
        if data:
            key = layout.image_artifact_key(line["key"], suffix)
            s3.put_object(Bucket=bucket, Key=key, Body=base64.b64decode(data), ContentType=ctype)
            line[key_field] = key
    return line


def collect_completed(s3, settings: Settings, detail: dict[str, Any], when: datetime) -> dict[str, int]:
    job = detail["TransformJobName"]
    dt = dt_of(when)
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for in_bucket, in_key in input_files(s3, detail):
        items = [json.loads(ln) for ln in read_lines(s3, in_bucket, in_key)]
        out_bucket, out_key = output_key(detail["TransformOutput"]["S3OutputPath"], in_key)
        try:
            out_lines = read_lines(s3, out_bucket, out_key)
        except s3.exceptions.NoSuchKey:
            out_lines = []
        owners = claims.settle(s3, settings.bucket, items, job)
        for (item, line), owner in zip(join(items, out_lines), owners, strict=False):
            if owner != job:
                logger.info("image owned by another job; no row from this one",
                            extra={"job_name": job, "image_key": item["key"], "owner": owner})
            elif line is None:
                failures.append(results.failure_row(item["bucket"], item["key"], item.get("etag", ""), "collect",
                                                    MISSING_OUTPUT, f"no output line in {out_key}", job, when))
            elif line.get("status") == "ok":
                rows.append(results.prediction_row(store_pictures(s3, settings.bucket, line), job, when))
            else:
                failures.append(results.failure_row(item["bucket"], item["key"], item.get("etag", ""), "transform",
                                                    line.get("reason", "unknown"), line.get("detail", ""), job, when))
    if rows:
        put_parquet(s3, settings.bucket, layout.prediction_partition_key(dt, job),
                    results.to_table(rows, results.PREDICTION_SCHEMA))
        for row in rows:
            put_json(s3, settings.bucket, layout.image_result_key(row["image_key"]), results.image_document(row))
    write_failures(s3, settings.bucket, dt, f"{job}-transform", failures)
    write_report(s3, settings.bucket, rows, failures, job_summary(detail, when))
    logger.info("transform job collected", extra={"job_name": job, "scored": len(rows), "failed": len(failures)})
    return {"scored": len(rows), "failed": len(failures)}


def job_summary(detail: dict[str, Any], when: datetime) -> dict[str, Any]:
    """What the job report needs of the event (the fields of ``dermscore.report.Job``)."""
    resources = detail.get("TransformResources") or {}
    return {"name": detail["TransformJobName"], "status": detail.get("TransformJobStatus"),
            "instance_type": resources.get("InstanceType"), "instance_count": resources.get("InstanceCount"),
            "started": _time(detail.get("TransformStartTime")), "ended": when}


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
        objects = [(layout.job_report_csv_key(name), report.to_csv(rows), "text/csv; charset=utf-8",
                    {"ContentDisposition": f'attachment; filename="{name}.csv"'}),
                   (layout.job_facts_key(name), report.Job.of(job).to_json(), "application/json", {}),
                   (layout.job_report_key(name), page, "text/html; charset=utf-8", {})]
        for key, body, ctype, extra in objects:
            s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=ctype, **extra)
    except Exception:
        logger.exception("job report not written; the results are", extra={"job_name": job.get("name")})
        return False
    return True


def collect_failed(s3, settings: Settings, detail: dict[str, Any], when: datetime) -> dict[str, int]:
    job = detail["TransformJobName"]
    status = detail["TransformJobStatus"]
    reason = JOB_STOPPED if status == "Stopped" else JOB_FAILED
    why = detail.get("FailureReason") or f"transform job {status.lower()}"
    items = [json.loads(ln) for in_bucket, in_key in input_files(s3, detail) for ln in read_lines(s3, in_bucket, in_key)]
    owned = [it for it, o in zip(items, claims.settle(s3, settings.bucket, items, job), strict=False) if o == job]
    def another_attempt(it: dict[str, Any]) -> bool:
        return bool(settings.queue_url) and int(it.get("attempt", 0)) + 1 < settings.max_job_attempts

    retry = [it for it in owned if another_attempt(it)]
    last = [it for it in owned if not another_attempt(it)]
    requeue(settings, retry, job, why, when)
    failures = [results.failure_row(it["bucket"], it["key"], it.get("etag", ""), "transform", reason, why, job, when)
                for it in last]
    write_failures(s3, settings.bucket, dt_of(when), f"{job}-job", failures)
    logger.error("transform job did not complete", extra={"job_name": job, "status": status, "reason": why,
                                                          "requeued": len(retry), "images": len(failures)})
    return {"scored": 0, "failed": len(failures), "requeued": len(retry)}


def retry_record(item: dict[str, Any], job: str, why: str, when: datetime) -> dict[str, Any]:
    """An S3 ObjectCreated record (the shape enqueue reads) for the next attempt of ``item``."""
    return {"eventVersion": "2.1", "eventSource": "dermscore:collect", "eventName": "ObjectCreated:Retry",
            "eventTime": when.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "s3": {"bucket": {"name": item["bucket"]},
                   "object": {"key": quote_plus(item["key"], safe=""), "size": item.get("size", 0),
                              "eTag": item.get("etag", "")}},
            "dermscore": {"attempt": int(item.get("attempt", 0)) + 1, "retryOf": job, "reason": why[:500]}}


def requeue(settings: Settings, items: list[dict[str, Any]], job: str, why: str, when: datetime,
            sqs=None) -> int:
    """Send the images of a failed job back to the images queue, one message per image.

    A repeated event sends them again; enqueue admits each (upload, attempt) once (its claim).
    A send that fails raises: Lambda retries the event, and nothing was written yet for them.
    """
    if not items:
        return 0
    sqs = sqs or sqs_client()
    for i in range(0, len(items), 10):
        chunk = items[i:i + 10]
        resp = sqs.send_message_batch(QueueUrl=settings.queue_url, Entries=[
            {"Id": str(j), "MessageBody": json.dumps({"Records": [retry_record(it, job, why, when)]})}
            for j, it in enumerate(chunk)])
        if resp.get("Failed"):
            raise RuntimeError(f"could not re-queue {len(resp['Failed'])} images of {job}: {resp['Failed'][:1]}")
    logger.warning("images of a failed transform job re-queued", extra={"job_name": job, "images": len(items)})
    return len(items)


def handle(event: EventBridgeEvent, settings: Settings | None = None, s3=None) -> dict[str, Any]:
    settings = settings or Settings.from_env()
    detail = event.detail
    job = detail.get("TransformJobName", "")
    status = detail.get("TransformJobStatus", "")
    if event.detail_type != DETAIL_TYPE or not job.startswith(settings.job_prefix):
        logger.info("event ignored", extra={"detail_type": event.detail_type, "job_name": job})
        return {"job_name": job, "status": status, "ignored": True}
    s3 = s3 or s3_client()
    when = finished_at(event)
    if status == "Completed":
        counts = collect_completed(s3, settings, detail, when)
    elif status in ("Failed", "Stopped"):
        counts = collect_failed(s3, settings, detail, when)
    else:
        logger.info("non-terminal state ignored", extra={"job_name": job, "status": status})
        return {"job_name": job, "status": status, "ignored": True}
    return {"job_name": job, "status": status, **counts}


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return handle(EventBridgeEvent(event))
