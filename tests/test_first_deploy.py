"""What AWS checks at deploy and run time that no linter sees: the first `sam deploy` on a new account.

Each test pins one failure a new user's first deploy or first scoring run would meet: a
reservation that new accounts refuse, a Parquet codec the managed layer lacks, an execution role
that cannot pull its image, a 403 where the handlers expect a 404, a layer ARN that does not exist
in the region, transform settings CreateTransformJob refuses, and an image tag that moves.
docs/deploy.md, "Before the first deploy", says what each looks like when it is missed.
"""

from __future__ import annotations

import io
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dermscore.aws import is_missing
from dermscore.template import Resolver, load_template, translate
from handlers import storage
from infra.container import CONTAINER

# One list of the roles' statements, as test_template reads them.
from tests.test_template import as_list, statements

ROLES = ("EnqueueRole", "DispatchRole", "CollectRole", "ReconcileRole", "TransformRole")
# The roles whose code reads objects that may not exist and takes "missing" as an answer:
# dispatch (a part another run dispatched), collect (an image's document, the job's marker),
# reconcile (markers, documents), the container (an upload deleted before it was scored).
READS_MAYBE_MISSING = ("DispatchRole", "CollectRole", "ReconcileRole", "TransformRole", "RescoreRole")
# Lambda's limit on a function's unzipped code plus its layers, and what the AWS SDK for pandas
# python3.11 layer takes of it unzipped (~204 MB, measured on its 3.x releases; the zip is ~55 MB).
LAMBDA_UNZIPPED_LIMIT_MIB = 250
PANDAS_LAYER_UNZIPPED_MIB = 204
MARGIN_MIB = 16


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


