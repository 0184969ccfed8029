"""When the dispatcher creates transform jobs, and what it does when SageMaker says "not now".

Arrival and dispatch are two steps (docs/scaling.md): enqueue leaves one manifest part per SQS
batch under ``pending/``; the dispatcher, on a schedule, gathers parts into jobs. The decisions
are pure functions of the pending parts and the settings (no AWS calls), so the handler, ``dermscore
plan`` and the tests share one definition.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import datetime

# CreateTransformJob error codes that mean "not now": the parts stay pending for the next run.
THROTTLED = "ThrottlingException"
QUOTA = "ResourceLimitExceeded"
RETRYABLE_CREATE_ERRORS = frozenset({THROTTLED, QUOTA, "ThrottledException", "TooManyRequestsException",
                                     "RequestLimitExceeded", "ServiceUnavailable", "InternalFailure"})

MAX_BACKOFF_S = 12 * 3600


@dataclass(frozen=True)
class Part:
    """One pending manifest part, as one listing of ``pending/`` shows it."""

    key: str
    images: int
    modified: datetime


def quiet(parts: list[Part], now: datetime, *, quiet_s: float, last_quiet: datetime | None,
          spacing_s: float) -> bool:
    """Whether a drop has ended: no part newer than ``quiet_s`` (0: the rule is off), and no job
    released this way within ``spacing_s`` (``last_quiet``), so that a slow trickle, with a quiet
    gap after every few images, still batches into one job per ``spacing_s``."""
    if quiet_s <= 0 or not parts:
        return False
    newest = max(p.modified for p in parts)
    if (now - newest).total_seconds() < quiet_s:
        return False
    return last_quiet is None or (now - last_quiet).total_seconds() >= spacing_s


def plan_jobs(parts: list[Part], now: datetime, *, min_images: int, max_images: int, max_latency_s: float,
              slots: int, release: bool = False) -> list[list[Part]]:
    """The jobs to create now: groups of pending parts, oldest first.

    * nothing while the pending volume is below ``min_images``, the oldest part is younger than
      ``max_latency_s`` (it waits for more: start-up is paid per job) and ``release`` is off;
    * else parts are packed, oldest first, into jobs of at most ``max_images`` (a part larger
      than that is a job of its own); a last job below ``min_images`` whose parts are all younger
      than ``max_latency_s`` waits for the next run, unless ``release`` (a drop has ended:
      :func:`quiet`) sends it now. So every job holds at least ``min_images`` images but the one
      the latency bound or the end of a drop forces: N images make at most ceil(N / min_images)
      jobs, plus one per quiet release;
    * at most ``slots`` jobs (``MaxConcurrentJobs`` less the running ones); the rest waits.
    """
    if slots <= 0 or not parts:
        return []
    parts = sorted(parts, key=lambda p: (p.modified, p.key))

    def overdue(group: list[Part]) -> bool:
        return (now - group[0].modified).total_seconds() >= max_latency_s

    groups: list[list[Part]] = []
    for part in parts:
        if groups and sum(p.images for p in groups[-1]) + part.images <= max_images:
            groups[-1].append(part)
        else:
            groups.append([part])
    if sum(p.images for p in groups[-1]) < min_images and not overdue(groups[-1]) and not release:
        groups.pop()
    return groups[:slots]


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
    """How long the dispatcher waits before its ``receive_count``-th try of a job whose create was
    throttled or refused for quota: ``base * 2**(n-1)``, capped, with +-``jitter`` so refused
    jobs do not all come back at the same moment."""
    receive_count = max(1, int(receive_count))
    delay = min(cap_s, base_s * 2 ** min(receive_count - 1, 20))
    r = (rng or random).uniform(1 - jitter, 1 + jitter)
    return int(max(0, min(MAX_BACKOFF_S, round(delay * r))))
