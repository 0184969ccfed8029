"""Shared fixtures: one moto server (HTTP on 127.0.0.1) per test session, a tiny random model.

Every test that touches AWS APIs builds its own stack (unique bucket, queues, model and job
prefix) on that server, so tests do not see each other's resources. The AWS_* environment
(endpoint + obviously fake credentials) is set only around those tests and restored after,
because other test modules use moto's in-process ``mock_aws`` (which also resets moto's state:
hence no resources are shared across modules).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.stack import preserved_environ

# The local transform runner's fast in-process mode for the suite (the fault suite, the query and
# report tests ...); tests of the real serving stack (test_pipeline_e2e, test_serving) select
# "serving" themselves. DERMSCORE_TRANSFORM=serving pytest ... runs every suite through it.
os.environ.setdefault("DERMSCORE_TRANSFORM", "inprocess")

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000" / "fullres_sample"


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from infra.motoserver import start_server

    server, endpoint = start_server()
    yield endpoint
    server.stop()


def random_model(model_dir: Path, size: int = 64) -> Path:
    """A random EfficientNet-Lite0 at size x size: plumbing only, never a prediction anyone reads."""
    from batch.model import ModelMeta, build_network, save

    save(build_network("efficientnet_lite0"),
         ModelMeta(name="test", version="0", arch="efficientnet_lite0", input_size=(size, size)), model_dir)
    return model_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture()
def aws_env(moto_endpoint: str) -> Iterator[str]:
    """AWS_* variables pointing at the session's moto server, restored after the test."""
    from infra.stack import use_endpoint

    with preserved_environ():
        use_endpoint(moto_endpoint)
        yield moto_endpoint


@pytest.fixture()
def make_stack(aws_env: str):
    """Factory for a LocalStack with unique names on the session's server; each is stopped after
    the test (a stack under IAM must not leave the shared server enforcing)."""
    from infra.stack import LocalStack

    made = []

    def make(**kwargs):
        name = kwargs.pop("stack_name", None) or unique_name()
        overrides = {"ModelName": f"{name}-model", **kwargs.pop("overrides", {})}
        made.append(LocalStack.create(bucket=kwargs.pop("bucket", f"{name}-images"), stack_name=name,
                                      endpoint=aws_env, overrides=overrides, **kwargs))
        return made[-1]

    yield make
    for stack in made:
        stack.stop()


def stage_transform_job(stack, name: str, items: list, out_lines: list, **request: Any) -> dict:
    """Write a job's manifest (ManifestLines) and its transform output (OutputLines) as the runner
    would; return the job's CreateTransformJob request (``request`` adds or overrides fields), for a
    state-change event."""
    from dermscore import layout

    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.bucket, Key=layout.manifest_key(name),
                  Body="".join(it.to_json() + "\n" for it in items).encode())
    s3.put_object(Bucket=stack.bucket, Key=f"{layout.transform_output_prefix(name)}{name}.jsonl.out",
                  Body="".join(o.to_json() + "\n" for o in out_lines).encode())
    return {
        "TransformJobName": name, "ModelName": stack.model_name,
        "TransformInput": {"DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": f"s3://{stack.bucket}/{layout.manifest_key(name)}"}},
            "ContentType": "application/jsonlines", "SplitType": "Line"},
        "TransformOutput": {"S3OutputPath": f"s3://{stack.bucket}/{layout.transform_output_prefix(name)}",
                            "AssembleWith": "Line", "Accept": "application/jsonlines"},
        **request,
    }


EVENTS = Path(__file__).resolve().parent / "events"
RECORDED_BUCKET = "dermscore-123456789012-us-east-1"    # the names the recorded events carry
RECORDED_QUEUE_ARN = "arn:aws:sqs:us-east-1:123456789012:dermscore-images"
RECORDED_JOB = "dermscore-0123456789abcdef"
RECORDED_ETAG = "recorded-etag"


def recorded_event(name: str, **names: str) -> dict:
    """A recorded AWS event from ``tests/events/`` (the documented shapes, not made by the local
    stack), with its resource names swapped for a test's: ``bucket``, ``queue_arn``, ``job``, ``etag``."""
    text = (EVENTS / name).read_text()
    for old, new in ((RECORDED_QUEUE_ARN, names.get("queue_arn")), (RECORDED_BUCKET, names.get("bucket")),
                     (RECORDED_JOB, names.get("job")), (RECORDED_ETAG, names.get("etag"))):
        if new:
            text = text.replace(old, new)
    return json.loads(text)


