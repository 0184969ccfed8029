"""The embedded stack: a moto server on 127.0.0.1 with the resources of ``template.yaml``.

boto3 reaches the server over HTTP through ``AWS_ENDPOINT_URL`` (set in the process
environment), so the handlers, the inference code and the CLI use unchanged clients,
exactly as they would against AWS. Names and settings come from
:func:`dermscore.template.local_spec`, i.e. from the template itself.

Resources (template logical name -> local resource)::

    ImagesBucket            s3://<bucket> with the S3 -> SQS ObjectCreated notification
    ImagesQueue             <stack>-images            (VisibilityTimeout, RedrivePolicy)
    ImagesDeadLetterQueue   <stack>-images-dlq
    EnqueueFunction         handlers.enqueue.lambda_handler  (invoked by infra.poller)
    DispatchFunction        handlers.dispatch.lambda_handler  (invoked by infra.scheduler.Dispatcher,
                                                               and by enqueue through LocalLambda)
    CollectFunction         handlers.collect.lambda_handler  (invoked by infra.runner)
    ReconcileFunction       handlers.reconcile.lambda_handler  (invoked by infra.scheduler)
    RescoreFunction         handlers.rescore.lambda_handler  (invoked by `dermscore rescore`; a run that
                                                              hands itself on is invoked again here)
    ModelName parameter     a SageMaker Model whose ModelDataUrl is s3://<bucket>/models/model.tar.gz
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from dermscore import layout
from dermscore.aws import iter_keys
from dermscore.template import LOCAL_ACCOUNT_ID, LOCAL_REGION, LocalSpec, local_spec
from infra.iam import ENFORCE_ENV, FUNCTION_ROLES, TRANSFORM_ROLE, LocalIAM, local_refs
from infra.motoserver import start_server
from infra.spool import Spool

log = logging.getLogger("dermscore.stack")

DEFAULT_BUCKET = "dermscore-local"
DEFAULT_STACK = "dermscore"
MODEL_KEY = f"{layout.MODELS}model.tar.gz"
# Clearly fake credentials: the local moto server accepts anything, AWS accepts none of these.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local-dermscore-not-a-key",
                     "AWS_SECRET_ACCESS_KEY": "local-dermscore-not-a-secret"}  # pragma: allowlist secret
LOCAL_ROLE_ARN = f"arn:aws:iam::{LOCAL_ACCOUNT_ID}:role/dermscore-local-sagemaker"
LOCAL_IMAGE = f"{LOCAL_ACCOUNT_ID}.dkr.ecr.{LOCAL_REGION}.amazonaws.com/dermscore-local:latest"

# A role's client serves a handler's or the container's threads (handlers.runtime.CLIENT_CONFIG's pool).
ROLE_CLIENT_CONFIG = Config(max_pool_connections=64, retries={"max_attempts": 4, "mode": "standard"})

# boto3's default session is not safe for creating clients from several threads at once.
# Reentrant: a function's runtime, built under it, takes the stack's own SageMaker client (IAM enforced).
_CLIENT_LOCK = threading.RLock()


def client_lock() -> threading.RLock:
    """Held while clients are created in a process that runs the local stack's threads."""
    return _CLIENT_LOCK


# --------------------------------------------------------------------------- environment

def use_endpoint(endpoint: str) -> None:
    """Point every boto3 client of this process at the local server, with dummy credentials."""
    # One access-log line per HTTP request / client would drown the pipeline's own logs.
    for noisy in ("werkzeug", "botocore.configprovider", "botocore.credentials"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        os.environ.pop(var, None)
    os.environ.update(LOCAL_CREDENTIALS)
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": LOCAL_REGION,
                       "AWS_REGION": LOCAL_REGION,
                       # no CloudWatch here: the reconciler's metrics would only print EMF lines
                       "POWERTOOLS_METRICS_DISABLED": "true"})


