"""``dermscore rescore``: re-score a deployed stack's stored images with the model deployed now.

Starts a run of the stack's re-score function (``handlers.rescore``, asynchronously: a run of
millions of images hands itself on from invocation to invocation) and prints how to follow it;
``--status RUN`` prints the run's record (images listed, queued, skipped; parts written) and how
many of its parts still wait for the dispatcher. The new model's answers land beside the earlier
models' rows; ``dermscore query --named compare-models --param A --param B`` (or the same named
query on Athena) compares them. On the local stack, ``dermscore demo --rescore MODEL_DIR`` runs the
whole workflow.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dermscore import layout, options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", required=True, help="the deployed stack's name (its function is <stack>-rescore)")
    p.add_argument("--prefix", default=layout.INCOMING, help=f"re-score the objects under this prefix "
                                                             f"(under {layout.INCOMING})")
    p.add_argument("--since", help="first upload date to re-score (YYYY-MM-DD, UTC)")
    p.add_argument("--until", help="last upload date to re-score (YYYY-MM-DD, UTC)")
    p.add_argument("--keys", type=Path, help="a file of object keys to re-score, one per line (instead of a prefix)")
    p.add_argument("--status", metavar="RUN", help="print the progress of run RUN instead of starting one")
    p.add_argument("--bucket", help="the stack's bucket (default: its BucketName output)")
    p.add_argument("--region", help="AWS region (default: the AWS CLI's)")


def request(args: argparse.Namespace) -> dict:
    """The re-score function's event for the command line; a mistake is a one-line error."""
    from handlers.rescore import BadRequest, Request, new_run_id

    event: dict = {"prefix": args.prefix, "since": args.since, "until": args.until}
    if args.keys:
        if not args.keys.is_file():
            raise options.UserError(f"no keys file {args.keys}")
        event["keys"] = [k.strip() for k in args.keys.read_text().splitlines() if k.strip()]
    try:
        Request.of(event)
    except BadRequest as exc:
        raise options.UserError(str(exc)) from exc
    return {"run": new_run_id(), **{k: v for k, v in event.items() if v}}


def stack_bucket(session, stack: str) -> str:
    outputs = session.client("cloudformation").describe_stacks(StackName=stack)["Stacks"][0].get("Outputs") or []
    found = [o["OutputValue"] for o in outputs if o["OutputKey"] == "BucketName"]
    if not found:
        raise options.UserError(f"stack {stack} has no BucketName output; pass --bucket")
    return found[0]


def status(s3, bucket: str, run: str) -> dict | None:
    """A run's record plus ``parts_pending``: its parts not yet taken into a job by the dispatcher."""
    from dermscore.aws import is_missing, iter_keys

    try:
        record = json.loads(s3.get_object(Bucket=bucket, Key=layout.rescore_key(run))["Body"].read())
    except Exception as exc:
        if is_missing(exc):
            return None
        raise
    pending = set(iter_keys(s3, bucket, layout.PENDING))
    return {**record, "parts_pending": sum(p in pending for p in record.get("parts", []))}


def run(args: argparse.Namespace) -> int:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    event = None if args.status else request(args)
    try:
        session = boto3.session.Session(region_name=args.region)
        if event is not None:
            session.client("lambda").invoke(FunctionName=f"{args.stack}-rescore", InvocationType="Event",
                                            Payload=json.dumps(event).encode())
            print(f"re-score run {event['run']} started on {args.stack}; follow it with\n"
                  f"  dermscore rescore --stack {args.stack} --status {event['run']}")
            return 0
        bucket = args.bucket or stack_bucket(session, args.stack)
        found = status(session.client("s3"), bucket, args.status)
    except (BotoCoreError, ClientError) as exc:
        raise options.UserError(f"AWS refused: {exc}") from exc
    if found is None:
        raise options.UserError(f"no re-score run {args.status} in s3://{bucket}/{layout.RESCORE}")
    found.pop("parts", None)
    print(json.dumps(found, indent=2))
    return 0
