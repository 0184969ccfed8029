"""``dermscore redrive``: move the dead-letter queue's messages back to the images queue.

A message lands in the DLQ after ``MaxReceiveCount`` failed receives (a bug, an outage, a
quota). Once the cause is fixed, ``dermscore redrive`` gives them another go::

    dermscore redrive --dlq-url <DeadLetterQueueUrl> --queue-url <QueueUrl>    # stack Outputs

Two ways, the first that works:

* ``StartMessageMoveTask`` (SQS's own DLQ redrive, asynchronous, server side) on AWS;
* receive -> send -> delete, 10 at a time, where the endpoint does not implement it (the
  moto server of the local stack) or with ``--method copy``. A message is deleted from the
  DLQ only after the queue accepted it, so a crash can duplicate a message but never lose
  one; enqueue drops the duplicate (its upload is claimed once, ``handlers.claims``).

Against the local stack, point boto3 at it as usual (``AWS_ENDPOINT_URL`` or ``--endpoint-url``).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from botocore.exceptions import ClientError

from dermscore.aws import error_code

log = logging.getLogger("dermscore.redrive")

BATCH = 10                      # SQS batch limit
NOT_SUPPORTED = {"NotImplemented", "UnsupportedOperation", "InvalidAction", "UnknownOperationException",
                 "AWS.SimpleQueueService.UnsupportedOperation", "InternalFailure", "500", "501"}


def queue_arn(sqs, url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def move_task(sqs, dlq_url: str, queue_url: str | None, max_per_second: int | None = None) -> str:
    """Start SQS's message move task; returns its handle (raises where not implemented)."""
    kwargs: dict[str, Any] = {"SourceArn": queue_arn(sqs, dlq_url)}
    if queue_url:
        kwargs["DestinationArn"] = queue_arn(sqs, queue_url)   # default: the queue it came from
    if max_per_second:
        kwargs["MaxNumberOfMessagesPerSecond"] = max_per_second
    return sqs.start_message_move_task(**kwargs)["TaskHandle"]


def copy_messages(sqs, dlq_url: str, queue_url: str, max_messages: int | None = None,
                  visibility_timeout: int = 60) -> int:
    """receive -> send -> delete until the DLQ answers empty; returns the messages moved."""
    moved = 0
    while max_messages is None or moved < max_messages:
        want = BATCH if max_messages is None else min(BATCH, max_messages - moved)
        msgs = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=want, WaitTimeSeconds=1,
                                   VisibilityTimeout=visibility_timeout,
                                   MessageAttributeNames=["All"]).get("Messages", [])
        if not msgs:
            break
        entries = []
        for i, m in enumerate(msgs):
            entry: dict[str, Any] = {"Id": str(i), "MessageBody": m["Body"]}
            if m.get("MessageAttributes"):
                entry["MessageAttributes"] = m["MessageAttributes"]
            entries.append(entry)
        sent = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        ok = {e["Id"] for e in sent.get("Successful", [])}
        for f in sent.get("Failed", []):
            log.error("not moved (stays in the DLQ): %s %s", f.get("Code"), f.get("Message"))
        done = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs) if str(i) in ok]
        if done:
            sqs.delete_message_batch(QueueUrl=dlq_url, Entries=done)
        moved += len(done)
        if not done:  # the queue refuses: stop instead of spinning; the messages stay in the DLQ
            break
    return moved


def redrive(sqs, dlq_url: str, queue_url: str, method: str = "auto", max_messages: int | None = None) -> dict[str, Any]:
    """Move the DLQ's messages to ``queue_url``; returns what was done."""
    if method in ("auto", "move-task") and max_messages is None:
        try:
            handle = move_task(sqs, dlq_url, queue_url)
            return {"method": "move-task", "task_handle": handle}
        except ClientError as exc:
            code = error_code(exc)
            status = str((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
            if method == "move-task" or not (code in NOT_SUPPORTED or status in NOT_SUPPORTED):
                raise
            log.info("StartMessageMoveTask not available here (%s); moving messages one batch at a time", code)
    t0 = time.monotonic()
    moved = copy_messages(sqs, dlq_url, queue_url, max_messages)
    return {"method": "copy", "moved": moved, "seconds": round(time.monotonic() - t0, 2)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dlq-url", required=True, help="the dead-letter queue (stack output DeadLetterQueueUrl)")
    p.add_argument("--queue-url", required=True, help="the images queue (stack output QueueUrl)")
    p.add_argument("--method", choices=("auto", "move-task", "copy"), default="auto",
                   help="auto: StartMessageMoveTask where the endpoint has it, else receive/send/delete")
    p.add_argument("--max-messages", type=int, default=None, help="move at most this many (implies --method copy)")
    p.add_argument("--endpoint-url", default=None, help="e.g. the local stack's http://127.0.0.1:PORT")
    p.add_argument("--region", default=None, help="AWS region of the queues (default: from the environment)")


def run(args: argparse.Namespace) -> int:
    import boto3

    sqs = boto3.client("sqs", endpoint_url=args.endpoint_url, region_name=args.region)
    before = int(sqs.get_queue_attributes(QueueUrl=args.dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
                 ["Attributes"]["ApproximateNumberOfMessages"])
    out = redrive(sqs, args.dlq_url, args.queue_url, args.method, args.max_messages)
    if out["method"] == "move-task":
        print(f"redrive: message move task started for about {before} message(s) (task {out['task_handle']}); "
              f"follow it with `aws sqs list-message-move-tasks --source-arn {queue_arn(sqs, args.dlq_url)}`")
    else:
        print(f"redrive: moved {out['moved']} of about {before} message(s) from the DLQ back to the queue "
              f"in {out['seconds']} s")
    return 0
