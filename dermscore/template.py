"""Read ``template.yaml``: the one place names and settings of the stack are written down.

The local (embedded) stack calls :func:`local_spec` to get the queue settings,
the bucket notification filter and the exact environment of each Lambda
function, so it never repeats a value the template already holds.

``load_template`` parses CloudFormation YAML with cfn-lint's decoder, which turns the
short-form intrinsic tags (``!Ref``, ``!GetAtt``, ``!Sub`` ...) into their long form
(``{"Ref": ...}``, ``{"Fn::GetAtt": [...]}``), exactly as CloudFormation does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# Package data: in a checkout a link to the repository's template.yaml (what `sam deploy` reads),
# in an installed dermscore a copy of it, so `dermscore plan` and `query --list` work anywhere.
TEMPLATE_PATH = Path(__file__).resolve().parent / "template.yaml"

# Pseudo parameters used when a value is resolved for the local stack.
LOCAL_ACCOUNT_ID = "123456789012"
LOCAL_REGION = "us-east-1"
LOCAL_PARTITION = "aws"


# --------------------------------------------------------------------------- YAML

def load_template(path: str | Path = TEMPLATE_PATH) -> dict[str, Any]:
    """Parse a CloudFormation/SAM YAML template into plain Python data.

    cfn-lint's decoder reads the short-form tags (``!GetAtt A.B`` -> ``{"Fn::GetAtt": ["A", "B"]}``)
    and rejects duplicate keys; its nodes (dict/list/str subclasses carrying line marks) are
    turned into plain dicts, lists and strings.
    """
    from cfnlint.decode import cfn_yaml  # cfn-lint's import is not needed for the constants above

    return _plain(cfn_yaml.load(str(path)))


def _plain(node: Any) -> Any:
    """cfn-lint's ``dict_node`` / ``list_node`` / ``str_node`` (and their keys) as dict / list / str."""
    if isinstance(node, dict):
        return {_plain(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, str):
        return str(node)
    return node


# --------------------------------------------------------------------------- resolving

_SUB_VAR = re.compile(r"\$\{([^}!][^}]*)\}")


class Resolver:
    """Resolve intrinsic functions to concrete values for a local deployment.

    Parameters take their defaults (or ``overrides``); ``refs`` maps logical
    ids / pseudo parameters to values, and ``"X.Attr"`` keys to what ``!GetAtt X.Attr``
    returns (a local resource's real ARN); any other resource resolves to its
    logical id, and ``!GetAtt X.Arn`` to a plausible local ARN.
    """

    def __init__(self, template: dict[str, Any], refs: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None):
        self.template = template
        self.refs: dict[str, Any] = {
            "AWS::AccountId": LOCAL_ACCOUNT_ID, "AWS::Region": LOCAL_REGION,
            "AWS::Partition": LOCAL_PARTITION, "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": "dermscore", "AWS::NoValue": None,
        }
        for name, spec in (template.get("Parameters") or {}).items():
            if "Default" in spec:
                self.refs[name] = spec["Default"]
        self.refs.update(overrides or {})
        self.refs.update(refs or {})
        self.conditions: dict[str, bool] = {}

    # Properties that hold a resource's physical name (what Ref returns for these types).
    NAME_PROPERTIES = {"AWS::S3::Bucket": "BucketName", "AWS::Athena::WorkGroup": "Name",
                       "AWS::Serverless::Function": "FunctionName"}

    def ref(self, name: str) -> Any:
        if name in self.refs:
            return self.refs[name]
        resources = self.template.get("Resources") or {}
        if name in resources:
            res = resources[name]
            prop = self.NAME_PROPERTIES.get(res.get("Type", ""))
            if prop and prop in (res.get("Properties") or {}):
                return self.resolve(res["Properties"][prop])
            return name
        raise KeyError(f"unresolvable Ref {name!r}")

    def condition(self, name: str) -> bool:
        if name not in self.conditions:
            self.conditions[name] = bool(self.resolve(self.template["Conditions"][name]))
        return self.conditions[name]

    def get_att(self, res: str, attr: str) -> Any:
        if f"{res}.{attr}" in self.refs:
            return self.refs[f"{res}.{attr}"]
        resources = self.template.get("Resources") or {}
        if attr == "Arn":
            rtype = resources.get(res, {}).get("Type", "")
            service = rtype.split("::")[1].lower() if rtype.count("::") >= 2 else "local"
            if service == "s3":
                return f"arn:{LOCAL_PARTITION}:s3:::{self.ref(res)}"
            return f"arn:{LOCAL_PARTITION}:{service}:{self.refs['AWS::Region']}:{self.refs['AWS::AccountId']}:{res}"
        return f"{res}.{attr}"

    def resolve(self, node: Any) -> Any:
        if isinstance(node, list):
            return [v for v in (self.resolve(x) for x in node) if v is not None]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (key, arg), = node.items()
            if key == "Ref":
                return self.ref(arg)
            if key == "Fn::GetAtt":
                res, attr = arg if isinstance(arg, list) else arg.split(".", 1)
                return self.get_att(res, attr)
            if key == "Fn::Sub":
                text, extra = (arg, {}) if isinstance(arg, str) else (arg[0], self.resolve(arg[1]))

                def sub(m: re.Match) -> str:
                    var = m.group(1)
                    if var in extra:
                        return str(extra[var])
                    if "." in var:
                        return str(self.get_att(*var.split(".", 1)))
                    return str(self.ref(var))
                return _SUB_VAR.sub(sub, text).replace("${!", "${")
            if key == "Fn::Join":
                sep, items = arg
                return sep.join(str(v) for v in self.resolve(items))
            if key == "Fn::Select":
                idx, items = self.resolve(arg)
                return items[int(idx)]
            if key == "Fn::Split":
                sep, text = self.resolve(arg)
                return text.split(sep)
            if key == "Fn::If":
                cond, yes, no = arg
                return self.resolve(yes if self.condition(cond) else no)
            if key == "Fn::Equals":
                a, b = self.resolve(arg)
                return str(a) == str(b)
            if key == "Fn::Not":
                return not self.resolve(arg[0])
            if key == "Fn::And":
                return all(self.resolve(x) for x in arg)
            if key == "Fn::Or":
                return any(self.resolve(x) for x in arg)
            if key == "Fn::Contains":   # (template Rules)
                items, value = self.resolve(arg)
                return str(value) in [str(v) for v in items]
            if key == "Fn::FindInMap":
                name, top, second = (str(v) for v in self.resolve(arg))
                return self.resolve(self.template["Mappings"][name][top][second])
            if key == "Condition":
                return self.condition(arg)
        return {k: self.resolve(v) for k, v in node.items()}


# --------------------------------------------------------------------------- local spec

@dataclass(frozen=True)
class LocalSpec:
    """What the local stack needs to mirror the deployed one."""
    queue_visibility_timeout: int
    max_receive_count: int
    dlq_retention_s: int
    batch_size: int
    batching_window_s: int
    notification_prefix: str
    notification_suffixes: tuple[str, ...]
    enqueue_env: dict[str, str]
    collect_env: dict[str, str]
    # The SageMaker Model's container environment (TransformModel), which the local transform
    # runner gives the container code, so local and AWS defaults cannot differ.
    model_env: dict[str, str] = field(default_factory=dict)
    # Extras (beyond the contract above), handy for tests of the local stack.
    bucket: str = ""
    stack_name: str = "dermscore"
    enqueue_timeout_s: int = 0
    collect_timeout_s: int = 0
    collect_event_pattern: dict[str, Any] = field(default_factory=dict)
    # The reconciler (ReconcileFunction): its environment, timeout and schedule (rate, in seconds).
    reconcile_env: dict[str, str] = field(default_factory=dict)
    reconcile_timeout_s: int = 0
    reconcile_interval_s: int = 0
    # The dispatcher (DispatchFunction): its environment, timeout and schedule (rate, in seconds).
    dispatch_env: dict[str, str] = field(default_factory=dict)
    dispatch_timeout_s: int = 0
    dispatch_interval_s: int = 0
    # The re-score function (RescoreFunction): its environment and timeout.
    rescore_env: dict[str, str] = field(default_factory=dict)
    rescore_timeout_s: int = 0


def function_env(template: dict[str, Any], logical_id: str, resolver: Resolver) -> dict[str, str]:
    """The environment a function gets: Globals merged with the function's own variables."""
    glob = ((template.get("Globals") or {}).get("Function") or {}).get("Environment", {}).get("Variables", {})
    own = template["Resources"][logical_id]["Properties"].get("Environment", {}).get("Variables", {})
    merged = resolver.resolve({**glob, **own})
    return {k: _str(v) for k, v in merged.items() if v is not None}


def function_property(template: dict[str, Any], logical_id: str, name: str, resolver: Resolver) -> Any:
    props = template["Resources"][logical_id]["Properties"]
    if name in props:
        return resolver.resolve(props[name])
    return resolver.resolve(((template.get("Globals") or {}).get("Function") or {}).get(name))


def model_env(template: dict[str, Any], resolver: Resolver) -> dict[str, str]:
    """The ``TransformModel`` container's Environment (``AWS::SageMaker::Model``)."""
    container = template["Resources"]["TransformModel"]["Properties"]["PrimaryContainer"]
    return {k: _str(v) for k, v in resolver.resolve(container.get("Environment", {})).items() if v is not None}


def _str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _event(template: dict[str, Any], logical_id: str, event_type: str) -> dict[str, Any]:
    events = template["Resources"][logical_id]["Properties"].get("Events", {})
    for ev in events.values():
        if ev.get("Type") == event_type:
            return ev["Properties"]
    raise KeyError(f"{logical_id} has no {event_type} event")


_RATE = re.compile(r"rate\((\d+) (minute|minutes|hour|hours|day|days)\)")
_UNIT_S = {"minute": 60, "hour": 3600, "day": 86400}


def rate_seconds(expression: str) -> int:
    """``rate(15 minutes)`` -> 900 (an EventBridge schedule's rate expression)."""
    m = _RATE.fullmatch(expression.strip())
    if not m:
        raise ValueError(f"not a rate expression: {expression!r}")
    return int(m.group(1)) * _UNIT_S[m.group(2).rstrip("s")]


def notification_filter(bucket_props: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(prefix, suffixes) of the bucket's queue notifications (one suffix per S3 rule)."""
    prefixes: set[str] = set()
    suffixes: list[str] = []
    for qc in bucket_props.get("NotificationConfiguration", {}).get("QueueConfigurations", []):
        for rule in qc.get("Filter", {}).get("S3Key", {}).get("Rules", []):
            if rule["Name"].lower() == "prefix":
                prefixes.add(rule["Value"])
            elif rule["Name"].lower() == "suffix" and rule["Value"] not in suffixes:
                suffixes.append(rule["Value"])
    if len(prefixes) > 1:
        raise ValueError(f"queue notifications use several prefixes: {sorted(prefixes)}")
    return (prefixes.pop() if prefixes else ""), tuple(suffixes)


def local_spec(bucket: str, stack_name: str = "dermscore", path: str | Path = TEMPLATE_PATH,
               overrides: dict[str, Any] | None = None) -> LocalSpec:
    """Settings for the local stack, read from ``template.yaml``.

    Parameters resolve to their defaults (or ``overrides``), ``Ref ImagesBucket``
    to ``bucket`` and ``Ref AWS::StackName`` to ``stack_name``.
    """
    t = load_template(path)
    r = Resolver(t, refs={"ImagesBucket": bucket, "AWS::StackName": stack_name}, overrides=overrides)
    res = t["Resources"]
    queue = r.resolve(res["ImagesQueue"]["Properties"])
    dlq = r.resolve(res["ImagesDeadLetterQueue"]["Properties"])
    sqs_event = r.resolve(_event(t, "EnqueueFunction", "SQS"))
    rule_event = r.resolve(_event(t, "CollectFunction", "EventBridgeRule"))
    schedule = r.resolve(_event(t, "ReconcileFunction", "Schedule"))
    dispatch_schedule = r.resolve(_event(t, "DispatchFunction", "Schedule"))
    prefix, suffixes = notification_filter(r.resolve(res["ImagesBucket"]["Properties"]))
    return LocalSpec(
        queue_visibility_timeout=int(queue["VisibilityTimeout"]),
        max_receive_count=int(queue["RedrivePolicy"]["maxReceiveCount"]),
        dlq_retention_s=int(dlq.get("MessageRetentionPeriod", 345600)),
        batch_size=int(sqs_event.get("BatchSize", 10)),
        batching_window_s=int(sqs_event.get("MaximumBatchingWindowInSeconds", 0)),
        notification_prefix=prefix,
        notification_suffixes=suffixes,
        enqueue_env=function_env(t, "EnqueueFunction", r),
        collect_env=function_env(t, "CollectFunction", r),
        model_env=model_env(t, r),
        bucket=bucket,
        stack_name=stack_name,
        enqueue_timeout_s=int(function_property(t, "EnqueueFunction", "Timeout", r) or 3),
        collect_timeout_s=int(function_property(t, "CollectFunction", "Timeout", r) or 3),
        collect_event_pattern=rule_event.get("Pattern", {}),
        reconcile_env=function_env(t, "ReconcileFunction", r),
        reconcile_timeout_s=int(function_property(t, "ReconcileFunction", "Timeout", r) or 3),
        reconcile_interval_s=rate_seconds(schedule["Schedule"]),
        dispatch_env=function_env(t, "DispatchFunction", r),
        dispatch_timeout_s=int(function_property(t, "DispatchFunction", "Timeout", r) or 3),
        dispatch_interval_s=rate_seconds(dispatch_schedule["Schedule"]),
        rescore_env=function_env(t, "RescoreFunction", r),
        rescore_timeout_s=int(function_property(t, "RescoreFunction", "Timeout", r) or 3),
    )


# --------------------------------------------------------------------------- SAM transform

def translate(template: dict[str, Any] | None = None, region: str = LOCAL_REGION) -> dict[str, Any]:
    """The plain CloudFormation template that the SAM transform makes of ``template.yaml``.

    Local ``CodeUri`` folders become placeholder S3 URIs first, as ``sam package`` would
    do. Linting this output catches mistakes that cfn-lint misses inside
    ``AWS::Serverless::*`` resources. Needs ``aws-sam-translator`` (a dev dependency).
    """
    import copy
    import os

    from samtranslator.translator.transform import transform

    t = copy.deepcopy(template if template is not None else load_template())
    placeholder = "s3://sam-package-placeholder/code.zip"
    fn_globals = (t.get("Globals") or {}).get("Function") or {}
    if isinstance(fn_globals.get("CodeUri"), str) and not fn_globals["CodeUri"].startswith("s3://"):
        fn_globals["CodeUri"] = placeholder
    for res in (t.get("Resources") or {}).values():
        props = res.get("Properties") or {}
        if res.get("Type") in ("AWS::Serverless::Function", "AWS::Serverless::LayerVersion"):
            for key in ("CodeUri", "ContentUri"):
                if isinstance(props.get(key), str) and not props[key].startswith("s3://"):
                    props[key] = placeholder

    class _NoManagedPolicies:  # every role is explicit: no managed policy names to resolve
        def load(self) -> dict[str, str]:
            return {}

    old = os.environ.get("AWS_DEFAULT_REGION")
    os.environ["AWS_DEFAULT_REGION"] = region  # samtranslator reads the region from boto3
    try:
        return transform(t, {}, _NoManagedPolicies())
    finally:
        if old is None:
            os.environ.pop("AWS_DEFAULT_REGION", None)
        else:
            os.environ["AWS_DEFAULT_REGION"] = old
