"""`dermscore publish-model` against moto (in-process): build, upload once, print sam deploy values."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from dermscore import cli, layout
from dermscore.template import load_template
from infra import deploy

BUCKET = "dermscore-123456789012-us-east-1"


@pytest.fixture()
def s3(monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")       # moto: nothing leaves the process
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def test_publish_uploads_once_under_models_sha(s3, tiny_model: Path, tmp_path: Path):
    first = deploy.publish(tiny_model, BUCKET, stack_name="dermscore", s3=s3, out=tmp_path / "model.tar.gz")
    sha = deploy.sha256_file(tmp_path / "model.tar.gz")
    assert first.uploaded and first.sha256 == sha
    assert first.key == f"{layout.MODELS}{sha[:16]}/model.tar.gz"
    body = s3.get_object(Bucket=BUCKET, Key=first.key)
    assert body["Metadata"]["sha256"] == sha and body["Body"].read() == (tmp_path / "model.tar.gz").read_bytes()
    # the same model again: same archive (reproducible), nothing uploaded
    again = deploy.publish(tiny_model, BUCKET, stack_name="dermscore", s3=s3)
    assert (again.sha256, again.key, again.uploaded) == (sha, first.key, False)
    assert again.model_name == first.model_name == f"dermscore-model-{sha[:16]}"


def test_published_values_fit_the_template():
    t = load_template()
    p = t["Parameters"]
    pub = deploy.Published(bucket=BUCKET, key=deploy.model_key("ab" * 32), sha256="ab" * 32,
                           model_name=deploy.model_name("a-very-long-stack-name-" * 3, "ab" * 32), uploaded=True)
    assert re.fullmatch(p["ModelDataUrl"]["AllowedPattern"], pub.model_data_url)
    assert re.fullmatch(p["ModelName"]["AllowedPattern"], pub.model_name) and len(pub.model_name) <= 63
    assert set(pub.overrides()) <= set(p)
    # the SageMaker execution role may read what was uploaded
    reads = [r for s in t["Resources"]["TransformRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
             if isinstance(s, dict) and s.get("Action") == "s3:GetObject" for r in s["Resource"]]
    assert {"Fn::Sub": "${ImagesBucket.Arn}/" + layout.MODELS + "*"} in reads


def test_cli_prints_overrides_merged_with_samconfig(s3, tiny_model: Path, tmp_path: Path, capsys):
    samconfig = tmp_path / "samconfig.toml"
    samconfig.write_text('version = 0.1\n[default.deploy.parameters]\n'
                         'parameter_overrides = "TransformInstanceCount=2 ModelName=old AlarmEmail=\\"a@b.c\\""\n')
    rc = cli.main(["publish-model", "--bucket", BUCKET, "--model", str(tiny_model), "--samconfig", str(samconfig)])
    assert rc == 0
    values = dict(kv.split("=", 1) for kv in shlex.split(capsys.readouterr().out.strip()))
    assert values["TransformInstanceCount"] == "2" and values["AlarmEmail"] == "a@b.c"
    assert values["ModelName"].startswith("dermscore-model-")
    assert values["ModelDataUrl"].startswith(f"s3://{BUCKET}/{layout.MODELS}")
    key = values["ModelDataUrl"].removeprefix(f"s3://{BUCKET}/")
    assert s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0


def test_cli_refuses_a_missing_bucket(s3, tiny_model: Path):
    assert cli.main(["publish-model", "--bucket", "no-such-bucket", "--model", str(tiny_model)]) == 2


def test_example_samconfig_is_valid():
    path = Path(__file__).resolve().parents[1] / "samconfig.toml"
    overrides = deploy.samconfig_overrides(path)
    params = load_template()["Parameters"]
    assert overrides and set(overrides) <= set(params)
    import tomllib
    cfg = tomllib.loads(path.read_text())["default"]
    assert cfg["deploy"]["parameters"]["capabilities"] == "CAPABILITY_IAM"
    assert "stack_name" in cfg["global"]["parameters"]
