"""template.yaml: lint it, build it, and check the wiring the pipeline relies on.

Offline: cfn-lint (on the template and on the SAM-translated template), `sam validate
--lint` and `sam build` from the tool environment `.venv-tools` (`make tools`), no AWS
account and no Docker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dermscore import layout, results
from dermscore.template import REPO_ROOT, TEMPLATE_PATH, Resolver, load_template, local_spec, translate
from infra.serving import RESPONSE_FACTOR

SAM = REPO_ROOT / ".venv-tools" / "bin" / "sam"
FUNCTIONS = ("EnqueueFunction", "DispatchFunction", "CollectFunction", "ReconcileFunction", "RescoreFunction")
STACK = "dermscore"
BUCKET = "dermscore-123456789012-us-east-1"
# Offline boto3 clients (nothing calls AWS): what Runtime.from_env needs besides a function's variables.
DUMMY_AWS_ENV = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing"}  # pragma: allowlist secret

# Actions that have no resource-level permissions: the only ones allowed on "*", each with the
# condition key that scopes it, or None for an action that has no condition key (a read-only listing).
NO_RESOURCE_LEVEL_ACTIONS = {"cloudwatch:PutMetricData": "cloudwatch:namespace",
                             "sagemaker:ListTransformJobs": None, "ecr:GetAuthorizationToken": None}
# A wildcard in a resource ARN is fine below these: this bucket's prefixes, this stack's
# job names, SageMaker's fixed log group for transform jobs.
SCOPED_ANCHORS = ("${ImagesBucket.Arn}/", "${AWS::StackName}-", "log-group:/aws/sagemaker/TransformJobs")


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


@pytest.fixture(scope="module")
def translated() -> dict[str, Any]:
    return translate()


@pytest.fixture(scope="module")
def resolver(template) -> Resolver:
    return Resolver(template, refs={"AWS::StackName": STACK})


def resources_of(t: dict[str, Any], rtype: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in t["Resources"].items() if v["Type"] == rtype}


def as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def statements(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Policy statements; `Fn::If [cond, statement, AWS::NoValue]` counts as its statement."""
    out = []
    for s in as_list(doc["Statement"]):
        if "Fn::If" in s:
            out += [b for b in s["Fn::If"][1:] if isinstance(b, dict) and "Effect" in b]
        else:
            out.append(s)
    return out


# --------------------------------------------------------------------------- linters and SAM CLI

def _lint(text: str) -> list[str]:
    from cfnlint.api import ManualArgs, lint
    # informational checks included: zero findings of any level
    return [str(m) for m in lint(text, config=ManualArgs(regions=["us-east-1"], include_checks=["I"]))]


def test_cfn_lint_template_has_no_findings():
    assert _lint(TEMPLATE_PATH.read_text()) == []


def test_cfn_lint_translated_template_has_no_findings(translated):
    # cfn-lint misses mistakes inside AWS::Serverless::* resources (runtime, timeout,
    # FunctionResponseTypes ...); the translated template shows them as plain resources.
    assert _lint(json.dumps(translated)) == []


def test_translated_lint_catches_serverless_mistakes(template):
    broken = json.loads(json.dumps(template))
    broken["Globals"]["Function"]["Runtime"] = "python3.99"
    broken["Resources"]["EnqueueFunction"]["Properties"]["Events"]["Images"]["Properties"][
        "FunctionResponseTypes"] = ["ReportBatchItemFailure"]
    findings = _lint(json.dumps(translate(broken)))
    assert any("python3.99" in f for f in findings)
    assert any("ReportBatchItemFailure'" in f for f in findings)


