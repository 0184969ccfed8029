"""The schedules of ``DispatchFunction`` and ``ReconcileFunction`` on the local stack, and the
Lambda service they call.

On AWS an EventBridge schedule invokes the dispatcher every minute (and enqueue wakes it with
``lambda:Invoke`` when the pending volume makes a job), and the reconciler every
``ReconcileIntervalMinutes``; the reconciler reads job states with DescribeTransformJob and
re-drives collect with ``lambda:Invoke``. Locally:

* :class:`Dispatcher` invokes ``handlers.dispatch.lambda_handler`` on a timer (every step of
  ``LocalPipeline.drain``, or a thread of ``LocalPipeline.start_background``) no more often than
  its interval, and whenever enqueue wakes it; its SageMaker client is the runner's view (it
  counts running jobs);

* :class:`Scheduler` invokes ``handlers.reconcile.lambda_handler`` with the function's own
  environment from template.yaml: on a timer (a thread of ``LocalPipeline.start_background``),
  or once whenever ``LocalPipeline.drain`` finds the pipeline idle. ``after_s`` shortens its
  bound (``RECONCILE_AFTER_MINUTES``) for tests;
* its SageMaker client is the transform runner's view (``TransformRunner.sagemaker_view``): moto
  calls every job Completed at once, the runner knows whether it ran and how it ended;
* its Lambda client is :class:`LocalLambda`, which runs the invoked function in this process.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from dermscore.template import LOCAL_ACCOUNT_ID, LOCAL_REGION
from infra.stack import LocalStack, client_lock

log = logging.getLogger("dermscore.scheduler")

FUNCTIONS = ("enqueue", "collect", "reconcile", "dispatch")
ASYNC_ATTEMPTS = 3   # an asynchronous invocation that fails is retried twice (collect's EventInvokeConfig)


class LocalLambda:
    """``Invoke`` of this stack's functions, run in this process. An asynchronous invocation
    (``InvocationType="Event"``) runs before the call returns; if it keeps failing the error is
    logged, as Lambda would hand the event to the function's failure destination."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.invocations: list[tuple[str, dict[str, Any]]] = []

    def invoke(self, FunctionName: str, InvocationType: str = "RequestResponse",  # noqa: N803 (boto3's names)
               Payload: bytes | str = b"{}", **_: Any) -> dict[str, Any]:
        names = {f"{self.stack.stack_name}-{f}": f for f in FUNCTIONS}
        if FunctionName not in names:
            raise ValueError(f"no function {FunctionName!r} in stack {self.stack.stack_name}")
        function, event = names[FunctionName], json.loads(Payload)
        self.invocations.append((function, event))
        if InvocationType != "Event":
            result = self.stack.invoke(function, event)
            return {"StatusCode": 200, "Payload": io.BytesIO(json.dumps(result, default=str).encode())}
        for attempt in range(1, ASYNC_ATTEMPTS + 1):
            try:
                self.stack.invoke(function, event)
                break
            except Exception:
                log.exception("%s failed (asynchronous attempt %d/%d)", FunctionName, attempt, ASYNC_ATTEMPTS)
        return {"StatusCode": 202}


def scheduled_event() -> dict[str, Any]:
    """The event an EventBridge schedule sends (the reconciler reads none of it)."""
    return {"version": "0", "id": str(uuid.uuid4()), "detail-type": "Scheduled Event", "source": "aws.events",
            "account": LOCAL_ACCOUNT_ID, "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": LOCAL_REGION, "resources": [], "detail": {}}


class Scheduler:
    def __init__(self, stack: LocalStack, sagemaker: Any, after_s: float | None = None,
                 interval_s: float | None = None) -> None:
        """``sagemaker``: the client the reconciler describes jobs with (``TransformRunner.sagemaker_view``)."""
        from handlers.runtime import Runtime

        self.stack = stack
        env = stack.function_env("reconcile")
        if after_s is not None:
            env["RECONCILE_AFTER_MINUTES"] = str(after_s / 60)
        self.after_s = float(env["RECONCILE_AFTER_MINUTES"]) * 60
        self.interval_s = stack.spec.reconcile_interval_s if interval_s is None else interval_s
        self.lambda_ = LocalLambda(stack)
        with client_lock():
            rt = Runtime.from_env(env)
        self.runtime = replace(rt, sagemaker=sagemaker, lambda_=self.lambda_)
        self.reports: list[dict[str, int]] = []

    def run_once(self) -> dict[str, int] | None:
        """One scheduled invocation; its report, or None if it raised (logged)."""
        try:
            report = self.stack.invoke("reconcile", scheduled_event(), rt=self.runtime)
        except Exception:
            log.exception("reconciler run failed")
            return None
        self.reports.append(report)
        return report

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            self.run_once()


class Dispatcher:
    def __init__(self, stack: LocalStack, sagemaker: Any, interval_s: float | None = None,
                 max_latency_s: float | None = None) -> None:
        """``interval_s``: the schedule (template.yaml's rate unless given); ``max_latency_s``:
        replaces ``MaxLatencySeconds`` (the demo and tests do not wait hours for a job)."""
        self.stack = stack
        if max_latency_s is not None:
            stack.spec = replace(stack.spec, dispatch_env={**stack.spec.dispatch_env,
                                                           "MAX_LATENCY_S": str(int(max_latency_s))})
        self.interval_s = stack.spec.dispatch_interval_s if interval_s is None else interval_s
        stack.inject("dispatch", sagemaker=sagemaker)
        stack.inject("enqueue", lambda_=LocalLambda(stack))   # enqueue wakes the dispatcher
        self.reports: list[dict[str, int]] = []
        self._last = float("-inf")

    def run_once(self) -> dict[str, int] | None:
        """One scheduled invocation; its report, or None if it raised (logged)."""
        self._last = time.monotonic()
        try:
            report = self.stack.invoke("dispatch", scheduled_event())
        except Exception:
            log.exception("dispatcher run failed")
            return None
        self.reports.append(report)
        return report

    def tick(self) -> dict[str, int] | None:
        """Run if the schedule says so (its interval passed since the last run)."""
        return self.run_once() if time.monotonic() - self._last >= self.interval_s else None

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(max(0.5, self.interval_s)):
            self.run_once()
