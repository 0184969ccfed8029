"""Each function under its own role on the local stack (infra/iam.py): template.yaml's roles in moto.

1. The end-to-end run of test_pipeline_e2e (through the serving stack) and the fault suite of
   test_faults (CI size: DERMSCORE_FAULT_UPLOADS) pass with every handler and the transform
   container signing as its own role, moto enforcing IAM: the same tests, collected here again
   with DERMSCORE_ENFORCE_IAM=1.
2. A permission removed from the template makes a run fail, with the AccessDenied visible.
3. What moto does not evaluate (conditions, ``?`` wildcards, DeleteObjects per key, Lambda and
   SageMaker resources, the 403-for-missing rule) is evaluated here on the resolved policies,
   with the requests the handlers make, as AWS evaluates them (:func:`aws_allows`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from conftest import preserved_environ, recorded_event, sample_images, transform_mode

# Collected here as well, so they run under roles (the autouse fixture below): the fault suite ...
from test_faults import (  # noqa: F401
    make_pipeline,
    outcome,
    test_fault_suite_every_upload_ends_in_exactly_one_place,
    test_lost_state_change_events_are_recovered_by_the_reconciler,
)

# ... and the end-to-end run (its `scored` fixture is this module's, below).
from test_pipeline_e2e import (  # noqa: F401
    score_the_sample,
    test_bad_files_give_failure_rows_with_reasons,
    test_every_real_image_gets_one_row,
    test_one_json_document_per_image,
    test_sql_example_and_nothing_left_in_flight,
)

# ... and a give-up that fences a collect off, under the collect and reconcile roles.
from test_reconcile import test_a_fenced_collect_stops_and_the_give_up_places_the_rest  # noqa: F401

# ... and a re-score under the re-score function's role.
from test_rescore import test_what_enqueue_refused_is_skipped_and_named_keys_may_be_missing  # noqa: F401

from dermscore import layout, reasons
from dermscore.template import LOCAL_ACCOUNT_ID, LOCAL_REGION, load_template
from infra import iam
from infra.stack import LOCAL_CREDENTIALS, LambdaContext

ROLE_NAMES = iam.ROLES


@pytest.fixture(autouse=True)
def _under_roles(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every stack a test of this module creates enforces IAM; none outlives its test (the server
    is shared: a stack created while another enforces could not even create its queues)."""
    from moto import settings

    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    monkeypatch.setenv(iam.ENFORCE_ENV, "1")
    yield
    left, settings.INITIAL_NO_AUTH_ACTION_COUNT = settings.INITIAL_NO_AUTH_ACTION_COUNT, before
    assert left == before, "a stack of this test left IAM enforced"


