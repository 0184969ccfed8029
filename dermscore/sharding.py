"""Scale-out decisions of the enqueue step: shards, instances, batching, throttling back-off.

Pure functions (no AWS calls), so the handler, the local runner, ``dermscore plan`` and the
tests share one definition.

Batch Transform hands whole input *files* to instances: a job whose input is one manifest
runs on one instance however large ``InstanceCount`` is. So a batch's manifest is split into
``shard_count`` files under one job input prefix (``S3DataType=S3Prefix``), and the job asks
for ``min(instance_count, shards)`` instances: never an instance without a file.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

# CreateTransformJob error codes that mean "not now": the batch goes back to the queue.
THROTTLED = "ThrottlingException"
QUOTA = "ResourceLimitExceeded"
RETRYABLE_CREATE_ERRORS = frozenset({THROTTLED, QUOTA, "ThrottledException", "TooManyRequestsException",
                                     "RequestLimitExceeded", "ServiceUnavailable", "InternalFailure"})

MAX_VISIBILITY_S = 12 * 3600   # SQS ChangeMessageVisibility upper bound


def shard_count(images: int, instance_count: int, min_images_per_shard: int = 1) -> int:
    """Manifest files for a batch of ``images``: one per instance, but none smaller than
    ``min_images_per_shard`` (a shard is worth an instance's start-up only above that size).

    >>> shard_count(1000, 4, 100), shard_count(250, 4, 100), shard_count(50, 4, 100), shard_count(0, 4)
    (4, 2, 1, 0)
    """
    if images <= 0:
        return 0
    instance_count = max(1, int(instance_count))
    min_images_per_shard = max(1, int(min_images_per_shard))
    return max(1, min(instance_count, images // min_images_per_shard, images))


def instances_for(shards: int, instance_count: int) -> int:
    """``InstanceCount`` of the job: the configured count, never more than there are files."""
    return max(1, min(int(instance_count), int(shards)))


def shard_sizes(images: int, shards: int) -> list[int]:
    """Balanced sizes (they differ by at most one, larger first) summing to ``images``."""
    if shards <= 0:
        return []
    base, extra = divmod(images, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


def split(items: Sequence[T], shards: int) -> list[list[T]]:
    """Contiguous, balanced slices of ``items`` (kept in order: the same sorted manifest gives
    the same shards, hence deterministic shard files)."""
    out, start = [], 0
    for size in shard_sizes(len(items), shards):
        out.append(list(items[start:start + size]))
        start += size
    return out


# --- throttling and quotas -------------------------------------------------------------------

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


# --- batching policy -------------------------------------------------------------------------

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
