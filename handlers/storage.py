"""S3 I/O shared by the handlers: manifests in, Parquet and JSON out (clients come from handlers.runtime)."""

from __future__ import annotations

import io
import json
import time
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import ClientError

from dermscore import layout, results
from dermscore.aws import error_code, is_missing

MANIFEST_CONTENT_TYPE = "application/jsonlines"
# The Parquet codecs the AWS SDK for pandas layer's pyarrow is built with (snappy and zlib; its
# build script turns zstd, lz4, brotli and bz2 off): the handlers write only these. Snappy is
# also what Athena and DuckDB read fastest.
LAYER_PARQUET_CODECS = ("snappy", "gzip", "none")
PARQUET_CODEC = "snappy"
# What S3 answers a conditional write (IfNoneMatch / IfMatch) that lost, or that met a concurrent one.
PRECONDITION_FAILED = ("PreconditionFailed", "412")
CONFLICT = ("ConditionalRequestConflict", "409")
RETRIES = 6


def create_once(s3, bucket: str, key: str, body: bytes, content_type: str) -> bool:
    """PUT ``key`` only if no object of that key exists (``IfNoneMatch``); False if one does. An
    object written once is never replaced by a writer that saw less (a concurrent run)."""
    for attempt in range(RETRIES):
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if error_code(exc) in PRECONDITION_FAILED:
                return False
            if error_code(exc) not in CONFLICT:
                raise
        time.sleep(0.02 * 2 ** attempt)   # a concurrent write of the key: its outcome decides
    raise RuntimeError(f"{key}: conditional create still conflicting after {RETRIES} attempts")


def read_lines(s3, bucket: str, key: str) -> list[str]:
    """The non-blank lines of a JSON Lines object."""
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [ln for ln in body.splitlines() if ln.strip()]


def put_parquet(s3, bucket: str, key: str, table: pa.Table) -> None:
    """Write ``table`` as one Parquet object (in-memory buffer + PUT: atomic, overwrites)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=PARQUET_CODEC)
    s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue(), ContentType="application/vnd.apache.parquet")


def read_parquet(s3, bucket: str, key: str) -> pa.Table | None:
    """One Parquet object as a table; None if there is no such object."""
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if is_missing(exc):
            return None
        raise
    return pq.read_table(io.BytesIO(body))


def read_json(s3, bucket: str, key: str) -> dict[str, Any] | None:
    """One JSON object; None if there is no such object."""
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as exc:
        if is_missing(exc):
            return None
        raise


def put_json(s3, bucket: str, key: str, doc: dict[str, Any], **condition: str) -> None:
    """One JSON object; ``condition``: ``IfNoneMatch`` / ``IfMatch`` of a conditional write."""
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(doc, default=str).encode(),
                  ContentType="application/json", **condition)


def write_failures(s3, bucket: str, dt: str, name: str, rows: list[dict[str, Any]]) -> str | None:
    """Write failure rows as one Parquet file with a deterministic name; None if no rows."""
    if not rows:
        return None
    key = layout.failure_partition_key(dt, name)
    put_parquet(s3, bucket, key, results.to_table(rows, results.FAILURE_SCHEMA))
    return key


def dt_of(when: datetime) -> str:
    return when.strftime("%Y-%m-%d")