def stranger_refused(stack) -> str:
    """The error a request signed with the key every client used before enforcement gets."""
    stranger = boto3.client("s3", endpoint_url=stack.endpoint, region_name=LOCAL_REGION,
                            aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    try:
        stranger.list_objects_v2(Bucket=stack.bucket)
    except stranger.exceptions.ClientError as exc:
        return exc.response["Error"]["Code"]
    return "allowed"


@pytest.fixture(scope="module")
def scored(serve_env, moto_endpoint, tiny_model, tmp_path_factory):
    """test_pipeline_e2e's run, through the serving stack, every function under its own role; the
    pipeline is closed before the tests look at the outcome (its stack stops enforcing)."""
    run = score_the_sample(moto_endpoint, tiny_model, tmp_path_factory)
    with transform_mode("serving"), pytest.MonkeyPatch.context() as mp:
        mp.setenv(iam.ENFORCE_ENV, "1")
        outcome = next(run)            # the pipeline ran
        outcome.stranger = stranger_refused(outcome.pipeline.stack)
        next(run, None)                # its close, and its environment restored: then these settings
    yield outcome


# --------------------------------------------------------------------------- 1. under roles

def test_the_end_to_end_run_was_under_roles(scored) -> None:
    """The run above really was enforced: the handlers' and the container's clients signed as
    their roles, and the server refused the key every client used before."""
    stack = scored.pipeline.stack
    assert scored.stranger == "InvalidAccessKeyId"
    for function, role in iam.FUNCTION_ROLES.items():
        signer = stack.runtime(function).s3._request_signer._credentials
        assert signer.access_key == stack.iam.sessions[role].access_key_id, function
    transform = stack.iam.sessions[iam.TRANSFORM_ROLE].access_key_id
    assert stack.spec.model_env["AWS_ACCESS_KEY_ID"] == transform    # the serving stack's environment
    assert scored.pipeline.runner.s3._request_signer._credentials.access_key == transform


def test_a_stack_without_enforcement_leaves_the_server_open(make_stack, monkeypatch) -> None:
    from moto import settings

    monkeypatch.delenv(iam.ENFORCE_ENV)
    stack = make_stack()
    assert stack.iam is None and math.isinf(settings.INITIAL_NO_AUTH_ACTION_COUNT)
    assert stranger_refused(stack) == "allowed"


# --------------------------------------------------------------------------- 2. a permission removed

def without_resource(template: dict[str, Any], role: str, sid: str, resource: str) -> dict[str, Any]:
    """A copy of ``template`` whose ``role`` statement ``sid`` no longer names ``resource``."""
    t = copy.deepcopy(template)
    for policy in t["Resources"][role]["Properties"]["Policies"]:
        for s in policy["PolicyDocument"]["Statement"]:
            if s.get("Sid") == sid:
                s["Resource"] = [r for r in s["Resource"] if r != {"Fn::Sub": resource}]
                return t
    raise KeyError(f"{role} has no statement {sid}")


def roles_without(monkeypatch: pytest.MonkeyPatch, role: str, sid: str, resource: str) -> None:
    """The stacks created next get their roles from template.yaml less that one resource."""
    trimmed = without_resource(load_template(), role, sid, resource)
    monkeypatch.setattr(iam, "load_template", lambda: trimmed)


def test_a_permission_missing_from_the_template_fails_the_run(moto_endpoint, tiny_model, monkeypatch,
                                                              caplog) -> None:
    """EnqueueRole without s3:PutObject on pending/*: enqueue cannot write its part, the batch fails
    with AccessDenied on every receive until SQS moves the upload's event to the DLQ; nothing is
    scored, nothing is pending."""
    from infra.stack import use_endpoint

    roles_without(monkeypatch, "EnqueueRole", "WritePendingPartsFailuresAndRejectionClaims",
                  "${ImagesBucket.Arn}/pending/*")
    caplog.set_level(logging.ERROR, logger="dermscore.poller")
    with preserved_environ():
        use_endpoint(moto_endpoint)
        with make_pipeline(moto_endpoint, tiny_model, MaxReceiveCount=2) as p:
            (key,) = p.upload(sample_images(1), "incoming/denied/")
            p.drain(timeout_s=120)
            assert p.stack.list_keys(layout.PENDING) == [] and p.stack.list_keys("results/") == []
            assert p.runner.results == []
            dead = [json.loads(m["Body"]) for m in p.stack.client("sqs").receive_message(
                QueueUrl=p.stack.dlq_url, MaxNumberOfMessages=10)["Messages"]]
            assert [layout.decode_event_key(r["s3"]["object"]["key"])
                    for d in dead for r in d.get("Records", [])] == [key]
    refusals = [r for r in caplog.records if r.getMessage().startswith("enqueue invocation failed")]
    assert refusals and all(r.exc_info and "(AccessDenied) when calling the PutObject operation" in str(r.exc_info[1])
                            for r in refusals)


def test_the_container_reads_the_images_as_its_own_role(moto_endpoint, tiny_model, monkeypatch, tmp_path) -> None:
    """TransformRole without s3:GetObject on incoming/*: the job runs (manifests and the model are
    still readable) but the container's GETs are refused, so every image is a read_error failure
    row naming AccessDenied: the container signs as its role, not as the stack."""
    from infra.stack import use_endpoint

    roles_without(monkeypatch, "TransformRole", "ReadModelImagesManifests", "${ImagesBucket.Arn}/incoming/*")
    with preserved_environ():
        use_endpoint(moto_endpoint)
        with make_pipeline(moto_endpoint, tiny_model) as p:
            keys = p.upload(sample_images(2), "incoming/unreadable/")
            p.drain(timeout_s=120)
            assert [r["status"] for r in p.runner.results] == ["Completed"]
            p.export(tmp_path)
    got = outcome(tmp_path)
    assert got.scored == []
    assert sorted((k, stage, reason) for _, k, _, stage, reason, _ in got.failed) == \
        [(k, "transform", reasons.READ_ERROR) for k in sorted(keys)]
    assert all(detail.endswith(": AccessDenied") for *_, detail in got.failed), got.failed


# --------------------------------------------------------------------------- 3. what moto does not evaluate

def _wildcard(pattern: str, value: str, ignore_case: bool = False) -> bool:
    """IAM's ``*`` (any run) and ``?`` (one character); moto reads ``?`` as a regex quantifier."""
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL) is not None