@contextlib.contextmanager
def preserved_environ() -> Iterator[None]:
    """Restore the whole environment afterwards (use_endpoint rewrites several variables)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@dataclass
class LambdaContext:
    """The attributes of the Lambda context object that handlers and Powertools read."""

    function_name: str
    timeout_s: int = 120
    memory_limit_in_mb: int = 1024
    function_version: str = "$LATEST"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    _start: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:{LOCAL_REGION}:{LOCAL_ACCOUNT_ID}:function:{self.function_name}"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def log_stream_name(self) -> str:
        return "local"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_s - (time.monotonic() - self._start)) * 1000))


# --------------------------------------------------------------------------- the stack

@dataclass
class LocalStack:
    endpoint: str
    spec: LocalSpec
    queue_url: str
    queue_arn: str
    dlq_url: str
    dlq_arn: str
    server: Any = None
    iam: LocalIAM | None = None   # while each function runs under its own role (enforce_iam)
    _clients: dict[Any, Any] = field(default_factory=dict, repr=False)
    _runtimes: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def bucket(self) -> str:
        return self.spec.enqueue_env["BUCKET_NAME"]

    @property
    def stack_name(self) -> str:
        return self.spec.stack_name

    @property
    def model_name(self) -> str:
        return self.spec.dispatch_env["MODEL_NAME"]

    @property
    def job_prefix(self) -> str:
        return self.spec.enqueue_env["JOB_PREFIX"]

    def client(self, service: str, role: str | None = None):
        """A client of the local endpoint (cached: boto3 clients are thread-safe once created): the
        stack's own, or with IAM enforced and a template ``role`` named, one with that role's session."""
        creds = self.iam.sessions[role] if self.iam is not None and role else None
        with _CLIENT_LOCK:
            if (service, creds) not in self._clients:
                self._clients[(service, creds)] = boto3.session.Session(
                    **({} if creds is None else {"aws_access_key_id": creds.access_key_id,
                                                 "aws_secret_access_key": creds.secret_access_key,
                                                 "aws_session_token": creds.session_token})
                ).client(service, endpoint_url=self.endpoint, region_name=LOCAL_REGION,
                         config=None if creds is None else ROLE_CLIENT_CONFIG)
            return self._clients[(service, creds)]

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, bucket: str = DEFAULT_BUCKET, stack_name: str = DEFAULT_STACK, endpoint: str | None = None,
               overrides: dict[str, Any] | None = None, visibility_timeout: int | None = None,
               batching_window_s: int | None = None, batch_size: int | None = None, port: int = 0,
               enforce_iam: bool | None = None, spool: Spool | None = None) -> LocalStack:
        """Create the template's resources on ``endpoint`` (if None: a new server on ``port``, 0 = any free one).

        ``overrides`` are template parameter values (e.g. ``{"ModelName": ...}``);
        ``visibility_timeout`` / ``batching_window_s`` / ``batch_size`` shorten waits locally.
        ``enforce_iam`` (default: ``DERMSCORE_ENFORCE_IAM=1``): each function, and the transform
        container, under its own template.yaml role, enforced by the server (infra.iam).
        ``spool``: a new server spools the uploads it acknowledges (infra.spool).
        """
        server = None
        if endpoint is None:
            server, endpoint = start_server(port, spool=spool)
        use_endpoint(endpoint)
        spec = local_spec(bucket, stack_name=stack_name, overrides=overrides)
        changes = {k: v for k, v in (("queue_visibility_timeout", visibility_timeout),
                                     ("batching_window_s", batching_window_s),
                                     ("batch_size", batch_size)) if v is not None}
        spec = replace(spec, **changes)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=LOCAL_REGION)
        sqs = boto3.client("sqs", endpoint_url=endpoint, region_name=LOCAL_REGION)

        dlq_url = sqs.create_queue(QueueName=f"{stack_name}-images-dlq",
                                   Attributes={"MessageRetentionPeriod": str(spec.dlq_retention_s)})["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        queue_url = sqs.create_queue(QueueName=f"{stack_name}-images", Attributes={
            "VisibilityTimeout": str(spec.queue_visibility_timeout),
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn,
                                         "maxReceiveCount": str(spec.max_receive_count)}),
        })["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        # `!Ref ImagesQueue` (QUEUE_URL) resolves to the logical id locally: the real URL instead.
        spec = replace(spec, **{name: {k: queue_url if v == "ImagesQueue" else v for k, v in env.items()}
                                for name, env in (("enqueue_env", spec.enqueue_env),
                                                  ("collect_env", spec.collect_env))})

        s3.create_bucket(Bucket=spec.enqueue_env["BUCKET_NAME"])
        s3.put_bucket_notification_configuration(
            Bucket=spec.enqueue_env["BUCKET_NAME"],
            NotificationConfiguration={"QueueConfigurations": notification_configs(spec, queue_arn)})
        stack = cls(endpoint, spec, queue_url, queue_arn, dlq_url, dlq_arn, server)
        if os.environ.get(ENFORCE_ENV) == "1" if enforce_iam is None else enforce_iam:
            stack._enforce_iam(overrides)
        log.info("local stack %s on %s: bucket %s, queue %s", stack_name, endpoint, stack.bucket, queue_url)
        return stack

    def register_model(self, model_dir: str | Path) -> str:
        """Package ``model_dir`` as model.tar.gz, upload it and create the SageMaker Model."""
        from infra.package import build_model_tarball

        with tempfile.TemporaryDirectory(prefix="dermscore-model-") as tmp:
            tarball = Path(tmp) / "model.tar.gz"
            build_model_tarball(Path(model_dir), tarball)
            self.client("s3").upload_file(str(tarball), self.bucket, MODEL_KEY)
        url = f"s3://{self.bucket}/{MODEL_KEY}"
        sm = self.client("sagemaker")
        with contextlib.suppress(sm.exceptions.ClientError):
            sm.delete_model(ModelName=self.model_name)
        sm.create_model(ModelName=self.model_name, ExecutionRoleArn=LOCAL_ROLE_ARN,
                        PrimaryContainer={"Image": LOCAL_IMAGE, "ModelDataUrl": url})
        log.info("model %s registered from %s (%s)", self.model_name, model_dir, url)
        return url

    def _enforce_iam(self, overrides: dict[str, Any] | None) -> None:
        """The roles in the server, the admin user's key for this process's own clients (the
        environment, as use_endpoint set it), the transform role's session in the container's
        environment (as SageMaker hands the container its execution role); then enforcement."""
        self.iam = LocalIAM.create(self.endpoint, self.stack_name, local_refs(self), overrides)
        os.environ.update(self.iam.admin.env())
        self.spec = replace(self.spec, model_env={**self.spec.model_env, **self.iam.env(TRANSFORM_ROLE)})
        self.iam.start()

    def stop(self) -> None:
        if self.iam is not None:
            self.iam.close()
            if os.environ.get("AWS_ACCESS_KEY_ID") == self.iam.admin.access_key_id:
                os.environ.update(LOCAL_CREDENTIALS)
        if self.server is not None:
            self.server.stop()
            self.server = None

    # ---- invoking the functions like Lambda does ---------------------------------------------
    def function_env(self, function: str) -> dict[str, str]:
        """What Lambda would give the function: its template.yaml variables, plus (locally) the
        endpoint, region and dummy credentials of this stack (its role's session, IAM enforced)."""
        own = {"enqueue": self.spec.enqueue_env, "collect": self.spec.collect_env,
               "reconcile": self.spec.reconcile_env, "dispatch": self.spec.dispatch_env,
               "rescore": self.spec.rescore_env}[function]
        creds = LOCAL_CREDENTIALS if self.iam is None else self.iam.env(FUNCTION_ROLES[function])
        return {**creds, "AWS_REGION": LOCAL_REGION, "AWS_DEFAULT_REGION": LOCAL_REGION,
                "AWS_ENDPOINT_URL": self.endpoint, **own}

    def _runtime_of(self, env: dict[str, str]) -> Any:
        """Runtime.from_env; with IAM enforced its SageMaker client is the stack's own (moto checks
        SageMaker rights against Resource "*" only, which job-scoped grants never match: infra.iam)."""
        from handlers.runtime import Runtime

        rt = Runtime.from_env(env)
        return rt if self.iam is None else replace(rt, sagemaker=self.client("sagemaker"))

    def runtime(self, function: str) -> Any:
        """The function's settings and clients, built once (as in one warm Lambda container)."""
        with _CLIENT_LOCK:
            if function not in self._runtimes:
                self._runtimes[function] = self._runtime_of(self.function_env(function))
            return self._runtimes[function]

    def inject(self, function: str, env: dict[str, str] | None = None, **clients: Any) -> None:
        """Give a function other clients (tests: a SageMaker client that refuses, ...) and, with
        ``env``, other settings (variables over its template.yaml ones, e.g. a shorter bound)."""
        with _CLIENT_LOCK:
            current = (self._runtime_of({**self.function_env(function), **env}) if env
                       else self._runtimes.get(function))
        current = current or self.runtime(function)
        with _CLIENT_LOCK:
            self._runtimes[function] = replace(current, **clients)

    def invoke(self, function: str, event: dict[str, Any], rt: Any = None) -> Any:
        """Call handlers.<function>.lambda_handler as Lambda does, with that function's runtime
        (``rt``: another one, e.g. the reconciler's with the local SageMaker and Lambda)."""
        if function == "enqueue":
            from handlers.enqueue import lambda_handler
            timeout = self.spec.enqueue_timeout_s
        elif function == "collect":
            from handlers.collect import lambda_handler
            timeout = self.spec.collect_timeout_s
        elif function == "reconcile":
            from handlers.reconcile import lambda_handler
            timeout = self.spec.reconcile_timeout_s
        elif function == "dispatch":
            from handlers.dispatch import lambda_handler
            timeout = self.spec.dispatch_timeout_s
        elif function == "rescore":
            from handlers.rescore import lambda_handler
            timeout = self.spec.rescore_timeout_s
        else:
            raise ValueError(f"unknown function {function!r}")
        context = LambdaContext(function_name=f"{self.stack_name}-{function}", timeout_s=timeout or 120)
        return lambda_handler(event, context, rt=rt or self.runtime(function))

    # ---- inspection helpers --------------------------------------------------------------
    def queue_depth(self, dlq: bool = False) -> dict[str, int]:
        attrs = self.client("sqs").get_queue_attributes(
            QueueUrl=self.dlq_url if dlq else self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return {"visible": int(attrs["ApproximateNumberOfMessages"]),
                "in_flight": int(attrs["ApproximateNumberOfMessagesNotVisible"])}

    def list_keys(self, prefix: str) -> list[str]:
        return list(iter_keys(self.client("s3"), self.bucket, prefix))


def notification_configs(spec: LocalSpec, queue_arn: str) -> list[dict[str, Any]]:
    """S3 allows one suffix per rule set, so each suffix gets its own queue configuration."""
    def rules(suffix: str | None) -> list[dict[str, str]]:
        r = [{"Name": "prefix", "Value": spec.notification_prefix}] if spec.notification_prefix else []
        return r + ([{"Name": "suffix", "Value": suffix}] if suffix else [])

    configs = []
    for i, suffix in enumerate(spec.notification_suffixes or (None,)):
        cfg: dict[str, Any] = {"Id": f"images-{i}", "QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*"]}
        if rules(suffix):
            cfg["Filter"] = {"Key": {"FilterRules": rules(suffix)}}
        configs.append(cfg)
    return configs
