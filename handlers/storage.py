"""Small helpers shared by the two handlers (S3 I/O of Parquet and JSON, clients)."""

from __future__ import annotations

import io
import json
from datetime import datetime
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq

from dermscore import layout, results


def s3_client():
    return boto3.client("s3")


def sagemaker_client():
    return boto3.client("sagemaker")


def sqs_client():
    return boto3.client("sqs")


def put_parquet(s3, bucket: str, key: str, table: pa.Table) -> None:
    """Write ``table`` as one Parquet object (in-memory buffer + PUT: atomic, overwrites)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue(), ContentType="application/vnd.apache.parquet")


def put_json(s3, bucket: str, key: str, doc: dict[str, Any]) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(doc, default=str).encode(),
                  ContentType="application/json")


def write_failures(s3, bucket: str, dt: str, name: str, rows: list[dict[str, Any]]) -> str | None:
    """Write failure rows as one Parquet file with a deterministic name; None if no rows."""
    if not rows:
        return None
    key = layout.failure_partition_key(dt, name)
    put_parquet(s3, bucket, key, results.to_table(rows, results.FAILURE_SCHEMA))
    return key


def dt_of(when: datetime) -> str:
    return when.strftime("%Y-%m-%d")