_OPERATORS = {
    "StringEquals": lambda e, v: e == v, "StringEqualsIgnoreCase": lambda e, v: e.lower() == v.lower(),
    "StringLike": _wildcard, "ArnEquals": lambda e, v: e == v, "ArnLike": _wildcard,
    "Bool": lambda e, v: str(e).lower() == str(v).lower(),
}


def _condition_holds(condition: dict[str, Any], context: dict[str, Any]) -> bool:
    """The condition operators the template uses, with the ForAllValues / ForAnyValue qualifiers
    and Null, as the IAM policy evaluation logic defines them."""
    for operator, keys in condition.items():
        qualifier, _, op = operator.rpartition(":")
        for key, expected in keys.items():
            expected = [str(x) for x in iam.as_list(expected)]
            present = key in context
            if op == "Null":
                if (expected[0] == "true") == present:
                    return False
                continue
            values = [str(x) for x in iam.as_list(context.get(key, []))]
            match = _OPERATORS[op]
            if qualifier == "ForAllValues":
                ok = all(any(match(e, v) for e in expected) for v in values)   # vacuous without values
            elif qualifier == "ForAnyValue":
                ok = any(match(e, v) for e in expected for v in values)
            else:
                ok = present and any(match(e, v) for e in expected for v in values)
            if not ok:
                return False
    return True


def aws_allows(documents: dict[str, dict[str, Any]], action: str, resource: str,
               context: dict[str, Any] | None = None) -> bool:
    """AWS's decision on one request for a role's identity policies: an explicit Deny wins, else
    an Allow whose action, resource and conditions all match."""
    allowed = False
    for doc in documents.values():
        for s in iam.as_list(doc["Statement"]):
            if not any(_wildcard(a, action, ignore_case=True) for a in iam.as_list(s["Action"])):
                continue
            if not any(_wildcard(r, resource) for r in iam.as_list(s["Resource"])):
                continue
            if not _condition_holds(s.get("Condition", {}), context or {}):
                continue
            if s["Effect"] == "Deny":
                return False
            allowed = True
    return allowed


@pytest.fixture()
def stack(make_stack):
    """A stack under roles; its resolved policies are the template's as the roles hold them."""
    s = make_stack()
    yield s
    s.stop()


