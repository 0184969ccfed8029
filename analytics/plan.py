"""``dermscore plan``: a capacity and cost model for SageMaker Batch Transform (docs/scaling.md).

For a daily volume it works out how the pipeline as built batches the images (SQS batching
window, the Lambda batch cap, the MinImagesPerJob / MaxJobWaitSeconds policy), how many
shards and instances each job gets (the enqueue step's own sharding functions), and from
the per-instance throughput, the instance price and the job start-up time::

    images/job   = min(batch cap, max(rate x window, min(MinImagesPerJob, rate x MaxJobWait)))
    jobs/day     = images/day / images/job
    job hours    = instances x (start-up + images/job / (instances x throughput)) / 3600
    $/day        = jobs/day x job hours x $/h;    $/1M = $/day / images/day x 1e6
    latency      = time to fill the batch + start-up + processing (+ seconds for collect)

Every input is a flag; the defaults for ml.g4dn.xlarge are labelled assumptions (no GPU was
available where this was written): see ``INSTANCES`` and docs/scaling.md.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import Any

from dermscore import sharding
from dermscore.config import TRANSFORM_USD_PER_HOUR

DAY_S = 86_400
DEFAULT_VOLUMES = (10_000, 1_000_000, 100_000_000)

# Lambda hands enqueue at most 10,000 messages *and* 6 MB per invocation; one S3 event
# notification is ~2 KB as an SQS message, so ~3,000 images is the practical cap per job.
LAMBDA_BATCH_CAP = 3_000


@dataclass(frozen=True)
class InstanceProfile:
    usd_per_hour: float
    images_per_second: float
    startup_minutes: float
    source: str


INSTANCES: dict[str, InstanceProfile] = {
    # Price: dermscore.config.TRANSFORM_USD_PER_HOUR. Throughput: ASSUMPTION, not measured: a T4
    # runs a DenseNet-class network forward at ~1,000 images/s (issue 5); end to end the 4 vCPUs
    # must also GET and decode every JPEG (decode + resize with draft(): ~266 images/s per core
    # measured on the 2-core dev machine, docs/benchmark.md: ~1,000 images/s on 4 vCPUs before
    # the GETs), so half the forward rate is taken. Replace with `dermscore bench --device cuda`
    # figures via --images-per-second.
    # Start-up: ASSUMPTION, "several minutes" for GPU transform jobs (provisioning + image pull
    # + model load); assumed billed.
    "ml.g4dn.xlarge": InstanceProfile(TRANSFORM_USD_PER_HOUR["ml.g4dn.xlarge"], 500.0, 6.0,
                                      "price: project figure; rate and start-up: labelled assumptions"),
}


@dataclass(frozen=True)
class Plan:
    images_per_day: int
    images_per_job: int
    jobs_per_day: float
    shards_per_job: int
    instances_per_job: int
    job_minutes: float
    startup_share: float
    instance_hours_per_day: float
    busy_instances: float
    batch_fill_s: float
    latency_s: float
    usd_per_day: float
    usd_per_million: float
    usd_per_million_ideal: float


def images_per_job(images_per_day: float, window_s: float, cap: int, min_images_per_job: int = 1,
                   max_job_wait_s: float = 0) -> int:
    """How many images one job gets on average at a steady arrival rate."""
    rate = images_per_day / DAY_S
    by_window = rate * window_s
    by_policy = min(float(min_images_per_job), rate * max(max_job_wait_s, window_s))
    return int(max(1, min(cap, max(by_window, by_policy), images_per_day)))


def best_instance_count(images: int, images_per_second: float, startup_s: float, max_instances: int,
                        min_images_per_shard: int) -> int:
    """Fewest instances whose processing time is no longer than the start-up: beyond that,
    more instances cut latency little and add a start-up each; never more than the shards."""
    shards = sharding.shard_count(images, max_instances, min_images_per_shard)
    wanted = math.ceil(images / (images_per_second * max(startup_s, 1.0)))
    return sharding.instances_for(shards, max(1, min(wanted, max_instances)))


def plan(images_per_day: int, *, usd_per_hour: float, images_per_second: float, startup_minutes: float,
         window_s: float = 300, batch_cap: int = LAMBDA_BATCH_CAP, instance_count: int | None = None,
         max_instances: int = 4, min_images_per_shard: int = 250, min_images_per_job: int = 1,
         max_job_wait_s: float = 900, collect_s: float = 10) -> Plan:
    startup_s = startup_minutes * 60
    per_job = images_per_job(images_per_day, window_s, batch_cap, min_images_per_job, max_job_wait_s)
    if instance_count is None:
        k = best_instance_count(per_job, images_per_second, startup_s, max_instances, min_images_per_shard)
    else:
        k = sharding.instances_for(sharding.shard_count(per_job, instance_count, min_images_per_shard), instance_count)
    shards = sharding.shard_count(per_job, k, min_images_per_shard)
    processing_s = max(sharding.shard_sizes(per_job, shards)) / images_per_second   # the largest shard
    job_s = startup_s + processing_s
    jobs = images_per_day / per_job
    inst_hours = jobs * k * job_s / 3600
    usd = inst_hours * usd_per_hour
    fill_s = per_job / (images_per_day / DAY_S)
    return Plan(
        images_per_day=images_per_day, images_per_job=per_job, jobs_per_day=jobs, shards_per_job=shards,
        instances_per_job=k, job_minutes=job_s / 60, startup_share=startup_s / job_s,
        instance_hours_per_day=inst_hours, busy_instances=inst_hours / 24,
        batch_fill_s=fill_s, latency_s=fill_s + job_s + collect_s,
        usd_per_day=usd, usd_per_million=usd / images_per_day * 1e6,
        usd_per_million_ideal=usd_per_hour / 3600 / images_per_second * 1e6)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:g}M"
    if n >= 1e3:
        return f"{n / 1e3:g}k"
    return f"{n:g}"


HEADER = ("images/day", "images/job", "jobs/day", "inst/job", "job time", "start-up share",
          "inst-h/day", "avg busy inst", "latency (max)", "$/day", "$/1M images")


def rows(plans: list[Plan]) -> list[tuple[str, ...]]:
    return [(_count(p.images_per_day), f"{p.images_per_job:,}", f"{p.jobs_per_day:,.0f}", str(p.instances_per_job),
             _duration(p.job_minutes * 60), f"{p.startup_share:.0%}", f"{p.instance_hours_per_day:,.1f}",
             f"{p.busy_instances:,.1f}", _duration(p.latency_s), f"${p.usd_per_day:,.2f}",
             f"${p.usd_per_million:,.2f}") for p in plans]


def markdown_table(plans: list[Plan]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(plans)]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images-per-day", type=int, action="append", metavar="N",
                   help="daily volume (repeatable; default: 10k, 1M and 100M)")
    p.add_argument("--instance", default="ml.g4dn.xlarge",
                   help=f"transform instance type (built-in profiles: {', '.join(INSTANCES)}; others need "
                        "--usd-per-hour, --images-per-second and --startup-minutes)")
    p.add_argument("--images-per-second", type=float, help="sustained end-to-end rate of ONE instance")
    p.add_argument("--usd-per-hour", type=float, help="instance price for transform jobs")
    p.add_argument("--startup-minutes", type=float, help="billed start-up per job and instance")
    p.add_argument("--window", type=float, default=300, help="SQS batching window, s (EnqueueBatchingWindowSeconds)")
    p.add_argument("--batch-cap", type=int, default=LAMBDA_BATCH_CAP,
                   help="most images per enqueue invocation, i.e. per job (Lambda: 10,000 messages / 6 MB)")
    p.add_argument("--instance-count", type=int, help="TransformInstanceCount (default: the cheapest that keeps "
                                                       "processing >= start-up, up to --max-instances)")
    p.add_argument("--max-instances", type=int, default=4, help="instances per job allowed (quota), default 4")
    p.add_argument("--min-images-per-shard", type=int, default=250)
    p.add_argument("--min-images-per-job", type=int, default=1, help="batching policy (MinImagesPerJob)")
    p.add_argument("--max-job-wait", type=float, default=900, help="batching policy (MaxJobWaitSeconds)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (as in docs/scaling.md)")


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    prof = INSTANCES.get(args.instance)
    values = {"usd_per_hour": args.usd_per_hour, "images_per_second": args.images_per_second,
              "startup_minutes": args.startup_minutes}
    missing = [k for k, v in values.items() if v is None and prof is None]
    if missing:
        options = ", ".join(f"--{m.replace('_', '-')}" for m in missing)
        raise SystemExit(f"no built-in profile for {args.instance}: give {options}")
    for k in values:
        if values[k] is None:
            values[k] = getattr(prof, k)
    return values


def run(args: argparse.Namespace) -> int:
    values = resolve(args)
    volumes = args.images_per_day or list(DEFAULT_VOLUMES)
    plans = [plan(n, **values, window_s=args.window, batch_cap=args.batch_cap, instance_count=args.instance_count,
                  max_instances=args.max_instances, min_images_per_shard=args.min_images_per_shard,
                  min_images_per_job=args.min_images_per_job, max_job_wait_s=args.max_job_wait) for n in volumes]
    prof = INSTANCES.get(args.instance)
    print(f"{args.instance}: ${values['usd_per_hour']}/h, {values['images_per_second']:g} images/s per instance, "
          f"{values['startup_minutes']:g} min start-up per job"
          + (f"  [{prof.source}]" if prof and None in (args.usd_per_hour, args.images_per_second,
                                                       args.startup_minutes) else ""))
    print(f"batching: window {args.window:g} s, <= {args.batch_cap:,} images/job, MinImagesPerJob "
          f"{args.min_images_per_job}, MaxJobWait {args.max_job_wait:g} s; "
          f"shards >= {args.min_images_per_shard} images")
    if args.markdown:
        print(markdown_table(plans))
    else:
        table = [HEADER, *rows(plans)]
        widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
        for r in table:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)))
    print(f"floor without start-up: ${plans[0].usd_per_million_ideal:,.2f} per 1M images")
    return 0


def as_dict(p: Plan) -> dict[str, Any]:
    return asdict(p)
