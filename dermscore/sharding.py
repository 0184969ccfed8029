"""Scale-out of one transform job: how many manifest files (shards) and instances.

Pure functions (no AWS calls), so the handler, the local runner, ``dermscore plan`` and the
tests share one definition.

Batch Transform hands whole input *files* to instances: a job whose input is one manifest
runs on one instance however large ``InstanceCount`` is. So a job's manifest is split into
``shards_for`` files under one job input prefix (``S3DataType=S3Prefix``), and the job asks
for ``min(instance_count, shards)`` instances: never an instance without a file.
"""

from __future__ import annotations


def shard_count(images: int, instance_count: int, min_images_per_shard: int = 1) -> int:
    """Manifest files for a job of ``images``: one per instance, but none smaller than
    ``min_images_per_shard`` (a shard is worth an instance's start-up only above that size).

    >>> shard_count(1000, 4, 100), shard_count(250, 4, 100), shard_count(50, 4, 100), shard_count(0, 4)
    (4, 2, 1, 0)
    """
    if images <= 0:
        return 0
    instance_count = max(1, int(instance_count))
    min_images_per_shard = max(1, int(min_images_per_shard))
    return max(1, min(instance_count, images // min_images_per_shard, images))


def shards_for(images: int, instance_count: int, min_images_per_shard: int = 1,
               max_images_per_shard: int = 0) -> int:
    """:func:`shard_count`, plus as many files as keep each at most ``max_images_per_shard`` lines
    (0: no bound), so whoever writes or reads one file holds a bounded amount, whatever the job's size.

    >>> shards_for(1000, 4, 100), shards_for(1_000_000, 4, 250, 50_000), shards_for(10, 1, 1, 0)
    (4, 20, 1)
    """
    shards = shard_count(images, instance_count, min_images_per_shard)
    if max_images_per_shard > 0:
        shards = max(shards, -(-images // max_images_per_shard))
    return shards


def instances_for(shards: int, instance_count: int) -> int:
    """``InstanceCount`` of the job: the configured count, never more than there are files."""
    return max(1, min(int(instance_count), int(shards)))


def shard_sizes(images: int, shards: int) -> list[int]:
    """Balanced sizes (they differ by at most one, larger first) summing to ``images``."""
    if shards <= 0:
        return []
    base, extra = divmod(images, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]