def test_the_roles_name_the_local_resources_real_arns(stack) -> None:
    """The resolver's fallback ARNs name logical ids: the roles must name what moto checks."""
    p = stack.iam.policies
    bucket_arn = f"arn:aws:s3:::{stack.bucket}"
    function_arn = {f: LambdaContext(function_name=f"{stack.stack_name}-{f}").invoked_function_arn
                    for f in iam.FUNCTION_ROLES}
    assert aws_allows(p["EnqueueRole"], "sqs:ReceiveMessage", stack.queue_arn)
    assert aws_allows(p["CollectRole"], "sqs:SendMessage", stack.queue_arn)
    assert not aws_allows(p["CollectRole"], "sqs:SendMessage", stack.dlq_arn)
    assert aws_allows(p["TransformRole"], "s3:GetObject", f"{bucket_arn}/incoming/a.jpg")
    assert not aws_allows(p["TransformRole"], "s3:GetObject", f"arn:aws:s3:::{stack.bucket}-other/incoming/a.jpg")
    # Lambda: run in this process (LocalLambda), never checked by moto
    assert aws_allows(p["EnqueueRole"], "lambda:InvokeFunction", function_arn["dispatch"])
    assert not aws_allows(p["EnqueueRole"], "lambda:InvokeFunction", function_arn["collect"])
    assert aws_allows(p["ReconcileRole"], "lambda:InvokeFunction", function_arn["collect"])
    assert not aws_allows(p["ReconcileRole"], "lambda:InvokeFunction", function_arn["dispatch"])
    for role in ROLE_NAMES:   # the KMS statement is off without a key (UseCmk), as CloudFormation drops it
        assert not any(a.startswith("kms:") for d in p[role].values() for s in d["Statement"]
                       for a in iam.as_list(s["Action"])), role


def test_enqueue_lists_the_bucket_only_where_its_condition_allows(stack) -> None:
    """moto ignores the s3:prefix condition of enqueue's ListBucket; AWS applies it: every listing
    enqueue makes (recorded from its client while it handles a real event) must pass it."""
    listed: list[str | None] = []
    rt = stack.runtime("enqueue")
    rt.s3.meta.events.register("provide-client-params.s3.ListObjectsV2",
                               lambda params, **_: listed.append(params.get("Prefix")))
    stack.invoke("enqueue", recorded_event("sqs_s3_object_created.json", bucket=stack.bucket,
                                           queue_arn=stack.queue_arn))
    assert stack.list_keys(layout.PENDING)   # the part was written: the listing came after it
    assert listed, "enqueue made no listing: this test checks nothing"
    bucket_arn = f"arn:aws:s3:::{stack.bucket}"
    enqueue = stack.iam.policies["EnqueueRole"]
    for prefix in listed:
        assert aws_allows(enqueue, "s3:ListBucket", bucket_arn, {} if prefix is None else {"s3:prefix": prefix})
    assert not aws_allows(enqueue, "s3:ListBucket", bucket_arn, {"s3:prefix": layout.INCOMING})
    assert not aws_allows(enqueue, "s3:ListBucket", bucket_arn)   # no prefix: the whole bucket


def test_only_the_templates_instance_type_and_model_make_jobs(stack) -> None:
    """moto ignores CreateTransformJob's conditions and checks SageMaker against "*" only: the
    dispatcher's own request (dispatch.transform_request) is evaluated here, and what AWS refuses."""
    from handlers import dispatch

    settings = stack.runtime("dispatch").settings
    name = layout.job_name(stack.job_prefix, ["pending/a-1.jsonl"])
    request = dispatch.transform_request(settings, name, f"s3://{stack.bucket}/{layout.MANIFESTS}{name}/", 1)

    def allowed(role: str, req: dict[str, Any]) -> bool:
        arn = f"arn:aws:sagemaker:{LOCAL_REGION}:{LOCAL_ACCOUNT_ID}"
        context = {"sagemaker:ModelArn": f"{arn}:model/{req['ModelName'].lower()}"}
        if "InstanceType" in req["TransformResources"]:
            context["sagemaker:InstanceTypes"] = [req["TransformResources"]["InstanceType"]]
        return aws_allows(stack.iam.policies[role], "sagemaker:CreateTransformJob",
                          f"{arn}:transform-job/{req['TransformJobName']}", context)

    def changed(**resources: Any) -> dict[str, Any]:
        return {**request, "TransformResources": {**request["TransformResources"], **resources}}

    for role in ("DispatchRole", "ReconcileRole"):
        assert allowed(role, request), role
        assert not allowed(role, changed(InstanceType="ml.p4d.24xlarge")), role
        no_type = changed()
        del no_type["TransformResources"]["InstanceType"]
        assert not allowed(role, no_type), role                                       # the Null condition
        assert not allowed(role, {**request, "ModelName": "someone-elses-model"}), role
        sibling = layout.job_name(f"{stack.job_prefix}-x", ["pending/a-1.jsonl"])      # "?" is one character
        assert not allowed(role, {**request, "TransformJobName": sibling}), role
    for role in ("EnqueueRole", "CollectRole", "TransformRole"):
        assert not allowed(role, request), role