def sample_images(n: int) -> list[Path]:
    files = sorted(SAMPLES.glob("*.jpg"))[:n]
    if len(files) < n:
        pytest.skip(f"needs {n} sample images in {SAMPLES}")
    return files


@pytest.fixture(scope="session")
def varied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random EfficientNet-Lite0 at 64x64 whose outputs differ between images (plumbing only).

    A freshly initialised network gives every image the same probabilities; batch-norm
    statistics taken from a few sample images plus a scaled-up last layer spread them, and the
    melanoma threshold sits at the median p(mel), so some images are high risk and some not.
    """
    import numpy as np
    import torch

    from batch.model import METADATA_FILE, ModelMeta, build_network, save
    from batch.scorer import Scorer
    from dermscore.imaging import decode

    files = sample_images(8)
    model_dir = tmp_path_factory.mktemp("varied-model")
    torch.manual_seed(7)
    net = build_network("efficientnet_lite0")
    px = torch.from_numpy(np.stack([decode(f.read_bytes(), (64, 64)).pixels for f in files])).permute(0, 3, 1, 2)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(px)
        net[1]._fc.weight.mul_(10)
    net.eval()
    save(net, ModelMeta(name="test-varied", version="0", arch="efficientnet_lite0", input_size=(64, 64)), model_dir)
    p_mel = sorted(r.probabilities["mel"] for r in Scorer.from_model_dir(model_dir, "cpu").score_files(files))
    meta = ModelMeta.read(model_dir / METADATA_FILE)
    meta.melanoma_threshold = p_mel[len(p_mel) // 2]
    meta.write(model_dir / METADATA_FILE)
    return model_dir


@contextlib.contextmanager
def transform_mode(mode: str) -> Iterator[None]:
    old = os.environ.get("DERMSCORE_TRANSFORM")
    os.environ["DERMSCORE_TRANSFORM"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DERMSCORE_TRANSFORM", None)
        else:
            os.environ["DERMSCORE_TRANSFORM"] = old


@pytest.fixture(scope="session")
def serve_env():
    """The serving stack's venv and Java (``make setup``): skipped without them, unless
    REQUIRE_SERVING=1 (``make test``: CI must run these tests)."""
    from infra.serving import ServeEnv, ServingUnavailable

    try:
        return ServeEnv.locate()
    except ServingUnavailable as exc:
        if os.environ.get("REQUIRE_SERVING") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def serving_mode(serve_env):
    """The module's pipelines transform through the real serving stack."""
    with transform_mode("serving"):
        yield serve_env


class Served:
    """A ``dermscore serve`` subprocess (the real command) and what it printed."""

    def __init__(self, model: Path, out: Path, *args: str, env: dict[str, str] | None = None,
                 timeout_s: float = 180) -> None:
        import subprocess
        import sys
        import threading
        import time

        env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}.items()
               if not k.startswith("AWS_")}
        self.out, self.lines = out, []
        self.proc = subprocess.Popen([sys.executable, "-m", "dermscore.cli", "serve", "--model", str(model),
                                      "--out", str(out), *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()  # type: ignore[arg-type]
        deadline = time.monotonic() + timeout_s
        while self.stack_line() is None and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.stack_line() is None:
            self.proc.kill()
            pytest.fail("dermscore serve did not start:\n" + "".join(self.lines[-40:]))
        _, self.endpoint, _, bucket = self.stack_line().split()[4:8]  # "... at <ep> (bucket <name>, region ..."
        self.bucket = bucket.rstrip(",")

    def stack_line(self) -> str | None:
        return next((x for x in list(self.lines) if x.startswith("dermscore serve: local stack at ")), None)

    def s3(self):
        import boto3

        from dermscore.template import LOCAL_REGION
        from infra.stack import LOCAL_CREDENTIALS

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=LOCAL_REGION,
                            aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def stop(self) -> None:
        import signal
        import subprocess

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

