"""What enqueue does with a batch: submit it, let it wait for more images, or back off.

The decisions are pure functions of the batch and the settings (no AWS calls), so the handler
reads parse -> decide -> act, and ``dermscore plan`` and the tests use the same rules
(docs/scaling.md).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

# CreateTransformJob error codes that mean "not now": the batch goes back to the queue.
THROTTLED = "ThrottlingException"
QUOTA = "ResourceLimitExceeded"
RETRYABLE_CREATE_ERRORS = frozenset({THROTTLED, QUOTA, "ThrottledException", "TooManyRequestsException",
                                     "RequestLimitExceeded", "ServiceUnavailable", "InternalFailure"})

MAX_VISIBILITY_S = 12 * 3600   # SQS ChangeMessageVisibility upper bound


@dataclass(frozen=True)
class Submit:
    """Create the batch's transform job now."""


@dataclass(frozen=True)
class GiveBack:
    """Return the batch's messages to the queue; they reappear in ``delay_s``."""

    delay_s: int
    why: str          # "accumulate" (below MIN_IMAGES_PER_JOB) | "throttled" | "quota"


Decision = Submit | GiveBack


def decide(images: int, oldest_age_s: float, max_receive_count_seen: int, *, min_images_per_job: int,
           max_job_wait_s: float, max_receive_count: int, step_s: float) -> Decision:
    """Submit, or give a too-small batch back so it accumulates with later images (:func:`should_defer`)."""
    if should_defer(images, oldest_age_s, max_receive_count_seen, min_images_per_job=min_images_per_job,
                    max_job_wait_s=max_job_wait_s, max_receive_count=max_receive_count):
        return GiveBack(defer_delay_s(oldest_age_s, max_job_wait_s, step_s), "accumulate")
    return Submit()


def after_refusal(code: str, receive_count: int, base_s: int, rng: random.Random | None = None) -> GiveBack | None:
    """A refused CreateTransformJob: back off (throttling, quota) or None (not retryable: raise)."""
    if not is_retryable_create_error(code):
        return None
    return GiveBack(backoff_s(receive_count, base_s, rng=rng), "quota" if code == QUOTA else "throttled")


def is_retryable_create_error(code: str) -> bool:
    return code in RETRYABLE_CREATE_ERRORS


def quota_name(instance_type: str, code: str, message: str = "") -> str:
    """The Service Quotas entry (Amazon SageMaker) to raise for a CreateTransformJob refusal.

    SageMaker quotes the limit in its message ("The account-level service limit
    'ml.g4dn.xlarge for transform job usage' is 0 Instances, ..."): that name wins; otherwise
    the instance quota of the configured type, the usual culprit on new accounts.
    """
    if code == QUOTA:
        quoted = re.search(r"limit '([^']+)'", message) or re.search(r"'([^']+)'", message)
        return quoted.group(1) if quoted else f"{instance_type} for transform job usage"
    return "CreateTransformJob request rate (API throttling; retried with back-off)"


def backoff_s(receive_count: int, base_s: int, cap_s: int = 900, jitter: float = 0.2,
              rng: random.Random | None = None) -> int:
    """Visibility timeout for a batch sent back after a throttled/quota-refused create:
    ``base * 2**(receive_count-1)``, capped, with +-``jitter`` so returned batches do not
    all come back at the same moment."""
    receive_count = max(1, int(receive_count))
    delay = min(cap_s, base_s * 2 ** min(receive_count - 1, 20))
    r = (rng or random).uniform(1 - jitter, 1 + jitter)
    return int(max(0, min(MAX_VISIBILITY_S, round(delay * r))))


def should_defer(images: int, oldest_age_s: float, max_receive_count_seen: int, *, min_images_per_job: int,
                 max_job_wait_s: float, max_receive_count: int, reserve_receives: int = 2) -> bool:
    """Return a too-small batch to the queue so it accumulates with later images?

    Defer only while all hold:

    * the batch has fewer than ``min_images_per_job`` images (1 disables the policy);
    * its oldest message is younger than ``max_job_wait_s`` (so no image waits more than that,
      plus one deferral, before a job is created however few images there are);
    * every message has receives to spare: each return to the queue counts as a receive, and
      ``reserve_receives`` are kept for real failures before the DLQ's ``maxReceiveCount``.
    """
    if min_images_per_job <= 1 or images <= 0 or images >= min_images_per_job:
        return False
    if oldest_age_s >= max_job_wait_s:
        return False
    return max_receive_count_seen + reserve_receives < max_receive_count


def defer_delay_s(oldest_age_s: float, max_job_wait_s: float, step_s: float) -> int:
    """How long a deferred batch stays invisible: one step, but not past its deadline."""
    remaining = max(0.0, max_job_wait_s - oldest_age_s)
    return int(max(1, min(MAX_VISIBILITY_S, math.ceil(min(step_s, remaining)))))