def test_dispatch_may_delete_exactly_the_keys_it_deletes(stack) -> None:
    """moto checks DeleteObjects on the bucket ARN (what moto_document grants) and then deletes any
    key; AWS checks s3:DeleteObject per key: the parts and the intent, nothing else."""
    bucket_arn = f"arn:aws:s3:::{stack.bucket}"
    dispatch = stack.iam.policies["DispatchRole"]
    job = layout.job_name(stack.job_prefix, ["p"])
    for key in (layout.pending_part_key("0" * 16, 5), layout.dispatch_key(job)):
        assert aws_allows(dispatch, "s3:DeleteObject", f"{bucket_arn}/{key}"), key
    for key in ("incoming/a.jpg", layout.manifest_key(job), layout.collected_key(job)):
        assert not aws_allows(dispatch, "s3:DeleteObject", f"{bucket_arn}/{key}"), key
    assert not aws_allows(dispatch, "s3:DeleteObject", bucket_arn)   # the template grants keys only
    for role in ROLE_NAMES:
        if role != "DispatchRole":
            assert not aws_allows(stack.iam.policies[role], "s3:DeleteObject", f"{bucket_arn}/*"), role


def test_moto_reads_batch_and_delete_requests_as_aws_authorises_them() -> None:
    doc = {"Version": "2012-10-17", "Statement": [
        {"Sid": "Send", "Effect": "Allow", "Action": "sqs:SendMessage", "Resource": "arn:aws:sqs:r:1:q"},
        {"Sid": "Del", "Effect": "Allow", "Action": ["s3:DeleteObject"], "Resource": ["arn:aws:s3:::b/pending/*"]},
        {"Sid": "Get", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/x/*"}]}
    out = iam.moto_document(doc)
    assert out["Statement"][0]["Action"] == ["sqs:SendMessage", "sqs:SendMessageBatch"]
    assert out["Statement"][2] == doc["Statement"][2]
    assert out["Statement"][3] == {"Sid": "DelMotoDeleteObjects", "Effect": "Allow", "Action": "s3:DeleteObject",
                                   "Resource": ["arn:aws:s3:::b"]}
    assert doc["Statement"][0]["Action"] == "sqs:SendMessage"   # the template's own document is unchanged


def test_roles_that_read_maybe_missing_keys_get_404_on_aws(stack) -> None:
    """moto answers NoSuchKey to anyone allowed to GET; S3 only to a caller allowed to ListBucket
    for a request that carries no s3:prefix (tests/test_first_deploy.py pins the statements)."""
    from test_first_deploy import READS_MAYBE_MISSING

    bucket_arn = f"arn:aws:s3:::{stack.bucket}"
    for role in READS_MAYBE_MISSING:
        assert aws_allows(stack.iam.policies[role], "s3:ListBucket", bucket_arn), role
    assert not aws_allows(stack.iam.policies["EnqueueRole"], "s3:ListBucket", bucket_arn)