def policy(template: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return statements(template["Resources"][role]["Properties"]["Policies"][0]["PolicyDocument"])


# --------------------------------------------------------------------------- 1. reserved concurrency

def test_the_dispatcher_reserves_no_concurrency_unless_asked(template):
    """Lambda refuses a reservation that leaves an account fewer unreserved executions than its
    minimum (CREATE_FAILED, rollback), as on new accounts with a low quota: off by default."""
    param = template["Parameters"]["DispatchReservedConcurrency"]
    assert param["Default"] == 0 and param["AllowedValues"] == [0, 1]
    fn = template["Resources"]["DispatchFunction"]["Properties"]
    assert Resolver(template).resolve(fn["ReservedConcurrentExecutions"]) is None      # AWS::NoValue
    assert Resolver(template, overrides={"DispatchReservedConcurrency": 1}).resolve(
        fn["ReservedConcurrentExecutions"]) == 1
    translated = translate()["Resources"]["DispatchFunction"]["Properties"]
    assert translated["ReservedConcurrentExecutions"] == {
        "Fn::If": ["ReserveDispatch", {"Ref": "DispatchReservedConcurrency"}, {"Ref": "AWS::NoValue"}]}
    no_reservation = [k for k, r in template["Resources"].items()
                      if r["Type"] == "AWS::Serverless::Function" and k != "DispatchFunction"
                      and "ReservedConcurrentExecutions" in r["Properties"]]
    assert no_reservation == []


# --------------------------------------------------------------------------- 2. Parquet codec

class LayerPyarrow:
    """pyarrow as the AWS SDK for pandas layer builds it: Parquet codecs other than snappy and
    zlib raise ArrowNotImplementedError (its build script: ARROW_WITH_ZSTD=OFF, LZ4, BROTLI, BZ2 off)."""

    BUILT = ("snappy", "gzip", "none", None)

    def __init__(self) -> None:
        self.written: list[str | None] = []
        self._write_table = pq.write_table

    def write_table(self, table: pa.Table, where: Any, compression: Any = "snappy", **kw: Any) -> None:
        self.written.append(compression)
        if compression not in self.BUILT:
            raise pa.ArrowNotImplementedError(f"Support for codec '{compression}' not built")
        self._write_table(table, where, compression=compression, **kw)


class RecordingS3:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_object(self, Bucket: str, Key: str, Body: bytes, **kw: Any) -> None:  # noqa: N803 (boto3's names)
        self.objects[Key] = Body


def test_handlers_write_parquet_only_with_codecs_the_layer_has(monkeypatch):
    layer = LayerPyarrow()
    monkeypatch.setattr(pq, "write_table", layer.write_table)
    with pytest.raises(pa.ArrowNotImplementedError):   # the stand-in refuses what the layer refuses
        pq.write_table(pa.table({"a": [1]}), io.BytesIO(), compression="zstd")
    s3 = RecordingS3()
    row = {"image_key": "incoming/a.jpg", "reason": "empty_file", "stage": "enqueue"}
    from dermscore import results
    table = results.to_table([{k: row.get(k) for k in results.FAILURE_SCHEMA.names}], results.FAILURE_SCHEMA)
    storage.put_parquet(s3, "bucket", "results/failures/dt=2026-12-03/x.parquet", table)
    assert layer.written[-1] == storage.PARQUET_CODEC
    assert set(storage.LAYER_PARQUET_CODECS) <= set(LayerPyarrow.BUILT)
    (body,) = s3.objects.values()
    assert pq.read_metadata(io.BytesIO(body)).row_group(0).column(0).compression == "SNAPPY"


def test_lambda_code_names_no_codec_the_layer_lacks():
    from infra.package import LAMBDA_ENTRIES, code_closure

    for rel, path in code_closure(LAMBDA_ENTRIES):
        text = path.read_text()
        for codec in ("zstd", "lz4", "brotli", "bz2"):
            assert not re.search(rf"compression\s*=\s*['\"]{codec}", text), f"{rel} writes {codec}"


# --------------------------------------------------------------------------- 3. pulling the image

def ecr_statements(template: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in policy(template, "TransformRole") if any(a.startswith("ecr:") for a in as_list(s["Action"]))]


@pytest.mark.parametrize(("uri", "repository_arn"), [
    ("", "arn:aws:ecr:us-east-1:763104351884:repository/pytorch-inference"),
    ("111122223333.dkr.ecr.eu-west-1.amazonaws.com/dermscore:1.2",
     "arn:aws:ecr:eu-west-1:111122223333:repository/dermscore"),
    ("111122223333.dkr.ecr.eu-west-1.amazonaws.com/team/serving/dermscore@sha256:" + "ab" * 32,
     "arn:aws:ecr:eu-west-1:111122223333:repository/team/serving/dermscore"),
])
def test_the_transform_role_may_pull_its_image_and_no_other(template, uri, repository_arn):
    """CreateModel's execution role needs ECR pull rights on the image's repository (else the
    job fails: "does not have BatchGetImage permission for the image")."""
    resolver = Resolver(template, overrides={"ContainerImageUri": uri})
    pulls = ecr_statements(template)
    by_action = {a: resolver.resolve(s["Resource"]) for s in pulls for a in as_list(s["Action"])}
    assert by_action == {"ecr:GetAuthorizationToken": "*",   # no resource-level permissions
                         "ecr:BatchGetImage": repository_arn, "ecr:GetDownloadUrlForLayer": repository_arn,
                         "ecr:BatchCheckLayerAvailability": repository_arn}
    image = resolver.resolve(template["Resources"]["TransformModel"]["Properties"]["PrimaryContainer"]["Image"])
    assert image == (uri or f"763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:{CONTAINER.image_tag}")
    for role in ROLES[:-1]:   # no Lambda pulls images
        assert not [s for s in policy(template, role) if any(a.startswith("ecr:") for a in as_list(s["Action"]))]


def test_a_container_image_outside_ecr_is_refused_at_deploy(template):
    pattern = re.compile(template["Parameters"]["ContainerImageUri"]["AllowedPattern"])
    assert pattern.match("") and pattern.match("111122223333.dkr.ecr.eu-west-1.amazonaws.com/team/x:1")
    assert not pattern.match("docker.io/library/python:3.12")
    assert not pattern.match("111122223333.dkr.ecr.eu-west-1.amazonaws.com")


# --------------------------------------------------------------------------- 4. 403 for a missing key

def test_roles_that_read_maybe_missing_objects_may_list_the_bucket(template):
    """A GET of a missing key answers 404 only to a caller with s3:ListBucket on the bucket; a
    grant with an s3:prefix condition does not count (a GET carries no prefix), so the handlers
    would see AccessDenied, which is rightly not "missing", and every collection would fail."""
    for role in ROLES:
        lists = [s for s in policy(template, role) if "s3:ListBucket" in as_list(s["Action"])]
        assert [s["Resource"] for s in lists] == [{"Fn::GetAtt": ["ImagesBucket", "Arn"]}], role
        (grant,) = lists
        if role in READS_MAYBE_MISSING:
            assert "Condition" not in grant, f"{role}: a conditioned ListBucket makes a missing key a 403"
        else:   # enqueue only counts pending parts and never reads back
            assert grant["Condition"] == {"StringLike": {"s3:prefix": ["pending/*"]}}


def test_access_denied_is_an_error_not_a_missing_object():
    from botocore.exceptions import ClientError

    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
    missing = ClientError({"Error": {"Code": "NoSuchKey", "Message": "no such key"}}, "GetObject")
    assert is_missing(missing) and not is_missing(denied)


# --------------------------------------------------------------------------- 5. the layer

def test_the_pandas_layer_is_a_full_arn_per_region(template):
    layers = template["Mappings"]["PandasLayer"]
    assert {"us-east-1", "eu-west-1", "eu-central-1", "ap-southeast-2"} <= set(layers)
    for region, entry in layers.items():
        m = re.fullmatch(r"arn:(aws|aws-cn):lambda:([a-z0-9-]+):(\d{12}):layer:AWSSDKPandas-Python311:(\d+)",
                         entry["Arn"])
        assert m and m.group(2) == region, entry
    glob = template["Globals"]["Function"]
    assert glob["Runtime"] == "python3.11" and glob["Architectures"] == ["x86_64"]   # the layer's build
    for region in ("us-east-1", "eu-west-1"):
        resolved = Resolver(template, refs={"AWS::Region": region}).resolve(glob["Layers"])
        assert resolved == [layers[region]["Arn"]]
    own = "arn:aws:lambda:eu-west-1:111122223333:layer:pandas:7"
    assert Resolver(template, overrides={"PandasLayerArn": own}).resolve(glob["Layers"]) == [own]
    assert "PandasLayerVersion" not in template["Parameters"]


def lambda_package_mib(build_dir) -> float:
    return sum(p.stat().st_size for p in build_dir.rglob("*") if p.is_file()) / 2**20


def test_the_function_package_and_the_layer_fit_lambdas_limit(tmp_path):
    """The same package `sam build` makes (infra/lambda/Makefile: requirements + import closure)."""
    import subprocess
    import sys

    from infra.package import copy_lambda_code
    from tests.test_template import REPO_ROOT

    out = tmp_path / "fn"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--no-deps",
                        "--disable-pip-version-check", "--platform", "manylinux2014_x86_64", "--implementation", "cp",
                        "--python-version", "3.11", "--only-binary=:all:", "--target", str(out),
                        "-r", str(REPO_ROOT / "infra" / "lambda" / "requirements.txt")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no package index reachable: {r.stderr.strip()[-200:]}")
    copy_lambda_code(out)
    size = lambda_package_mib(out)
    assert size + PANDAS_LAYER_UNZIPPED_MIB <= LAMBDA_UNZIPPED_LIMIT_MIB - MARGIN_MIB, f"{size:.1f} MiB"


# --------------------------------------------------------------------------- 6. transform settings

def rules_pass(template: dict[str, Any], **params: Any) -> bool:
    resolver = Resolver(template, overrides=params)
    for rule in template.get("Rules", {}).values():
        if "RuleCondition" in rule and not resolver.resolve(rule["RuleCondition"]):
            continue
        if not all(resolver.resolve(a["Assert"]) for a in rule["Assertions"]):
            return False
    return True


def test_rules_refuse_what_create_transform_job_refuses(template):
    """CreateTransformJob: MaxPayloadInMB <= 100 and MaxConcurrentTransforms x MaxPayloadInMB <= 100."""
    params = template["Parameters"]
    payloads = params["MaxPayloadInMB"]["AllowedValues"]
    concurrency = params["MaxConcurrentTransforms"]
    concurrencies = range(concurrency["MinValue"], concurrency["MaxValue"] + 1)
    assert max(payloads) <= 100
    for mb in payloads:
        for n in concurrencies:
            assert rules_pass(template, MaxPayloadInMB=mb, MaxConcurrentTransforms=n) == (mb * n <= 100), (mb, n)
    assert rules_pass(template)   # the defaults deploy


# --------------------------------------------------------------------------- 7. the image tag

def test_the_container_image_tag_is_dated(template):
    tag = template["Parameters"]["PyTorchImageTag"]["Default"]
    assert tag == CONTAINER.image_tag
    # <version>-gpu-<python>-<cuda>-<os>-sagemaker-v<patch>-<yyyy-mm-dd-hh-mm-ss>: a release that never moves
    assert re.fullmatch(r"2\.6\.0-gpu-py312-cu124-ubuntu22\.04-sagemaker-v\d+\.\d+-\d{4}(-\d\d){5}", tag), tag
