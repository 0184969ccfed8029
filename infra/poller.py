"""The SQS event source mapping of ``EnqueueFunction``, on the local stack.

Like Lambda's poller it long-polls the queue (ReceiveMessage, at most 10 messages a call),
gathers messages until the template's ``BatchSize`` is reached or its batching window has
passed, invokes the handler with an SQS event of the real shape, deletes the messages that
succeeded and leaves the ``batchItemFailures`` (or the whole batch, if the invocation
raised) to reappear after the visibility timeout, so the queue's redrive policy moves
poison messages to the DLQ exactly as on AWS.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dermscore.template import LOCAL_REGION
from infra.stack import LocalStack

log = logging.getLogger("dermscore.poller")

RECEIVE_MAX = 10            # SQS ReceiveMessage limit per call
MAX_PAYLOAD = 6 * 1024 * 1024  # Lambda's synchronous invocation payload limit ends a batch too
LONG_POLL_S = 1             # short enough for a prompt stop(), long enough not to spin
FILL_PAUSE_S = 0.2          # pause between receives while a batch fills and the queue is empty


@dataclass
class BatchResult:
    received: int
    failed: list[str] = field(default_factory=list)   # message ids left on the queue
    error: str | None = None                          # the invocation raised
    response: Any = None


def sqs_event(messages: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    """The event Lambda passes for a batch of SQS messages."""
    return {"Records": [{
        "messageId": m["MessageId"],
        "receiptHandle": m["ReceiptHandle"],
        "body": m["Body"],
        "attributes": m.get("Attributes", {}),
        "messageAttributes": m.get("MessageAttributes", {}),
        "md5OfBody": m.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": LOCAL_REGION,
    } for m in messages]}


class Poller:
    def __init__(self, stack: LocalStack, batch_size: int | None = None, window_s: float | None = None) -> None:
        self.stack = stack
        self.sqs = stack.client("sqs")
        self.batch_size = batch_size or stack.spec.batch_size
        self.window_s = stack.spec.batching_window_s if window_s is None else window_s
        self.batches = 0

    def receive(self, window_s: float | None = None) -> list[dict[str, Any]]:
        """Gather up to batch_size messages: wait for the first, then fill until the window ends."""
        window = self.window_s if window_s is None else window_s
        messages: dict[str, dict[str, Any]] = {}
        deadline: float | None = None
        payload = 0
        while len(messages) < self.batch_size and payload < MAX_PAYLOAD - 300 * 1024:
            wait = LONG_POLL_S if deadline is None else max(0.0, deadline - time.monotonic())
            asked = min(RECEIVE_MAX, self.batch_size - len(messages))
            resp = self.sqs.receive_message(
                QueueUrl=self.stack.queue_url, MaxNumberOfMessages=asked,
                WaitTimeSeconds=int(min(LONG_POLL_S, wait)), AttributeNames=["All"], MessageAttributeNames=["All"])
            got = resp.get("Messages", [])
            for m in got:
                if m["MessageId"] not in messages:
                    payload += len(m["Body"]) + 512
                # a message received again (its visibility ran out while the window filled):
                # only the newest receipt handle can delete it
                messages[m["MessageId"]] = m
            if not messages:
                return []   # nothing arrived within one long poll
            if deadline is None:
                deadline = time.monotonic() + window
            if time.monotonic() >= deadline:
                break
            if len(got) < asked:
                # The queue is drained: let messages accumulate instead of polling for each one.
                # moto's ReceiveMessage scans the whole queue (in-flight messages included) on
                # every call, so polling per arriving message made the local SQS cost grow with
                # the batch (dermscore bench); real SQS does not care, and latency grows <= 0.2 s.
                time.sleep(max(0.0, min(FILL_PAUSE_S, deadline - time.monotonic())))
        return list(messages.values())

    def dispatch(self, messages: list[dict[str, Any]]) -> BatchResult:
        """Invoke enqueue with one batch; delete what succeeded."""
        event = sqs_event(messages, self.stack.queue_arn)
        self.batches += 1
        try:
            response = self.stack.invoke("enqueue", event)
        except Exception as exc:  # the whole batch returns to the queue after the visibility timeout
            log.exception("enqueue invocation failed; %d messages return to the queue", len(messages))
            return BatchResult(len(messages), [m["MessageId"] for m in messages], f"{type(exc).__name__}: {exc}")
        failed = {f["itemIdentifier"] for f in (response or {}).get("batchItemFailures", [])}
        done = [m for m in messages if m["MessageId"] not in failed]
        for i in range(0, len(done), RECEIVE_MAX):
            chunk = done[i:i + RECEIVE_MAX]
            self.sqs.delete_message_batch(QueueUrl=self.stack.queue_url, Entries=[
                {"Id": str(j), "ReceiptHandle": m["ReceiptHandle"]} for j, m in enumerate(chunk)])
        if failed:
            log.warning("enqueue reported %d failed records; they return to the queue", len(failed))
        return BatchResult(len(messages), sorted(failed), None, response)

    def poll_once(self, window_s: float | None = None) -> BatchResult | None:
        messages = self.receive(window_s)
        if not messages:
            return None
        log.info("enqueue batch of %d messages", len(messages))
        return self.dispatch(messages)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.poll_once()
            except Exception:  # keep polling, as the managed poller does
                log.exception("poller error")
                stop.wait(1.0)
