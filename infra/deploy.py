"""``dermscore publish-model``: package a model, upload it, print the ``sam deploy`` values.

    dermscore publish-model --bucket dermscore-123456789012-us-east-1 [--model models/default]

1. builds ``model.tar.gz`` with :func:`infra.package.build_model_tarball` (reproducible:
   the same model and code give the same sha256);
2. uploads it to ``s3://<bucket>/models/<sha>/model.tar.gz`` unless that exact archive is
   already there;
3. prints the parameter overrides for ``sam deploy`` on stdout, e.g.::

       ModelDataUrl=s3://<bucket>/models/<sha>/model.tar.gz ModelName=dermscore-model-<sha>

   merged into the ``parameter_overrides`` of ``samconfig.toml`` when one is found (SAM CLI
   replaces, not merges, the configured overrides with the ones given on the command line).

A SageMaker Model is immutable, so every archive gets its own ModelName (derived from the
sha); CloudFormation then replaces the Model on deploy. The bucket is the stack's own
(created by the first ``sam deploy``, see docs/deploy.md).
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch.bundle import sha256_file
from dermscore import layout, options
from dermscore.aws import error_code, is_missing

log = logging.getLogger("dermscore.deploy")

SHA_LENGTH = 16            # hex digits of the archive's sha256 in its key and the model name
MODEL_NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")   # SageMaker ModelName


def model_key(sha256: str) -> str:
    return f"{layout.MODELS}{sha256[:SHA_LENGTH]}/model.tar.gz"


def model_name(stack_name: str, sha256: str) -> str:
    stem = re.sub(r"[^a-zA-Z0-9-]", "-", stack_name).strip("-")[: 63 - len("-model-") - SHA_LENGTH] or "dermscore"
    name = f"{stem}-model-{sha256[:SHA_LENGTH]}"
    assert MODEL_NAME_RE.match(name), name
    return name


@dataclass(frozen=True)
class Published:
    bucket: str
    key: str
    sha256: str
    model_name: str
    uploaded: bool          # False: the same archive was already there

    @property
    def model_data_url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def overrides(self) -> dict[str, str]:
        return {"ModelDataUrl": self.model_data_url, "ModelName": self.model_name}


def already_uploaded(s3: Any, bucket: str, key: str, sha256: str) -> bool:
    from botocore.exceptions import ClientError
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_missing(exc):
            return False
        raise
    return head.get("Metadata", {}).get("sha256") == sha256


def publish(model_dir: Path, bucket: str, stack_name: str = "dermscore", s3: Any = None,
            out: Path | None = None) -> Published:
    """Build the archive of ``model_dir`` and upload it to the stack's bucket (once)."""
    from infra.package import build_model_tarball  # lazily: it imports torch (batch.model)

    if s3 is None:
        import boto3
        s3 = boto3.client("s3")
    with tempfile.TemporaryDirectory(prefix="dermscore-publish-") as tmp:
        tarball = build_model_tarball(Path(model_dir), Path(out) if out else Path(tmp) / "model.tar.gz")
        sha = sha256_file(tarball)
        key = model_key(sha)
        uploaded = False
        if already_uploaded(s3, bucket, key, sha):
            log.info("s3://%s/%s already holds this archive (sha256 %s)", bucket, key, sha)
        else:
            log.info("uploading %s (%.1f MB) to s3://%s/%s", tarball, tarball.stat().st_size / 1e6, bucket, key)
            s3.upload_file(str(tarball), bucket, key,
                           ExtraArgs={"Metadata": {"sha256": sha}, "ContentType": "application/gzip"})
            uploaded = True
    return Published(bucket=bucket, key=key, sha256=sha, model_name=model_name(stack_name, sha), uploaded=uploaded)


# --------------------------------------------------------------------------- samconfig.toml

def _parse_overrides(value: Any) -> dict[str, str]:
    items = value if isinstance(value, list) else shlex.split(value or "")
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = str(item).partition("=")
        if sep:
            out[k] = v
    return out


def samconfig_overrides(path: Path, config_env: str = "default") -> dict[str, str]:
    """``parameter_overrides`` of ``[<env>.deploy.parameters]`` (or ``[<env>.global.parameters]``)."""
    if not path.is_file():
        return {}
    cfg = tomllib.loads(path.read_text())
    env = cfg.get(config_env, {})
    for section in ("deploy", "global"):
        params = env.get(section, {}).get("parameters", {})
        if "parameter_overrides" in params:
            return _parse_overrides(params["parameter_overrides"])
    return {}


def format_overrides(values: dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in values.items())


# --------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bucket", required=True, help="the stack's bucket (output BucketName of the first sam deploy)")
    options.add_model(p)
    p.add_argument("--stack-name", default="dermscore", help="stack name: prefix of the SageMaker model name")
    p.add_argument("--samconfig", type=Path, default=Path("samconfig.toml"),
                   help="merge into this file's parameter_overrides (if it exists)")
    p.add_argument("--config-env", default="default", help="samconfig.toml environment")
    p.add_argument("--region", default=None, help="AWS region of the bucket (default: from the environment)")
    p.add_argument("--keep", type=Path, default=None, help="also keep the built model.tar.gz at this path")


def run(args: argparse.Namespace) -> int:
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", region_name=args.region)
    try:
        s3.head_bucket(Bucket=args.bucket)
    except ClientError as exc:
        log.error("bucket %s is not reachable (%s). Deploy the stack first (sam deploy, ModelDataUrl empty): "
                  "it creates the bucket <stack>-<account>-<region>.", args.bucket,
                  error_code(exc))
        return 2
    result = publish(args.model, args.bucket, stack_name=args.stack_name, s3=s3, out=args.keep)
    merged = {**samconfig_overrides(args.samconfig, args.config_env), **result.overrides()}
    line = format_overrides(merged)
    log.info("model %s: %s (%s)", result.model_name, result.model_data_url,
             "uploaded" if result.uploaded else "unchanged, not uploaded again")
    log.info("next: sam deploy --parameter-overrides %s", line)
    sys.stdout.write(line + "\n")
    return 0
