"""The few AWS idioms every stage needs, written once: error codes, key listings, S3 URIs.

No client is created here (callers pass theirs), so this stays free of settings and endpoints.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

T = TypeVar("T")
SQS_BATCH = 10   # entries per SendMessageBatch / ChangeMessageVisibilityBatch / DeleteMessageBatch

MISSING = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})


def error_code(exc: BaseException) -> str:
    """The service's error code of a botocore ``ClientError`` (``"NoSuchKey"``, ``"412"``, ...),
    the HTTP status where the service sent no code, or the exception's type name otherwise."""
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    code = (response.get("Error") or {}).get("Code") or (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return str(code) if code else type(exc).__name__


def error_message(exc: BaseException) -> str:
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Message") or exc)


def is_missing(exc: BaseException) -> bool:
    """A GET/HEAD of an object (or bucket) that does not exist."""
    return error_code(exc) in MISSING


def iter_keys(s3: Any, bucket: str, prefix: str = "") -> Iterator[str]:
    """Every key under ``prefix`` (ListObjectsV2 through boto3's paginator; folders excluded)."""
    for key in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix).search("Contents[].Key"):
        if key is not None and not key.endswith("/"):
            yield key


def iter_objects(s3: Any, bucket: str, prefix: str = "") -> Iterator[tuple[str, datetime]]:
    """``(key, LastModified)`` of every object under ``prefix`` (the same listing as :func:`iter_keys`)."""
    for obj in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix).search("Contents[]"):
        if obj is not None and not obj["Key"].endswith("/"):
            yield obj["Key"], obj["LastModified"]


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def chunks(items: Sequence[T], size: int = SQS_BATCH) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` (SQS batch calls take 10 entries)."""
    for i in range(0, len(items), size):
        yield items[i:i + size]
