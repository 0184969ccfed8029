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
from datetime import UTC, datetime
from typing import Any

from dermscore.template import LOCAL_ACCOUNT_ID, LOCAL_REGION
from infra.stack import LocalStack

log = logging.getLogger("dermscore.scheduler")

FUNCTIONS = ("enqueue", "collect", "reconcile", "dispatch", "rescore")
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


class Scheduled:
    """A function on a local timer, as an EventBridge schedule invokes it: ``run_once`` is one
    scheduled invocation, ``tick`` one if the interval has passed since the last, ``run`` the timer
    thread. The function's settings (``env`` over template.yaml's) and clients go into the stack's
    runtime for it, so an invocation from elsewhere (``LocalLambda``) gets the same."""

    function: str
    MIN_TICK_S = 0.5   # the timer thread's shortest wait (an interval of 0 means "at every tick")

    def __init__(self, stack: LocalStack, interval_s: float, env: dict[str, str] | None = None,
                 **clients: Any) -> None:
        self.stack, self.interval_s = stack, interval_s
        stack.inject(self.function, env=env, **clients)
        self.reports: list[dict[str, int]] = []
        self._last = float("-inf")

    @property
    def runtime(self) -> Any:
        return self.stack.runtime(self.function)

    def run_once(self) -> dict[str, int] | None:
        """One scheduled invocation; its report, or None if it raised (logged)."""
        self._last = time.monotonic()
        try:
            report = self.stack.invoke(self.function, scheduled_event())
        except Exception:
            log.exception("%s run failed", self.function)
            return None
        self.reports.append(report)
        return report

    def tick(self) -> dict[str, int] | None:
        """Run if the schedule says so (its interval passed since the last run)."""
        return self.run_once() if time.monotonic() - self._last >= self.interval_s else None

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(max(self.MIN_TICK_S, self.interval_s)):
            self.run_once()


class Scheduler(Scheduled):
    """The reconciler: its SageMaker client is the transform runner's view
    (``TransformRunner.sagemaker_view``), its Lambda client :class:`LocalLambda`; ``after_s``
    shortens its bound (``RECONCILE_AFTER_MINUTES``) and its give-up wait (``GIVE_UP_WAIT_S``) for tests."""

    function = "reconcile"

    def __init__(self, stack: LocalStack, sagemaker: Any, after_s: float | None = None,
                 interval_s: float | None = None) -> None:
        self.lambda_ = LocalLambda(stack)
        # a shorter bound shortens the give-up's wait for collects in flight with it (tests)
        env = (None if after_s is None else
               {"RECONCILE_AFTER_MINUTES": str(after_s / 60), "GIVE_UP_WAIT_S": str(after_s)})
        super().__init__(stack, stack.spec.reconcile_interval_s if interval_s is None else interval_s, env,
                         sagemaker=sagemaker, lambda_=self.lambda_)
        self.after_s = self.runtime.settings.reconcile_after_minutes * 60
        self.give_up_wait_s = self.runtime.settings.give_up_wait_s


class Dispatcher(Scheduled):
    """The dispatcher: its SageMaker client is the runner's view (it counts running jobs);
    ``interval_s`` replaces its schedule, ``max_latency_s`` its ``MaxLatencySeconds`` (the demo
    and tests do not wait hours for a job). Enqueue and rescore wake it through :class:`LocalLambda`."""

    function = "dispatch"

    def __init__(self, stack: LocalStack, sagemaker: Any, interval_s: float | None = None,
                 max_latency_s: float | None = None) -> None:
        super().__init__(stack, stack.spec.dispatch_interval_s if interval_s is None else interval_s,
                         {"MAX_LATENCY_S": str(int(max_latency_s))} if max_latency_s is not None else None,
                         sagemaker=sagemaker)
        for waker in ("enqueue", "rescore"):
            stack.inject(waker, lambda_=LocalLambda(stack))
