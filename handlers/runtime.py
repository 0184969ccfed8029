"""What a handler works with: its settings and AWS clients, built once per container.

Lambda keeps a container's module state between invocations, so :func:`default` builds the
clients on the first call and reuses them (connection pools included). The local stack builds
one :class:`Runtime` per function from that function's own environment (template.yaml) and
passes it in, so no process-wide environment is swapped around an invocation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config

from dermscore.config import Settings

# Collect writes up to 64 documents in parallel on one client (handlers.claims.WORKERS).
CLIENT_CONFIG = Config(max_pool_connections=64, retries={"max_attempts": 4, "mode": "standard"})


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    s3: Any
    sqs: Any
    sagemaker: Any
    lambda_: Any = None   # only a function that invokes another (reconcile -> collect, enqueue -> dispatch) gets one

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Runtime:
        """Settings and clients from ``env`` (default ``os.environ``): credentials, region and
        ``AWS_ENDPOINT_URL`` come from there when it names them, else from boto3's usual chain."""
        e = os.environ if env is None else env
        session = boto3.session.Session(
            aws_access_key_id=e.get("AWS_ACCESS_KEY_ID"), aws_secret_access_key=e.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=e.get("AWS_SESSION_TOKEN"),
            region_name=e.get("AWS_REGION") or e.get("AWS_DEFAULT_REGION"))
        endpoint = e.get("AWS_ENDPOINT_URL") or None

        def client(service: str) -> Any:
            return session.client(service, endpoint_url=endpoint, config=CLIENT_CONFIG)

        settings = Settings.from_env(e)
        return cls(settings, client("s3"), client("sqs"), client("sagemaker"),
                   client("lambda") if settings.collect_function or settings.dispatch_function else None)


_DEFAULT: Runtime | None = None


def default() -> Runtime:
    """The container's runtime, from its environment, built on first use."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Runtime.from_env()
    return _DEFAULT


def publish_metrics(metrics: Any, stack: str, figures: list[tuple[str, float, Any]]) -> None:
    """A run's figures ``(name, value, unit)`` as CloudWatch metrics with a ``stack`` dimension
    (Powertools' embedded metric format: one log line, no API call)."""
    metrics.add_dimension(name="stack", value=stack)
    for name, value, unit in figures:
        metrics.add_metric(name=name, unit=unit, value=value)
    metrics.flush_metrics()
    metrics.clear_metrics()   # flush clears only when metrics are enabled (the local stack disables them)