def _sam(*args: str, cwd: Path = REPO_ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    if not SAM.exists():
        if os.environ.get("REQUIRE_SAM_CLI"):
            pytest.fail(f"{SAM} missing: `make tools` installs the SAM CLI")
        pytest.skip("SAM CLI not installed (`make tools`)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",  # dummy: nothing calls AWS
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "SAM_CLI_TELEMETRY": "0", "SAM_CLI_POLL_DELAY": "0"})
    return subprocess.run([str(SAM), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_sam_validate_lint_offline():
    r = _sam("validate", "--lint", "--region", "us-east-1", "--template-file", str(REPO_ROOT / "template.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "is a valid SAM Template" in r.stdout + r.stderr


def test_sam_build_bundles_handlers_and_light_requirements_only(tmp_path):
    build = tmp_path / "build"
    r = _sam("build", "--template-file", str(REPO_ROOT / "template.yaml"), "--build-dir", str(build),
             "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stdout + r.stderr
    for fn in FUNCTIONS:
        art = build / fn
        for must in ("handlers/enqueue.py", "handlers/dispatch.py", "handlers/collect.py", "handlers/reconcile.py",
                     "handlers/claims.py", "dermscore/batching.py", "dermscore/results.py", "dermscore/config.py",
                     "aws_lambda_powertools"):
            assert (art / must).exists(), f"{fn}: {must} missing"
        for never in ("batch", "training", "bench", "infra", "analytics", "PIL", "models", "tests", "torch",
                      "pyarrow", "pandas", "numpy", "boto3", ".venv"):
            assert not (art / never).exists(), f"{fn}: {never} must not be bundled"
        size = sum(p.stat().st_size for p in art.rglob("*") if p.is_file())
        assert size < 60 * 2**20, f"{fn}: {size / 2**20:.0f} MiB (the pandas layer needs room in 250 MiB)"
    built = (build / "template.yaml").read_text()
    assert all(f"CodeUri: {fn}" in built for fn in FUNCTIONS)
    # The package imports as Lambda will import it: its own modules first; pyarrow/numpy/boto3
    # (the layer and the runtime) from this environment.
    for fn in FUNCTIONS:
        handler = load_template()["Resources"][fn]["Properties"]["Handler"]
        module, func = handler.rsplit(".", 1)
        # Pillow and torch are installed here but not in the package: the handlers must not need them.
        code = (f"import importlib, sys, aws_lambda_powertools, dermscore; m = importlib.import_module({module!r}); "
                f"assert callable(getattr(m, {func!r})); "
                f"assert not {{'PIL', 'torch'}} & set(sys.modules), 'handlers import Pillow or torch'; "
                f"print(aws_lambda_powertools.__file__, dermscore.__file__, m.__file__)")
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(build / fn), "AWS_DEFAULT_REGION": "us-east-1"})
        assert r.returncode == 0, r.stderr
        assert all(p.startswith(str(build / fn)) for p in r.stdout.split()), r.stdout


def test_lambda_makefile_has_a_target_per_function(template):
    makefile = (REPO_ROOT / "infra" / "lambda" / "Makefile").read_text()
    for name, fn in resources_of(template, "AWS::Serverless::Function").items():
        assert fn["Metadata"]["BuildMethod"] == "makefile"
        assert re.search(rf"^[^\n]*\bbuild-{name}\b[^\n]*:", makefile, re.M), name
    assert template["Globals"]["Function"]["Runtime"] == "python3.11"


# --------------------------------------------------------------------------- wiring

def test_bucket_notifications_go_to_the_queue_for_image_suffixes(template):
    bucket = template["Resources"]["ImagesBucket"]
    configs = bucket["Properties"]["NotificationConfiguration"]["QueueConfigurations"]
    # One rule, on the prefix only: every object under incoming/ is forwarded, whatever its name
    # (a suffix filter silently dropped IMG_0001.Jpg, scan.webp, ...).
    (c,) = configs
    assert c["Queue"] == {"Fn::GetAtt": ["ImagesQueue", "Arn"]} and c["Event"] == "s3:ObjectCreated:*"
    assert c["Filter"]["S3Key"]["Rules"] == [{"Name": "prefix", "Value": layout.INCOMING}]
    # the queue policy must exist before S3 validates the notification target
    assert "ImagesQueuePolicy" in as_list(bucket["DependsOn"])
    spec = local_spec("b")
    assert spec.notification_prefix == layout.INCOMING and spec.notification_suffixes == ()


def test_queue_policy_allows_only_this_bucket(template, resolver):
    policy = template["Resources"]["ImagesQueuePolicy"]["Properties"]
    assert policy["Queues"] == [{"Ref": "ImagesQueue"}]
    (stmt,) = statements(policy["PolicyDocument"])
    assert stmt["Effect"] == "Allow" and stmt["Principal"] == {"Service": "s3.amazonaws.com"}
    assert stmt["Action"] == "sqs:SendMessage"
    bucket_name = resolver.resolve(template["Resources"]["ImagesBucket"]["Properties"]["BucketName"])
    assert bucket_name == BUCKET
    cond = resolver.resolve(stmt["Condition"])
    assert cond["ArnEquals"]["aws:SourceArn"] == f"arn:aws:s3:::{bucket_name}"
    assert cond["StringEquals"]["aws:SourceAccount"] == "123456789012"


def test_queue_feeds_enqueue_with_partial_batch_failures(template):
    fn = template["Resources"]["EnqueueFunction"]["Properties"]
    (event,) = fn["Events"].values()
    assert event["Type"] == "SQS"
    p = event["Properties"]
    assert p["Queue"] == {"Fn::GetAtt": ["ImagesQueue", "Arn"]}
    assert p["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert p["ScalingConfig"]["MaximumConcurrency"] == {"Ref": "EnqueueMaxConcurrency"}
    params = template["Parameters"]
    assert p["BatchSize"] == {"Ref": "EnqueueBatchSize"}
    assert params["EnqueueBatchSize"]["Default"] >= 1000 and params["EnqueueBatchSize"]["MaxValue"] == 10000
    assert p["MaximumBatchingWindowInSeconds"] == {"Ref": "EnqueueBatchingWindowSeconds"}
    assert params["EnqueueBatchingWindowSeconds"]["MinValue"] >= 1  # BatchSize > 10 needs a window
    assert params["EnqueueBatchingWindowSeconds"]["MaxValue"] == 300


def test_dead_letter_queue_and_visibility_timeout(template):
    q = template["Resources"]["ImagesQueue"]["Properties"]
    assert q["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["ImagesDeadLetterQueue", "Arn"]}
    assert q["RedrivePolicy"]["maxReceiveCount"] == {"Ref": "MaxReceiveCount"}
    assert q["MaximumMessageSize"] >= 64 * 1024
    spec = local_spec("b")
    window_max = template["Parameters"]["EnqueueBatchingWindowSeconds"]["MaxValue"]
    assert spec.queue_visibility_timeout >= 6 * spec.enqueue_timeout_s + window_max
    assert spec.max_receive_count >= 1 and spec.dlq_retention_s == 14 * 24 * 3600


def test_eventbridge_rule_sends_this_stacks_jobs_to_collect(template, translated, resolver):
    ev = template["Resources"]["CollectFunction"]["Properties"]["Events"]["TransformJobStateChange"]
    assert ev["Type"] == "EventBridgeRule"
    pattern = resolver.resolve(ev["Properties"]["Pattern"])
    assert pattern["source"] == ["aws.sagemaker"]
    assert pattern["detail-type"] == ["SageMaker Transform Job State Change"]
    assert sorted(pattern["detail"]["TransformJobStatus"]) == ["Completed", "Failed", "Stopped"]
    (prefix_rule,) = pattern["detail"]["TransformJobName"]
    prefix = prefix_rule["prefix"]
    assert prefix == f"{STACK}-"
    # the jobs the dispatcher creates match; another stack whose name starts the same does not
    spec = local_spec(BUCKET, STACK)
    assert layout.job_name(spec.dispatch_env["JOB_PREFIX"], ["pending/part.jsonl"]).startswith(prefix)
    assert not layout.job_name(f"{STACK}x", ["pending/part.jsonl"]).startswith(prefix)
    assert spec.collect_env["JOB_PREFIX"] == spec.dispatch_env["JOB_PREFIX"] == spec.enqueue_env["JOB_PREFIX"]
    # translated: a rule whose target is the collect function, and the permission to invoke it
    rules = resources_of(translated, "AWS::Events::Rule")
    targets = [t["Arn"] for r in rules.values() for t in r["Properties"].get("Targets", [])]
    assert {"Fn::GetAtt": ["CollectFunction", "Arn"]} in targets
    perms = resources_of(translated, "AWS::Lambda::Permission").values()
    assert any(p["Properties"]["Principal"] == "events.amazonaws.com"
               and p["Properties"]["FunctionName"] == {"Ref": "CollectFunction"} for p in perms)
    # failed jobs also raise the alarm, with the same scoping
    failed = resolver.resolve(template["Resources"]["TransformJobFailedRule"]["Properties"]["EventPattern"])
    assert failed["detail"]["TransformJobName"] == [{"prefix": prefix}]
    assert failed["detail"]["TransformJobStatus"] == ["Failed"]


def test_collect_rule_retries_then_keeps_what_it_could_not_deliver(template, translated, resolver):
    """EventBridge retries delivery to collect for a day, then puts the event in a dead-letter queue
    that only this rule may write to, watched by an alarm."""
    ev = template["Resources"]["CollectFunction"]["Properties"]["Events"]["TransformJobStateChange"]["Properties"]
    assert ev["RetryPolicy"]["MaximumRetryAttempts"] >= 100 and ev["RetryPolicy"]["MaximumEventAgeInSeconds"] == 86400
    assert ev["DeadLetterConfig"] == {"Arn": {"Fn::GetAtt": ["CollectEventsDeadLetterQueue", "Arn"]}}
    rule = translated["Resources"]["CollectFunctionTransformJobStateChange"]
    (target,) = rule["Properties"]["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": ["CollectFunction", "Arn"]}
    assert target["DeadLetterConfig"] == ev["DeadLetterConfig"] and target["RetryPolicy"] == ev["RetryPolicy"]
    (stmt,) = statements(template["Resources"]["CollectEventsDeadLetterQueuePolicy"]["Properties"]["PolicyDocument"])
    assert stmt["Principal"] == {"Service": "events.amazonaws.com"} and stmt["Action"] == "sqs:SendMessage"
    assert stmt["Condition"] == {"ArnEquals": {"aws:SourceArn": {
        "Fn::GetAtt": ["CollectFunctionTransformJobStateChange", "Arn"]}}}
    queue = template["Resources"]["CollectEventsDeadLetterQueue"]["Properties"]
    assert queue["MessageRetentionPeriod"] == 14 * 24 * 3600 and queue["SqsManagedSseEnabled"] is True


def test_reconciler_runs_on_a_schedule_and_resubmits_as_the_dispatcher_would(template, translated):
    from dermscore.config import Settings
    from dermscore.sharding import instances_for
    from handlers.dispatch import transform_request

    fn = template["Resources"]["ReconcileFunction"]["Properties"]
    assert fn["Handler"] == "handlers.reconcile.lambda_handler"
    assert fn["Role"] == {"Fn::GetAtt": ["ReconcileRole", "Arn"]}
    (event,) = fn["Events"].values()
    assert event["Type"] == "Schedule"
    assert event["Properties"]["Schedule"] == {"Fn::Sub": "rate(${ReconcileIntervalMinutes} minutes)"}
    assert template["Parameters"]["ReconcileIntervalMinutes"]["MinValue"] >= 2   # "rate(1 minute)" is singular
    assert fn["EventInvokeConfig"]["MaximumRetryAttempts"] == 0
    env = fn["Environment"]["Variables"]
    assert env["COLLECT_FUNCTION_NAME"] == {"Ref": "CollectFunction"}
    assert env["RECONCILE_AFTER_MINUTES"] == {"Ref": "ReconcileAfterMinutes"}
    # a bound below one collect run would re-drive collections still running (harmless: idempotent)
    collect_timeout = template["Resources"]["CollectFunction"]["Properties"]["Timeout"]
    assert template["Parameters"]["ReconcileAfterMinutes"]["MinValue"] * 60 > collect_timeout
    # giving up: from the fence to the failure rows, every collect that started before it is over
    assert float(env["GIVE_UP_WAIT_S"]) >= collect_timeout + 60
    assert Settings.give_up_wait_s == float(env["GIVE_UP_WAIT_S"])   # the local stack waits as long
    spec = local_spec(BUCKET, STACK)
    assert spec.reconcile_env["COLLECT_FUNCTION_NAME"] == f"{STACK}-collect"
    assert spec.reconcile_interval_s == 60 * template["Parameters"]["ReconcileIntervalMinutes"]["Default"]
    # a job it submits again (dispatch.submit over the job's existing shard folder) is the job the
    # dispatcher submitted: same request, same instances for the same shards
    ours, theirs = Settings.from_env(spec.reconcile_env), Settings.from_env(spec.dispatch_env)
    for shards in (1, 3, 40):
        assert instances_for(shards, ours.instance_count) == instances_for(shards, theirs.instance_count)
        n = instances_for(shards, ours.instance_count)
        assert transform_request(ours, "j", "s3://b/m/", n) == transform_request(theirs, "j", "s3://b/m/", n)
    # it re-drives collect by invoking that one function, and nothing else
    invokes = [s for s in statements(template["Resources"]["ReconcileRole"]["Properties"]["Policies"][0][
        "PolicyDocument"]) if any(a.startswith("lambda:") for a in as_list(s["Action"]))]
    assert [(s["Action"], s["Resource"]) for s in invokes] == [
        ("lambda:InvokeFunction", {"Fn::GetAtt": ["CollectFunction", "Arn"]})]
    rules = [r for r in resources_of(translated, "AWS::Events::Rule").values()
             if {"Fn::GetAtt": ["ReconcileFunction", "Arn"]} in [t["Arn"] for t in r["Properties"]["Targets"]]]
    assert [r["Properties"]["ScheduleExpression"] for r in rules] == [
        {"Fn::Sub": "rate(${ReconcileIntervalMinutes} minutes)"}]
    # markers live as long as the manifests they vouch for (written after them: they outlive them)
    lifecycle = template["Resources"]["ImagesBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    (markers,) = [r for r in lifecycle if r.get("Prefix") == layout.COLLECTED]
    (manifests,) = [r for r in lifecycle if r.get("Prefix") == layout.MANIFESTS]
    assert markers["ExpirationInDays"] == manifests["ExpirationInDays"] == {"Ref": "ManifestRetentionDays"}


def test_dispatcher_runs_every_minute(template, translated):
    """Dispatch is its own step: scheduled, and a failed run is retried by the next tick (one run at
    a time only when DispatchReservedConcurrency asks: tests/test_first_deploy.py)."""
    fn = template["Resources"]["DispatchFunction"]["Properties"]
    assert fn["Handler"] == "handlers.dispatch.lambda_handler"
    assert fn["Role"] == {"Fn::GetAtt": ["DispatchRole", "Arn"]}
    assert fn["Timeout"] == 900
    assert fn["EventInvokeConfig"]["MaximumRetryAttempts"] == 0
    (event,) = fn["Events"].values()
    assert event["Type"] == "Schedule" and event["Properties"]["Schedule"] == "rate(1 minute)"
    spec = local_spec(BUCKET, STACK)
    assert spec.dispatch_interval_s == 60 and spec.dispatch_timeout_s == 900
    # the latency bound is at least one tick; a job of the default size fits the default largest job
    params = template["Parameters"]
    assert params["MaxLatencySeconds"]["MinValue"] >= spec.dispatch_interval_s
    assert params["MinImagesPerJob"]["Default"] <= params["MaxImagesPerJob"]["Default"]
    assert "MaxJobWaitSeconds" not in params
    # translated: the schedule rule targets the function and may invoke it
    rules = [r for r in resources_of(translated, "AWS::Events::Rule").values()
             if {"Fn::GetAtt": ["DispatchFunction", "Arn"]} in [t["Arn"] for t in r["Properties"].get("Targets", [])]]
    assert [r["Properties"]["ScheduleExpression"] for r in rules] == ["rate(1 minute)"]
    perms = resources_of(translated, "AWS::Lambda::Permission").values()
    assert any(p["Properties"]["Principal"] == "events.amazonaws.com"
               and p["Properties"]["FunctionName"] == {"Ref": "DispatchFunction"} for p in perms)
    # it invokes no function: its role has no lambda right, and its runtime no Lambda client
    from handlers.runtime import Runtime
    dispatch_role = template["Resources"]["DispatchRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    assert not [s for s in statements(dispatch_role) if any(a.startswith("lambda:") for a in as_list(s["Action"]))]
    assert Runtime.from_env({**spec.dispatch_env, **DUMMY_AWS_ENV}).lambda_ is None


def test_enqueue_writes_pending_parts_and_wakes_the_dispatcher(template, resolver):
    """Arrival is the first step: enqueue writes a pending part and failure rows, and invokes the
    dispatcher (that one function) once the pending volume makes a job; no SageMaker, no manifests."""
    from handlers.runtime import Runtime

    res = template["Resources"]
    env = res["EnqueueFunction"]["Properties"]["Environment"]["Variables"]
    assert set(env) == {"BUCKET_NAME", "JOB_PREFIX", "MIN_IMAGES_PER_JOB", "DISPATCH_FUNCTION_NAME",
                        "POWERTOOLS_SERVICE_NAME"}
    assert env["DISPATCH_FUNCTION_NAME"] == {"Ref": "DispatchFunction"}
    # it wakes the dispatcher at the volume the dispatcher itself makes a job of
    assert env["MIN_IMAGES_PER_JOB"] == \
        res["DispatchFunction"]["Properties"]["Environment"]["Variables"]["MIN_IMAGES_PER_JOB"] == \
        {"Ref": "MinImagesPerJob"}
    spec = local_spec(BUCKET, STACK)
    assert spec.enqueue_env["DISPATCH_FUNCTION_NAME"] == resolver.resolve(
        res["DispatchFunction"]["Properties"]["FunctionName"]) == f"{STACK}-dispatch"
    assert Runtime.from_env({**spec.enqueue_env, **DUMMY_AWS_ENV}).lambda_ is not None
    # its role: invoke that one function, and no SageMaker right at all
    doc = res["EnqueueRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    invokes = [s for s in statements(doc) if any(a.startswith("lambda:") for a in as_list(s["Action"]))]
    assert [(s["Action"], s["Resource"]) for s in invokes] == [
        ("lambda:InvokeFunction", {"Fn::GetAtt": ["DispatchFunction", "Arn"]})]
    assert not [s for s in statements(doc) if any(a.startswith("sagemaker:") for a in as_list(s["Action"]))]
    # and only the arrival paths (enqueue, rescore) may wake it (the schedule aside)
    for role in ("DispatchRole", "CollectRole", "ReconcileRole"):
        for s in statements(res[role]["Properties"]["Policies"][0]["PolicyDocument"]):
            assert s.get("Resource") != {"Fn::GetAtt": ["DispatchFunction", "Arn"]}, role


def test_rescore_reads_stored_images_and_writes_only_parts_and_its_records(template, resolver):
    """The re-score function lists and heads stored objects, writes pending parts and its run records,
    wakes the dispatcher and hands a run on to itself: no delete, no results, no SageMaker."""
    res = template["Resources"]
    fn = res["RescoreFunction"]["Properties"]
    assert fn["Handler"] == "handlers.rescore.lambda_handler" and fn["Timeout"] == 900
    assert resolver.resolve(fn["FunctionName"]) == f"{STACK}-rescore"
    doc = res["RescoreRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    by_action: dict[str, list] = {}
    for s in statements(doc):
        for action in as_list(s["Action"]):
            by_action.setdefault(action, []).extend(as_list(s["Resource"]))
    assert set(by_action) == {"logs:CreateLogStream", "logs:PutLogEvents", "s3:ListBucket", "s3:GetObject",
                              "s3:PutObject", "lambda:InvokeFunction", "kms:Decrypt", "kms:GenerateDataKey"}
    subs = {a: sorted(r["Fn::Sub"] for r in rs if "Fn::Sub" in r) for a, rs in by_action.items()}
    assert subs["s3:GetObject"] == ["${ImagesBucket.Arn}/incoming/*", "${ImagesBucket.Arn}/rescore/*"]
    assert subs["s3:PutObject"] == ["${ImagesBucket.Arn}/pending/*", "${ImagesBucket.Arn}/rescore/*"]
    own = resolver.resolve({"Fn::Sub": subs["lambda:InvokeFunction"][0]})
    assert own.endswith(f":function:{resolver.resolve(fn['FunctionName'])}")
    assert {"Fn::GetAtt": ["DispatchFunction", "Arn"]} in by_action["lambda:InvokeFunction"]
    assert local_spec(BUCKET, STACK).rescore_env["DISPATCH_FUNCTION_NAME"] == f"{STACK}-dispatch"


def test_every_function_has_its_own_role_and_log_group(template, resolver):
    res = template["Resources"]
    functions = resources_of(template, "AWS::Serverless::Function")
    assert set(functions) == set(FUNCTIONS)
    roles = [fn["Properties"]["Role"]["Fn::GetAtt"][0] for fn in functions.values()]
    assert len(set(roles)) == len(roles)   # least privilege per function: no shared role
    groups = resources_of(template, "AWS::Logs::LogGroup")
    for (name, fn), role in zip(functions.items(), roles, strict=True):
        fname = resolver.resolve(fn["Properties"]["FunctionName"])
        (group,) = [g for g, r in groups.items()
                    if resolver.resolve(r["Properties"]["LogGroupName"]) == f"/aws/lambda/{fname}"]
        assert group in as_list(fn.get("DependsOn", [])), name
        assert groups[group]["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
        logs = [s for s in statements(res[role]["Properties"]["Policies"][0]["PolicyDocument"])
                if any(a.startswith("logs:") for a in as_list(s["Action"]))]
        assert [(sorted(as_list(s["Action"])), s["Resource"]) for s in logs] == [
            (["logs:CreateLogStream", "logs:PutLogEvents"], {"Fn::GetAtt": [group, "Arn"]})], name


def test_sqs_event_source_mapping_in_translated_template(translated):
    (esm,) = resources_of(translated, "AWS::Lambda::EventSourceMapping").values()
    p = esm["Properties"]
    assert p["EventSourceArn"] == {"Fn::GetAtt": ["ImagesQueue", "Arn"]}
    assert p["FunctionName"] == {"Ref": "EnqueueFunction"}
    assert p["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


# --------------------------------------------------------------------------- least privilege

def test_every_iam_statement_is_scoped(translated):
    roles = resources_of(translated, "AWS::IAM::Role")
    assert {"EnqueueRole", "DispatchRole", "CollectRole", "TransformRole", "ReconcileRole", "RescoreRole"} <= set(roles)
    for name, role in roles.items():
        props = role["Properties"]
        assert not props.get("ManagedPolicyArns"), f"{name}: managed policies grant '*' resources"
        for policy in props.get("Policies", []):
            for s in statements(policy["PolicyDocument"]):
                assert s["Effect"] == "Allow", f"{name}: unexpected {s}"
                actions = as_list(s["Action"])
                for a in actions:
                    assert "*" not in a, f"{name}/{s.get('Sid')}: wildcard action {a}"
                for r in as_list(s["Resource"]):
                    if r == "*":
                        assert set(actions) <= set(NO_RESOURCE_LEVEL_ACTIONS), f"{name}/{s.get('Sid')}: '*' resource"
                        for a in actions:   # scoped by its condition key wherever the action has one
                            key = NO_RESOURCE_LEVEL_ACTIONS[a]
                            assert key is None or any(key in c for c in s.get("Condition", {}).values()), \
                                f"{name}/{s.get('Sid')}: {a} on '*' without {key}"
                    elif "*" in json.dumps(r):  # a wildcard only below this stack's own names
                        assert any(anchor in json.dumps(r) for anchor in SCOPED_ANCHORS), f"{name}: {r}"


def test_roles_touch_no_bucket_but_this_one(translated):
    # images never leave the bucket the user chose: no S3 right on any other bucket
    for name, role in resources_of(translated, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            for s in statements(policy["PolicyDocument"]):
                if any(a.startswith("s3:") for a in as_list(s["Action"])):
                    for r in as_list(s["Resource"]):
                        assert r == {"Fn::GetAtt": ["ImagesBucket", "Arn"]} or \
                            r.get("Fn::Sub", "").startswith("${ImagesBucket.Arn}/"), f"{name}: {r}"


def test_resource_policies_allow_only_aws_services_with_conditions(template):
    for rtype in ("AWS::SQS::QueuePolicy", "AWS::SNS::TopicPolicy"):
        for name, pol in resources_of(template, rtype).items():
            for s in statements(pol["Properties"]["PolicyDocument"]):
                if s["Effect"] == "Allow":
                    assert set(s["Principal"]) == {"Service"} and s.get("Condition"), name


def test_alarm_topic_is_encrypted_with_a_key_its_publishers_may_use(template, resolver):
    """SNS server-side encryption with a customer managed key: the AWS managed alias/aws/sns key
    cannot be granted to the CloudWatch and EventBridge service principals that publish here."""
    res = template["Resources"]
    assert res["AlarmTopic"]["Properties"]["KmsMasterKeyId"] == {"Fn::GetAtt": ["AlarmTopicKey", "Arn"]}
    key = res["AlarmTopicKey"]["Properties"]
    assert key["EnableKeyRotation"] is True
    by_principal = {json.dumps(s["Principal"], sort_keys=True): s for s in statements(key["KeyPolicy"])}
    assert set(by_principal) == {json.dumps(p, sort_keys=True) for p in (
        {"AWS": {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"}},
        {"Service": "cloudwatch.amazonaws.com"}, {"Service": "events.amazonaws.com"})}
    for service in ("cloudwatch", "events"):
        s = by_principal[json.dumps({"Service": f"{service}.amazonaws.com"})]
        assert sorted(as_list(s["Action"])) == ["kms:Decrypt", "kms:GenerateDataKey*"]
    # CloudWatch: only this stack's alarms, whose names all start with the stack's
    cw = resolver.resolve(by_principal[json.dumps({"Service": "cloudwatch.amazonaws.com"})]["Condition"])
    assert cw == {"StringEquals": {"aws:SourceAccount": "123456789012"},
                  "ArnLike": {"aws:SourceArn": f"arn:aws:cloudwatch:us-east-1:123456789012:alarm:{STACK}-*"}}
    for name, alarm in resources_of(template, "AWS::CloudWatch::Alarm").items():
        assert resolver.resolve(alarm["Properties"]["AlarmName"]).startswith(f"{STACK}-"), name
    topic_policy = statements(res["AlarmTopicPolicy"]["Properties"]["PolicyDocument"])
    (cw_publish,) = [s for s in topic_policy if s["Principal"] == {"Service": "cloudwatch.amazonaws.com"}]
    assert resolver.resolve(cw_publish["Condition"]) == cw


def _s3_prefixes(role: dict[str, Any], actions: set[str]) -> set[str]:
    out = set()
    for policy in role["Properties"]["Policies"]:
        for s in statements(policy["PolicyDocument"]):
            if set(as_list(s["Action"])) & actions:
                for r in as_list(s["Resource"]):
                    sub = r.get("Fn::Sub", "") if isinstance(r, dict) else ""
                    m = re.fullmatch(r"\$\{ImagesBucket\.Arn\}/([^*]*)\*(\.[a-z.]+)?", sub)
                    assert m, f"object access must be prefix-scoped: {r}"
                    out.add(m.group(1) + (f"*{m.group(2)}" if m.group(2) else ""))
    return out


def _listed_prefixes(role: dict[str, Any]) -> set[str]:
    """The s3:prefix values a role may list the bucket with; {"*"} for the whole bucket (what a
    role needs to see a missing key as 404: tests/test_first_deploy.py)."""
    out = set()
    for policy in role["Properties"]["Policies"]:
        for s in statements(policy["PolicyDocument"]):
            if "s3:ListBucket" in as_list(s["Action"]):
                assert s["Resource"] == {"Fn::GetAtt": ["ImagesBucket", "Arn"]}
                if "Condition" not in s:
                    out.add("*")
                    continue
                prefixes = s["Condition"]["StringLike"]["s3:prefix"]
                assert prefixes and all(p.endswith("/*") for p in prefixes), s
                out |= {p[:-1] for p in prefixes}
    return out


def test_s3_access_is_scoped_to_prefixes(template):
    res = template["Resources"]
    sm = res["TransformRole"]
    # the job reads the images and its shard files (manifests/<job>/<n>-shards/), never pending/ parts
    assert _s3_prefixes(sm, {"s3:GetObject"}) == {layout.INCOMING, layout.MANIFESTS, "models/"}
    assert layout.shard_key("j", 0, 2).startswith(layout.MANIFESTS)
    # the container stores Grad-CAM pictures itself: exactly the heatmap/thumbnail keys of results/images/,
    # never an image's JSON document (the claim of its outcome, handlers.claims)
    assert _s3_prefixes(sm, {"s3:PutObject"}) == {layout.TRANSFORM_OUTPUT, f"{layout.IMAGES}*{layout.HEATMAP_SUFFIX}",
                                                  f"{layout.IMAGES}*{layout.THUMBNAIL_SUFFIX}"}
    # enqueue: one pending part per batch, failure rows and their claims; it reads nothing but the
    # pending listing and a rejected upload's claim
    enq = res["EnqueueRole"]
    assert _s3_prefixes(enq, {"s3:GetObject"}) == {layout.REJECTED}
    assert _s3_prefixes(enq, {"s3:PutObject"}) == {layout.PENDING, layout.FAILURES, layout.REJECTED}
    assert _listed_prefixes(enq) == {layout.PENDING}
    assert layout.pending_part_key("0" * 16, 5).startswith(layout.PENDING)
    # the dispatcher: parts and intents in, intents and shard files out; it deletes a part only
    # with its intent, once the job exists. It never sees an image or a result.
    dis = res["DispatchRole"]
    assert _s3_prefixes(dis, {"s3:GetObject"}) == {layout.PENDING, layout.DISPATCH}
    assert _s3_prefixes(dis, {"s3:PutObject"}) == {layout.DISPATCH, layout.MANIFESTS}
    assert _s3_prefixes(dis, {"s3:DeleteObject"}) == {layout.PENDING, layout.DISPATCH}
    assert _listed_prefixes(dis) == {"*"}
    assert layout.dispatch_key("j").startswith(layout.DISPATCH)
    # collect: results (the image's document is written conditionally: its claim) and the job's marker
    col = res["CollectRole"]
    assert _s3_prefixes(col, {"s3:PutObject"}) == {layout.PREDICTIONS, layout.IMAGES, layout.FAILURES,
                                                   layout.REPORTS, layout.COLLECTED}
    assert layout.INCOMING not in _s3_prefixes(col, {"s3:GetObject"})
    assert layout.IMAGES.startswith(tuple(_s3_prefixes(col, {"s3:GetObject"})))   # a losing writer reads it
    # the reconciler: its markers, documents and failure rows when it gives up; it re-submits from an
    # existing manifest folder, so it writes no manifest; never an image
    rec = res["ReconcileRole"]
    assert _s3_prefixes(rec, {"s3:PutObject"}) == {layout.COLLECTED, f"{layout.IMAGES}*.json", layout.FAILURES}
    assert _s3_prefixes(rec, {"s3:GetObject"}) == {layout.MANIFESTS, layout.DISPATCH, layout.COLLECTED,
                                                   f"{layout.IMAGES}*.json", layout.PREDICTIONS, layout.FAILURES}
    assert layout.give_up_key("j").startswith(layout.COLLECTED)
    assert _listed_prefixes(rec) == {"*"}
    assert layout.image_result_key("incoming/a/b.jpg") == f"{layout.IMAGES}a/b.jpg.json"
    # only the dispatcher deletes anything; the claims/ prefix is gone from every role
    for name in ("EnqueueRole", "CollectRole", "ReconcileRole", "TransformRole"):
        assert _s3_prefixes(res[name], {"s3:DeleteObject"}) == set(), name
    for name, role in resources_of(template, "AWS::IAM::Role").items():
        assert "claims/" not in json.dumps(role), name


def test_sagemaker_rights_are_for_this_stacks_jobs(template, resolver):
    creators, listers = [], []
    for role in ("EnqueueRole", "DispatchRole", "CollectRole", "ReconcileRole"):
        for s in statements(template["Resources"][role]["Properties"]["Policies"][0]["PolicyDocument"]):
            actions = as_list(s["Action"])
            if not any(a.startswith("sagemaker:") for a in actions):
                continue
            # CreateTransformJob takes no role (the Model has it): no iam:PassRole needed
            assert not any(a.startswith("iam:") for a in actions)
            if s["Resource"] == "*":
                # counting this stack's running jobs: ListTransformJobs has no resource-level permissions
                assert actions == ["sagemaker:ListTransformJobs"]
                listers.append(role)
                continue
            # exactly <stack>-<16 hex digits>: a sibling stack "<stack>-x" has longer job names
            assert resolver.resolve(s["Resource"]) == \
                f"arn:aws:sagemaker:us-east-1:123456789012:transform-job/{STACK}-{'?' * layout.JOB_DIGEST_LENGTH}"
            if "sagemaker:CreateTransformJob" in actions:
                creators.append(role)
                # only on the template's instance type, never without one, and only on this stack's model
                assert actions == ["sagemaker:CreateTransformJob"]
                assert s["Condition"] == {"ForAllValues:StringEquals": {
                    "sagemaker:InstanceTypes": [{"Ref": "TransformInstanceType"}]},
                    "Null": {"sagemaker:InstanceTypes": "false"},
                    "StringEqualsIgnoreCase": {"sagemaker:ModelArn": {"Fn::Sub": (
                        "arn:${AWS::Partition}:sagemaker:${AWS::Region}:${AWS::AccountId}:model/${ModelName}")}}}
    # the dispatcher creates jobs, the reconciler re-submits lost ones; enqueue touches no SageMaker API
    assert creators == ["DispatchRole", "ReconcileRole"]
    assert listers == ["DispatchRole"]
    # the type they ask for is that parameter
    spec = local_spec(BUCKET, STACK)
    default = template["Parameters"]["TransformInstanceType"]["Default"]
    assert spec.dispatch_env["TRANSFORM_INSTANCE_TYPE"] == spec.reconcile_env["TRANSFORM_INSTANCE_TYPE"] == default
    assert "TRANSFORM_INSTANCE_TYPE" not in spec.enqueue_env


def test_reliability_wiring(template, resolver):
    """Failed jobs re-queue into the images queue only; an image's document (its claim) outlives
    every duplicate: it never expires."""
    res = template["Resources"]
    env = res["CollectFunction"]["Properties"]["Environment"]["Variables"]
    assert env["QUEUE_URL"] == {"Ref": "ImagesQueue"} and env["MAX_JOB_ATTEMPTS"] == {"Ref": "MaxJobAttempts"}
    # enqueue only consumes the queue; collect is the one that sends to it
    enqueue_env = res["EnqueueFunction"]["Properties"]["Environment"]["Variables"]
    assert not {"QUEUE_URL", "MAX_JOB_ATTEMPTS"} & set(enqueue_env)
    sends = [s for s in statements(res["CollectRole"]["Properties"]["Policies"][0]["PolicyDocument"])
             if "sqs:SendMessage" in as_list(s["Action"])]
    assert sorted(json.dumps(s["Resource"]) for s in sends) == sorted(
        json.dumps({"Fn::GetAtt": [q, "Arn"]}) for q in ("ImagesQueue", "CollectFailedEventsQueue"))
    for role in ("EnqueueRole", "DispatchRole", "ReconcileRole"):
        assert not any("sqs:SendMessage" in as_list(s["Action"]) for s in statements(
            res[role]["Properties"]["Policies"][0]["PolicyDocument"])), role
    # no claims/ prefix any more: no rule, no parameter for its retention
    rules = res["ImagesBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    assert not [r for r in rules if "claims" in json.dumps(r)]
    assert "ClaimRetentionDays" not in template["Parameters"] and "MaxJobWaitSeconds" not in template["Parameters"]
    # no rule expires a document: the only rule without a prefix filters on the pictures' tag, which
    # the container sets on heatmaps and thumbnails only (tests/test_gradcam.py)
    covering = [r for r in rules if "ExpirationInDays" in r and layout.IMAGES.startswith(r.get("Prefix", ""))]
    assert [r["Id"] for r in covering] == ["expire-derived-pictures"]
    key, value = layout.PICTURE_TAG.split("=")
    assert covering[0]["TagFilters"] == [{"Key": key, "Value": value}] and "Prefix" not in covering[0]
    assert covering[0]["ExpirationInDays"] == {"Ref": "PictureRetentionDays"}
    assert template["Parameters"]["MaxJobAttempts"]["MinValue"] >= 1


def test_bucket_policies_deny_insecure_transport(template):
    buckets = resources_of(template, "AWS::S3::Bucket")
    policies = resources_of(template, "AWS::S3::BucketPolicy").values()
    for name in buckets:
        denies = [s for p in policies if p["Properties"]["Bucket"] == {"Ref": name}
                  for s in statements(p["Properties"]["PolicyDocument"])
                  if s["Effect"] == "Deny"
                  and s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"]
        assert denies, f"{name}: no TLS-only policy"
        (deny,) = denies
        assert deny["Principal"] == "*" and deny["Action"] == "s3:*"
        assert {"Fn::GetAtt": [name, "Arn"]} in deny["Resource"]
        assert {"Fn::Sub": f"${{{name}.Arn}}/*"} in deny["Resource"]
        props = buckets[name]["Properties"]
        assert all(props["PublicAccessBlockConfiguration"].values())
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"]


def test_lifecycle_expires_intermediate_prefixes_only(template):
    rules = template["Resources"]["ImagesBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    expiring = {r["Prefix"] for r in rules if "ExpirationInDays" in r and "Prefix" in r}   # (pictures: by tag)
    assert {layout.MANIFESTS, layout.TRANSFORM_OUTPUT} <= expiring
    # pending parts and the dispatcher's intents wait for their job however long it takes: never expired
    kept = {layout.INCOMING, layout.PREDICTIONS, layout.IMAGES, layout.FAILURES, layout.REPORTS, "models/",
            layout.PENDING, layout.DISPATCH}
    assert not {k for k in kept for e in expiring if k.startswith(e)}


# --------------------------------------------------------------------------- model and transform settings

def test_model_container_settings(template):
    model = template["Resources"]["TransformModel"]
    env = model["Properties"]["PrimaryContainer"]["Environment"]
    assert env["SAGEMAKER_PROGRAM"] == "inference.py"
    assert env["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"
    assert model["Properties"]["ModelName"] == {"Ref": "ModelName"}
    assert model["Properties"]["ExecutionRoleArn"] == {"Fn::GetAtt": ["TransformRole", "Arn"]}
    # TorchServe must accept what batch transform sends (else HTTP 413)
    assert env["TS_MAX_REQUEST_SIZE"] == {"Fn::FindInMap": ["PayloadLimits", {"Ref": "MaxPayloadInMB"}, "Request"]}
    limits = template["Mappings"]["PayloadLimits"]
    allowed = template["Parameters"]["MaxPayloadInMB"]["AllowedValues"]
    assert sorted(int(k) for k in limits) == sorted(allowed)
    for mb, lim in limits.items():
        # 16x: twice the worst output/manifest line ratio (tests/test_serving.py measures it)
        assert lim["Request"] == int(mb) * 2**20 and lim["Response"] == RESPONSE_FACTOR * lim["Request"]
    assert template["Parameters"]["TransformInstanceType"]["Default"] == "ml.g4dn.xlarge"


def test_env_var_names_match_settings_from_env(monkeypatch):
    from dermscore import config

    class Recorder(dict):
        def __init__(self, data):
            super().__init__(data)
            self.read: set[str] = set()

        def __getitem__(self, k):
            self.read.add(k)
            return super().__getitem__(k)

        def get(self, k, default=None):
            self.read.add(k)
            return super().get(k, default)

    spec = local_spec(BUCKET, STACK)
    rec = Recorder(spec.enqueue_env)
    monkeypatch.setattr(config.os, "environ", rec)
    settings = config.Settings.from_env()
    monkeypatch.undo()

    def ours(env):  # Powertools reads its own variables
        return {k for k in env if not k.startswith("POWERTOOLS_")}

    envs = {"enqueue": spec.enqueue_env, "dispatch": spec.dispatch_env, "collect": spec.collect_env,
            "reconcile": spec.reconcile_env}
    # every setting read is some function's variable, and every variable is read; the one exception
    # is a bound of the code, not of the deployment (the dispatcher's shard files stay this small)
    code_only = {"MAX_IMAGES_PER_SHARD"}
    assert set().union(*map(ours, envs.values())) == rec.read - code_only
    for name, env in envs.items():
        assert {"BUCKET_NAME", "JOB_PREFIX"} <= ours(env) <= rec.read, name
    assert code_only <= rec.read and settings.max_images_per_shard == config.Settings.max_images_per_shard
    # and the values land where they should: the dispatcher's settings are the parameters
    p = {k: v.get("Default") for k, v in load_template()["Parameters"].items()}
    assert settings.bucket == BUCKET and settings.job_prefix == STACK
    dispatch = config.Settings.from_env(spec.dispatch_env)
    assert dispatch.bucket == BUCKET and dispatch.job_prefix == STACK and dispatch.model_name == p["ModelName"]
    assert dispatch.instance_type == p["TransformInstanceType"]
    assert dispatch.instance_count == p["TransformInstanceCount"]
    assert dispatch.max_concurrent_transforms == p["MaxConcurrentTransforms"]
    assert dispatch.max_payload_mb == p["MaxPayloadInMB"]
    assert dispatch.invocations_timeout_s == p["InvocationsTimeoutInSeconds"]
    assert dispatch.min_images_per_shard == p["MinImagesPerShard"]
    assert dispatch.min_images_per_job == p["MinImagesPerJob"] == settings.min_images_per_job  # enqueue's wake-up
    assert dispatch.max_images_per_job == p["MaxImagesPerJob"]
    assert dispatch.max_latency_s == p["MaxLatencySeconds"]
    assert dispatch.max_concurrent_jobs == p["MaxConcurrentJobs"]
    assert dispatch.throttle_backoff_s == p["ThrottleBackoffSeconds"]
    assert settings.dispatch_function == f"{STACK}-dispatch"


# --------------------------------------------------------------------------- SQL

ATHENA_TYPES = {"string": "string", "float": "float", "bool": "boolean", "int32": "int", "int8": "tinyint",
                "timestamp[ms, tz=UTC]": "timestamp"}


@pytest.mark.parametrize("table,schema,prefix", [("PredictionsTable", results.PREDICTION_SCHEMA, layout.PREDICTIONS),
                                                 ("FailuresTable", results.FAILURE_SCHEMA, layout.FAILURES)])
def test_glue_tables_match_the_result_schema(template, resolver, table, schema, prefix):
    ti = template["Resources"][table]["Properties"]["TableInput"]
    cols = ti["StorageDescriptor"]["Columns"]
    assert [c["Name"] for c in cols] == schema.names
    assert [c["Type"] for c in cols] == [ATHENA_TYPES[str(f.type)] for f in schema]
    assert ti["PartitionKeys"] == [{"Name": results.PARTITION_COLUMN, "Type": "string",
                                    "Comment": ti["PartitionKeys"][0]["Comment"]}]
    params = resolver.resolve(ti["Parameters"])
    assert params["projection.enabled"] == "true" and params["projection.dt.type"] == "date"
    assert params["projection.dt.format"] == "yyyy-MM-dd"
    assert params["storage.location.template"] == f"s3://{BUCKET}/{prefix}dt=${{dt}}/"
    assert resolver.resolve(ti["StorageDescriptor"]["Location"]) == f"s3://{BUCKET}/{prefix}"
    # the writer's partition path is what the projection reads
    assert layout.prediction_partition_key("2026-01-02", "job").startswith(f"{layout.PREDICTIONS}dt=2026-01-02/")


def test_named_queries_use_this_workgroup_and_known_columns(template):
    queries = resources_of(template, "AWS::Athena::NamedQuery")
    assert len(queries) >= 3
    known = set(results.PREDICTION_SCHEMA.names) | set(results.FAILURE_SCHEMA.names) | {"dt"}
    for name, q in queries.items():
        p = q["Properties"]
        assert p["WorkGroup"] == {"Ref": "AthenaWorkGroup"} and p["Database"] == {"Ref": "ResultsDatabase"}
        sql = re.sub(r"\b[abp]\.", "", p["QueryString"])      # the comparisons' table aliases
        table = re.search(r"FROM (\w+)", sql).group(1)
        assert table in ("predictions", "failures"), name
        if sql.startswith("CREATE OR REPLACE VIEW"):
            continue
        # every identifier the query compares, groups or orders by is a real column
        for col in re.findall(r"\b(?:BY|AND|WHERE|,)\s+([A-Za-z_]\w*)\b(?!\s*\()", sql):
            if col.upper() not in {"CASE", "SUM", "COUNT", "ROUND", "MIN", "DESC", "ASC"}:
                assert col in known or col in re.findall(r"AS (\w+)", sql), f"{name}: {col}"
    wg = template["Resources"]["AthenaWorkGroup"]["Properties"]["WorkGroupConfiguration"]
    assert wg["EnforceWorkGroupConfiguration"] is True
    assert wg["ResultConfiguration"]["OutputLocation"] == {"Fn::Sub": "s3://${ImagesBucket}/athena-results/"}


# --------------------------------------------------------------------------- alarms and outputs

def test_alarms_watch_dlq_and_failed_jobs(template):
    alarms = resources_of(template, "AWS::CloudWatch::Alarm")
    watched = {(a["Properties"]["Namespace"], a["Properties"]["MetricName"], json.dumps(a["Properties"]["Dimensions"]))
               for a in alarms.values()}

    def queue(name: str) -> str:
        return json.dumps([{"Name": "QueueName", "Value": {"Fn::GetAtt": [name, "QueueName"]}}])

    for q in ("ImagesDeadLetterQueue", "CollectFailedEventsQueue", "CollectEventsDeadLetterQueue"):
        assert ("AWS/SQS", "ApproximateNumberOfMessagesVisible", queue(q)) in watched
    assert ("AWS/SQS", "ApproximateAgeOfOldestMessage", queue("ImagesQueue")) in watched
    assert ("AWS/Events", "TriggeredRules",
            json.dumps([{"Name": "RuleName", "Value": {"Ref": "TransformJobFailedRule"}}])) in watched
    # every function's errors; and the reconciler's own running
    for fn in resources_of(template, "AWS::Serverless::Function"):
        assert ("AWS/Lambda", "Errors", json.dumps([{"Name": "FunctionName", "Value": {"Ref": fn}}])) in watched
    # the scheduled functions' own running: no invocation in a period is an alarm
    silent = {a["Properties"]["Dimensions"][0]["Value"]["Ref"]: a["Properties"] for a in alarms.values()
              if a["Properties"]["MetricName"] == "Invocations"}
    assert set(silent) == {"ReconcileFunction", "DispatchFunction"}
    for a in silent.values():
        assert a["TreatMissingData"] == "breaching" and a["ComparisonOperator"] == "LessThanThreshold"
    assert silent["ReconcileFunction"]["Period"] >= 60 * template["Parameters"]["ReconcileIntervalMinutes"]["MaxValue"]
    assert silent["DispatchFunction"]["Period"] >= 10 * 60      # ten ticks of its rate(1 minute)
    for a in alarms.values():
        assert a["Properties"]["AlarmActions"] == [{"Ref": "AlarmTopic"}]


@pytest.mark.parametrize(("function", "module", "counts", "alarmed"), [
    ("ReconcileFunction", "reconcile", "COUNTS", {"JobsOverdue", "JobsRecovered", "ImagesUnreconciled"}),
    ("DispatchFunction", "dispatch", None, {"OldestWaitingSeconds"}),
])
def test_metric_alarms_match_what_the_functions_publish(template, resolver, monkeypatch, capsys, function, module,
                                                        counts, alarmed):
    """The alarms on the reconciler's and the dispatcher's figures name the namespace, dimensions and
    metric names that their publish() writes (CloudWatch embedded metric format: the function's log)."""
    import importlib

    from aws_lambda_powertools import Metrics

    handler = importlib.import_module(f"handlers.{module}")
    env = template["Resources"][function]["Properties"]["Environment"]["Variables"]
    monkeypatch.delenv("POWERTOOLS_METRICS_DISABLED", raising=False)
    monkeypatch.setattr(handler, "metrics", Metrics(namespace=env["POWERTOOLS_METRICS_NAMESPACE"],
                                                    service=env["POWERTOOLS_SERVICE_NAME"]))
    keys = getattr(handler, counts) if counts else ("images_waiting", "oldest_waiting_s", "refused", "jobs_created")
    handler.publish(dict.fromkeys(keys, 1), STACK)
    (emf,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "_aws" in line]
    (directive,) = emf["_aws"]["CloudWatchMetrics"]
    published = {m["Name"] for m in directive["Metrics"]}
    dims = {d: emf[d] for d in directive["Dimensions"][0]}
    custom = [a["Properties"] for a in resources_of(template, "AWS::CloudWatch::Alarm").values()
              if a["Properties"]["Namespace"] == directive["Namespace"]
              and {"Name": "service", "Value": env["POWERTOOLS_SERVICE_NAME"]} in a["Properties"]["Dimensions"]]
    assert {a["MetricName"] for a in custom} == alarmed <= published
    for a in custom:
        assert {d["Name"]: resolver.resolve(d["Value"]) for d in a["Dimensions"]} == dims == {
            "service": env["POWERTOOLS_SERVICE_NAME"], "stack": STACK}


def test_outputs_tell_the_user_what_to_do(template, resolver):
    out = template["Outputs"]
    for key in ("BucketName", "IncomingPrefix", "PredictionsPrefix", "QueueUrl", "AthenaWorkGroup",
                "UploadExample", "AthenaQueryExample"):
        assert key in out
    assert resolver.resolve(out["UploadExample"]["Value"]).startswith(f"aws s3 cp ./images/ s3://{BUCKET}/incoming/")
    assert "start-query-execution --work-group" in resolver.resolve(out["AthenaQueryExample"]["Value"])


def test_local_spec_contract():
    spec = local_spec("my-bucket", "teststack")
    envs = (spec.enqueue_env, spec.dispatch_env, spec.collect_env, spec.reconcile_env)
    assert {e["BUCKET_NAME"] for e in envs} == {"my-bucket"}
    assert {e["JOB_PREFIX"] for e in envs} == {"teststack"}
    assert spec.enqueue_env["DISPATCH_FUNCTION_NAME"] == "teststack-dispatch"
    assert spec.collect_event_pattern["detail"]["TransformJobName"] == [{"prefix": "teststack-"}]
    assert (spec.dispatch_timeout_s, spec.dispatch_interval_s) == (900, 60)
    assert all(isinstance(v, str) for e in envs for v in e.values())
    over = local_spec("b", overrides={"MaxReceiveCount": 2, "EnqueueBatchSize": 7})
    assert (over.max_receive_count, over.batch_size) == (2, 7)


# --------------------------------------------------------------------------- secrets

ACCESS_KEY = re.compile(rb"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b")
SECRET_ASSIGN = re.compile(rb"(?i)aws_?secret_?access_?key\W{0,5}[\"']?([A-Za-z0-9/+=]{40})\b")


def test_no_aws_credentials_in_tracked_files():
    if not shutil.which("git") or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    hits = []
    for name in filter(None, files.split(b"\0")):
        path = REPO_ROOT / name.decode()
        if not path.is_file() or path.stat().st_size > 5 * 2**20:
            continue
        data = path.read_bytes()
        for m in ACCESS_KEY.finditer(data):
            if not m.group(0).endswith(b"EXAMPLE"):  # AWS documentation's placeholder
                hits.append(f"{name.decode()}: access key id {m.group(0)[:8].decode()}...")
        for m in SECRET_ASSIGN.finditer(data):
            if b"EXAMPLEKEY" not in m.group(1):
                hits.append(f"{name.decode()}: secret access key")
    assert hits == []


def test_secret_scanner_finds_nothing_in_tracked_files():
    """detect-secrets (Yelp; its default plugins: AWS/GCP/Azure/GitHub/Slack/Stripe keys, private
    keys, JWTs, high-entropy strings, password-like assignments ...) over every tracked file.
    A deliberate fake (the local stack's dummy credentials) carries `# pragma: allowlist secret`."""
    detect_secrets = pytest.importorskip("detect_secrets")
    from detect_secrets.settings import default_settings

    if not shutil.which("git") or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    found = detect_secrets.SecretsCollection(root=str(REPO_ROOT))
    with default_settings():
        for name in filter(None, names.decode().split("\0")):
            path = REPO_ROOT / name
            if path.is_file() and path.stat().st_size <= 5 * 2**20:
                found.scan_file(name)
    # A published checksum of a tracked file (the model card states the weights' sha256) is
    # high-entropy hex but no secret: detect-secrets reports SHA-1s of findings, so compare those.
    checksums = set()
    for name in filter(None, names.decode().split("\0")):
        if name.endswith((".pt", ".npz")):   # weights and the OOD parameters, whose sha256 the card publishes
            digest = hashlib.sha256((REPO_ROOT / name).read_bytes()).hexdigest()
            checksums.add(hashlib.sha1(digest.encode()).hexdigest())
    hits = [f"{f}:{s['line_number']}: {s['type']}" for f, secrets in found.json().items() for s in secrets
            if s["hashed_secret"] not in checksums]
    assert hits == []


def test_the_container_image_follows_the_instance_type(template) -> None:
    """Every allowed TransformInstanceType is mapped to a device; a CPU type runs the CPU image of the
    same framework release, a GPU type the GPU one; the IAM condition follows the same parameter."""
    from dermscore.config import TRANSFORM_USD_PER_HOUR, TRANSFORM_VCPUS
    from infra.container import CONTAINER, CPU_IMAGE_TAG

    params = template["Parameters"]
    allowed = params["TransformInstanceType"]["AllowedValues"]
    devices = {k: v["Device"] for k, v in template["Mappings"]["TransformInstances"].items()}
    assert sorted(allowed) == sorted(devices) and params["TransformInstanceType"]["Default"] in allowed
    assert {devices[t] for t in allowed} == {"cpu", "gpu"}
    assert all(devices[t] == ("gpu" if t.split(".")[1].startswith(("g", "p")) else "cpu") for t in allowed)
    assert params["PyTorchCpuImageTag"]["Default"] == CPU_IMAGE_TAG
    assert CPU_IMAGE_TAG.startswith(f"{CONTAINER.torch}-cpu-py{CONTAINER.python_short.replace('.', '')}-")
    for instance in allowed:
        r = Resolver(template, overrides={"TransformInstanceType": instance,
                                          "ModelDataUrl": "s3://b/models/x/model.tar.gz"})
        image = r.resolve(template["Resources"]["TransformModel"]["Properties"]["PrimaryContainer"]["Image"])
        tag = CPU_IMAGE_TAG if devices[instance] == "cpu" else CONTAINER.image_tag
        assert image == f"763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:{tag}", instance
        # a custom image is used as given, whatever the type
        custom = "123456789012.dkr.ecr.us-east-1.amazonaws.com/mine:1"
        assert Resolver(template, overrides={"TransformInstanceType": instance, "ContainerImageUri": custom}).resolve(
            template["Resources"]["TransformModel"]["Properties"]["PrimaryContainer"]["Image"]) == custom
    # the types dermscore plan prices are allowed, and each has its vCPUs
    assert set(TRANSFORM_USD_PER_HOUR) <= set(allowed) and set(TRANSFORM_USD_PER_HOUR) == set(TRANSFORM_VCPUS)
