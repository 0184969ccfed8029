"""Each function under its own role on the local stack: template.yaml's roles in moto's IAM.

``LocalStack.create(..., enforce_iam=True)`` (or ``DERMSCORE_ENFORCE_IAM=1``) calls
:meth:`LocalIAM.create`: every role of :data:`ROLES` is created in the moto server with its trust
policy and inline policies from template.yaml, resolved for the local stack (its bucket, queues and
functions' real ARNs), and assumed through STS, so each handler signs its requests with its own
role's session; an IAM user with an allow-all policy signs the stack's own calls (creating
resources, the poller, the runner's SageMaker calls, the tests' assertions). Then
``/moto-api/reset-auth`` switches moto's ``INITIAL_NO_AUTH_ACTION_COUNT`` to 0: from that request
on, moto authenticates and authorises every request; :meth:`LocalIAM.close` puts the previous value
back (the last enforcing stack of a server does), so other tests of the process are unaffected.

What moto 5.2 evaluates (``moto/core/authorization.py``, ``moto/iam/access_control.py``):

* the signature, against an IAM user's access key or an assumed role's session (others: refused);
* the identity policies of that user or role: inline and attached, Allow and explicit Deny,
  ``Action`` and ``Resource`` with ``*`` wildcards (``NotAction`` too);
* resource ARNs only for S3 (the bucket, or ``bucket/key``) and SQS (the queue); every other
  service is checked against ``Resource: "*"``, so a grant scoped to an ARN reads as a denial
  there. The handlers' SageMaker clients are therefore the stack's own (the dispatcher and the
  reconciler get the transform runner's view anyway), and Lambda invocations run in-process
  (``infra.scheduler.LocalLambda``): neither is enforced locally.

What it does not evaluate, and what covers it instead (tests/test_iam_local.py, test_first_deploy.py):

* conditions of identity policies: it has no request context, so every condition holds
  (``s3:prefix`` on enqueue's ListBucket, ``sagemaker:InstanceTypes`` / ``sagemaker:ModelArn`` on
  CreateTransformJob, ``cloudwatch:namespace``); only ``StringEquals`` on ``sts:ExternalId`` of a
  trust policy is checked. Locally a conditioned grant is as wide as an unconditioned one;
* ``?`` as a one-character wildcard (moto turns a pattern into a regular expression);
* S3's rule that a GET of a missing key answers 403, not 404, unless the caller may ListBucket:
  moto answers NoSuchKey to anyone allowed to GET;
* the per-key rights of DeleteObjects: moto checks ``s3:DeleteObject`` on the *bucket* ARN and
  then deletes every key; and the batch actions of SQS, which AWS authorises as their single
  action (SendMessageBatch as sqs:SendMessage) but moto under their own names.
  :func:`moto_document` adds exactly these two translations to the roles it creates;
* resource-based policies (the bucket's and queues'), permission boundaries, SCPs, session policies,
  KMS key policies; nor does it check a trust policy when the stack assumes its own roles.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3

from dermscore.template import LOCAL_REGION, Resolver, load_template

if TYPE_CHECKING:
    from infra.stack import LocalStack

# The function each Lambda role belongs to (LocalStack.runtime's names), and the container's role.
FUNCTION_ROLES = {"enqueue": "EnqueueRole", "dispatch": "DispatchRole", "collect": "CollectRole",
                  "reconcile": "ReconcileRole", "rescore": "RescoreRole"}
TRANSFORM_ROLE = "TransformRole"
ROLES = (*FUNCTION_ROLES.values(), TRANSFORM_ROLE)
ENFORCE_ENV = "DERMSCORE_ENFORCE_IAM"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
# AWS authorises an SQS batch request as its single action; moto authorises it under its own name.
SQS_BATCH_ACTIONS = {"sqs:SendMessage": "sqs:SendMessageBatch", "sqs:DeleteMessage": "sqs:DeleteMessageBatch",
                     "sqs:ChangeMessageVisibility": "sqs:ChangeMessageVisibilityBatch"}


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def env(self) -> dict[str, str]:
        """As the AWS_* variables boto3 (and handlers.runtime.Runtime.from_env) read."""
        env = {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key}
        return {**env, "AWS_SESSION_TOKEN": self.session_token} if self.session_token else env


def as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def local_refs(stack: LocalStack) -> dict[str, Any]:
    """What the template's ``!Ref`` / ``!GetAtt`` of the stack's resources are locally, so that the
    roles name the real ARNs moto checks (the resolver's fallback ARNs name logical ids)."""
    from infra.stack import LambdaContext

    refs: dict[str, Any] = {"AWS::StackName": stack.stack_name, "ImagesBucket": stack.bucket,
                            "ImagesQueue": stack.queue_url, "ImagesQueue.Arn": stack.queue_arn,
                            "ImagesDeadLetterQueue": stack.dlq_url, "ImagesDeadLetterQueue.Arn": stack.dlq_arn}
    for function in FUNCTION_ROLES:   # the ARN LocalStack.invoke's context names
        context = LambdaContext(function_name=f"{stack.stack_name}-{function}")
        refs[f"{function.capitalize()}Function.Arn"] = context.invoked_function_arn
    return refs


def role_documents(template: dict[str, Any], resolver: Resolver, role: str) -> tuple[dict[str, Any],
                                                                                     dict[str, dict[str, Any]]]:
    """(trust policy, {policy name: policy document}) of ``role``, resolved (``!If`` branches
    that resolve to ``AWS::NoValue`` are dropped, as CloudFormation drops them)."""
    props = template["Resources"][role]["Properties"]
    return (resolver.resolve(props["AssumeRolePolicyDocument"]),
            {p["PolicyName"]: resolver.resolve(p["PolicyDocument"]) for p in props.get("Policies", [])})


def moto_document(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` as moto must read it to decide what AWS decides for the requests it names
    differently: an SQS batch action where its single action is allowed, and DeleteObjects
    (checked by moto on the bucket ARN) where s3:DeleteObject is allowed on keys of that bucket."""
    out = copy.deepcopy(doc)
    extra = []
    for s in as_list(out["Statement"]):
        actions = as_list(s.get("Action", []))
        batch = [SQS_BATCH_ACTIONS[a] for a in actions if a in SQS_BATCH_ACTIONS]
        if batch:
            s["Action"] = [*actions, *batch]
        buckets = sorted({r.split("/", 1)[0] for r in as_list(s.get("Resource", [])) if "/" in r})
        if s["Effect"] == "Allow" and "s3:DeleteObject" in actions and buckets:
            extra.append({"Sid": f"{s.get('Sid', '')}MotoDeleteObjects", "Effect": "Allow",
                          "Action": "s3:DeleteObject", "Resource": buckets})
    out["Statement"] = [*as_list(out["Statement"]), *extra]
    return out


# --------------------------------------------------------------------------- enforcement switch

_LOCK = threading.Lock()
_ENFORCING: dict[str, tuple[int, str]] = {}   # endpoint -> (enforcing stacks, the setting before the first)


def _reset_auth(endpoint: str, count: str) -> str:
    """Set the server's INITIAL_NO_AUTH_ACTION_COUNT (its moto-api, so an in-process server and
    one in another process alike); returns the previous value."""
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                 headers={"Content-Type": "text/plain"})   # a form body would not reach moto
    with urllib.request.urlopen(req, timeout=10) as resp:   # noqa: S310 (the local stack's own endpoint)
        return json.loads(resp.read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]


def enforce(endpoint: str) -> None:
    with _LOCK:
        count, previous = _ENFORCING.get(endpoint, (0, ""))
        if count == 0:
            previous = _reset_auth(endpoint, "0")
        _ENFORCING[endpoint] = (count + 1, previous)


def release(endpoint: str) -> None:
    with _LOCK:
        count, previous = _ENFORCING.pop(endpoint, (0, ""))
        if count > 1:
            _ENFORCING[endpoint] = (count - 1, previous)
        elif count == 1:
            _reset_auth(endpoint, previous)


# --------------------------------------------------------------------------- the roles

@dataclass
class LocalIAM:
    """The roles of one local stack in moto, their sessions, and the stack's admin user."""

    endpoint: str
    admin: Credentials
    sessions: dict[str, Credentials]
    policies: dict[str, dict[str, dict[str, Any]]]   # role -> policy name -> document (as in template.yaml)
    enforcing: bool = False

    @classmethod
    def create(cls, endpoint: str, name_prefix: str, refs: dict[str, Any],
               overrides: dict[str, Any] | None = None, template: dict[str, Any] | None = None) -> LocalIAM:
        """Create the roles of ``template`` (default: template.yaml) resolved with ``refs`` /
        ``overrides`` as ``<name_prefix>-<Role>``, assume each one, and create the admin user."""
        template = load_template() if template is None else template
        resolver = Resolver(template, refs=refs, overrides=overrides)
        session = boto3.session.Session()
        iam = session.client("iam", endpoint_url=endpoint, region_name=LOCAL_REGION)
        sts = session.client("sts", endpoint_url=endpoint, region_name=LOCAL_REGION)
        sessions, policies = {}, {}
        for role in ROLES:
            trust, docs = role_documents(template, resolver, role)
            name = f"{name_prefix}-{role}"[:64]
            arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
            for policy_name, doc in docs.items():
                iam.put_role_policy(RoleName=name, PolicyName=policy_name,
                                    PolicyDocument=json.dumps(moto_document(doc)))
            c = sts.assume_role(RoleArn=arn, RoleSessionName=role)["Credentials"]
            sessions[role] = Credentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])
            policies[role] = docs
        admin = f"{name_prefix}-admin"[:64]
        iam.create_user(UserName=admin)
        iam.put_user_policy(UserName=admin, PolicyName="local-stack", PolicyDocument=json.dumps(ALLOW_ALL))
        key = iam.create_access_key(UserName=admin)["AccessKey"]
        return cls(endpoint, Credentials(key["AccessKeyId"], key["SecretAccessKey"]), sessions, policies)

    def env(self, role: str) -> dict[str, str]:
        return self.sessions[role].env()

    def start(self) -> None:
        """From now on the server checks every request (of every client) against IAM."""
        if not self.enforcing:
            enforce(self.endpoint)
            self.enforcing = True

    def close(self) -> None:
        if self.enforcing:
            self.enforcing = False
            with contextlib.suppress(OSError):   # a server already stopped enforces nothing
                release(self.endpoint)
