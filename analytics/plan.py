"""``dermscore plan``: a capacity and cost model for SageMaker Batch Transform (docs/scaling.md).

For a daily volume it works out how the pipeline as built batches the images (SQS batching
window, the Lambda batch cap, the MinImagesPerJob / MaxJobWaitSeconds policy), how many
shards and instances each job gets (the enqueue step's own sharding functions), and from
the per-instance throughput, the instance price and the job start-up time::

    images/job   = min(batch cap, max(rate x window, min(MinImagesPerJob, rate x MaxJobWait)))
    jobs/day     = images/day / images/job
    job hours    = instances x (start-up + images/job / (instances x throughput)) / 3600
    $/day        = jobs/day x job hours x $/h;    $/1M = $/day / images/day x 1e6
    latency      = time to fill the batch + start-up + processing + collect

Two policies (``--policy``; both by default): ``batch``, as built (one job per SQS batch, the
formula above), and ``dispatcher``, proposed in issue 13 and not built (arrival and dispatch as
two steps: a job takes what arrived over ``MaxLatencySeconds``, at least ``MinImagesPerJob``
images, sharded over up to ``--max-instances`` instances)::

    images/job   = min(images/day, max(MinImagesPerJob, rate x MaxLatencySeconds))

Around the GPU, per million images: Lambda (GB-seconds of each function at its template.yaml
memory over a stated duration per invocation and per image, plus requests) and S3 requests
(the calls per image by operation measured by ``dermscore bench``, ``--bench FILE``, priced
with ``dermscore.config.USD_PRICES``).

Every input is a flag; the defaults for ml.g4dn.xlarge are labelled assumptions (no GPU was
available where this was written): see ``INSTANCES`` and docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dermscore import sharding
from dermscore.config import S3_TIER, TRANSFORM_USD_PER_HOUR, USD_PRICES

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


# AWS calls per image by operation made by the pipeline (the user's upload excluded), as
# measured by `dermscore bench` (e2e.api_calls_per_image_by_operation): the figures of
# docs/benchmark.md ("Calls per image"); `--bench FILE` reads them from a bench JSON instead.
DEFAULT_CALLS_PER_IMAGE: dict[str, float] = {
    "PutObject": 2.15, "GetObject": 2.075, "ListObjectsV2": 0.05, "HeadObject": 0.025,
    "ReceiveMessage": 0.275, "DeleteMessageBatch": 0.125,
}
DEFAULT_CALLS_SOURCE = "docs/benchmark.md, Calls per image"


@dataclass(frozen=True)
class LambdaCost:
    """A function's memory (template.yaml) and its duration: ASSUMPTIONS (no Lambda was measured;
    the local handlers run against moto on a shared 2-core machine, which says nothing about
    Lambda's durations), per invocation and per image."""

    memory_mb: int
    s_per_invocation: float
    s_per_image: float


LAMBDA: dict[str, LambdaCost] = {
    # enqueue (Globals MemorySize 1024): parse + HeadObject, claims GET/PUT on 16 threads at
    # ~15-30 ms per S3 request: ~2 ms of wall time per image, 0.3 s per invocation.
    "enqueue": LambdaCost(1024, 0.3, 0.002),
    # collect (MemorySize 2048): one *sequential* JSON PUT per image (~20 ms), 1 s per job for
    # reading the manifest/output and writing the Parquet and the report.
    "collect": LambdaCost(2048, 1.0, 0.020),
    # the dispatcher (proposed; assumed 1024 MB, 0.5 s per scheduled run): lists pending images.
    "dispatch": LambdaCost(1024, 0.5, 0.0),
}
DISPATCH_EVERY_S = 60           # the dispatcher's schedule (EventBridge Scheduler rate), proposed
COLLECT_TIMEOUT_S = 900         # template.yaml CollectFunction Timeout
POLICIES = ("batch", "dispatcher")


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
    policy: str = "batch"
    enqueue_invocations_per_day: float = 0.0
    dispatch_invocations_per_day: float = 0.0
    collect_s_per_job: float = 0.0
    concurrent_jobs: float = 0.0


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


def dispatcher_images_per_job(images_per_day: float, min_images_per_job: int, max_latency_s: float) -> int:
    """The proposed dispatcher: a job takes what arrived over MaxLatencySeconds, at least
    MinImagesPerJob images (a floor on cost: below ``rate x MaxLatencySeconds`` it makes the
    images wait longer than MaxLatencySeconds; 1 makes the latency the bound)."""
    rate = images_per_day / DAY_S
    return int(max(1, min(images_per_day, max(float(min_images_per_job), rate * max_latency_s))))


def plan(images_per_day: int, *, usd_per_hour: float, images_per_second: float, startup_minutes: float,
         window_s: float = 300, batch_cap: int = LAMBDA_BATCH_CAP, instance_count: int | None = None,
         max_instances: int = 4, min_images_per_shard: int = 250, min_images_per_job: int = 1,
         max_job_wait_s: float = 900, collect_s: float | None = None, policy: str = "batch",
         max_latency_s: float = 3600, max_concurrent_jobs: int = 4) -> Plan:
    """``collect_s``: seconds from the job's end to its rows (default: the ``LAMBDA["collect"]``
    duration of a job of this size)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
    startup_s = startup_minutes * 60
    if policy == "batch":
        per_job = images_per_job(images_per_day, window_s, batch_cap, min_images_per_job, max_job_wait_s)
    else:
        per_job = dispatcher_images_per_job(images_per_day, min_images_per_job, max_latency_s)
    p = _plan(images_per_day, per_job, usd_per_hour, images_per_second, startup_s, instance_count, max_instances,
              min_images_per_shard, collect_s, policy, window_s, batch_cap)
    # MaxConcurrentJobs: a dispatcher that would run more jobs at once makes them larger instead.
    while policy == "dispatcher" and p.concurrent_jobs > max_concurrent_jobs and per_job < images_per_day:
        per_job = min(images_per_day, math.ceil(per_job * p.concurrent_jobs / max_concurrent_jobs) + 1)
        p = _plan(images_per_day, per_job, usd_per_hour, images_per_second, startup_s, instance_count, max_instances,
                  min_images_per_shard, collect_s, policy, window_s, batch_cap)
    return p


def _plan(images_per_day: int, per_job: int, usd_per_hour: float, images_per_second: float, startup_s: float,
          instance_count: int | None, max_instances: int, min_images_per_shard: int, collect_s: float | None,
          policy: str, window_s: float, batch_cap: int) -> Plan:
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
    c = LAMBDA["collect"]
    collect = c.s_per_invocation + per_job * c.s_per_image if collect_s is None else collect_s
    if policy == "batch":   # one enqueue invocation per job (deferrals not counted)
        enqueue_calls, dispatch_calls = jobs, 0.0
    else:                   # arrival: one invocation per SQS batch; dispatch: on a schedule
        per_batch = max(1.0, min(batch_cap, images_per_day / DAY_S * window_s, images_per_day))
        enqueue_calls, dispatch_calls = images_per_day / per_batch, DAY_S / DISPATCH_EVERY_S
    return Plan(
        images_per_day=images_per_day, images_per_job=per_job, jobs_per_day=jobs, shards_per_job=shards,
        instances_per_job=k, job_minutes=job_s / 60, startup_share=startup_s / job_s,
        instance_hours_per_day=inst_hours, busy_instances=inst_hours / 24,
        batch_fill_s=fill_s, latency_s=fill_s + job_s + collect,
        usd_per_day=usd, usd_per_million=usd / images_per_day * 1e6,
        usd_per_million_ideal=usd_per_hour / 3600 / images_per_second * 1e6,
        policy=policy, enqueue_invocations_per_day=enqueue_calls, dispatch_invocations_per_day=dispatch_calls,
        collect_s_per_job=collect, concurrent_jobs=jobs * job_s / DAY_S)


# --------------------------------------------------------------------------- around the GPU

def lambda_usd_per_day(p: Plan, functions: dict[str, LambdaCost] | None = None,
                       prices: dict[str, float] | None = None) -> float:
    """GB-seconds of enqueue, collect (and the dispatcher) at their memory, plus requests."""
    f, pr = functions or LAMBDA, prices or USD_PRICES
    invocations = {"enqueue": p.enqueue_invocations_per_day, "collect": p.jobs_per_day,
                   "dispatch": p.dispatch_invocations_per_day}
    gb_s = sum(f[name].memory_mb / 1024 * (n * f[name].s_per_invocation
                                           + (p.images_per_day * f[name].s_per_image if n else 0.0))
               for name, n in invocations.items())
    return gb_s * pr["lambda_per_gb_second"] + sum(invocations.values()) / 1e6 * pr["lambda_per_million_requests"]


def s3_usd_per_image(calls_per_image: dict[str, float], prices: dict[str, float] | None = None) -> float:
    """The S3 requests per image at their tier's price (other services' calls are not S3's)."""
    pr = prices or USD_PRICES
    return sum(n * pr[S3_TIER[op]] / 1000 for op, n in calls_per_image.items() if op in S3_TIER)


def calls_from_bench(path: Path) -> dict[str, float]:
    """``e2e.api_calls_per_image_by_operation`` of a ``dermscore bench --json`` file."""
    data = json.loads(Path(path).read_text())
    by_op = (data.get("e2e") or {}).get("api_calls_per_image_by_operation")
    if not by_op:
        raise SystemExit(f"{path}: no e2e.api_calls_per_image_by_operation (run dermscore bench with the e2e phase)")
    return {op: float(n) for op, n in by_op.items()}


def cost_row(p: Plan, calls_per_image: dict[str, float]) -> dict[str, Any]:
    """One row of ``dermscore plan --json``: the figures asked for, then the plan itself."""
    per_m = 1e6 / p.images_per_day
    lam = lambda_usd_per_day(p) * per_m
    s3 = s3_usd_per_image(calls_per_image) * 1e6
    return {"policy": p.policy, "images_per_day": p.images_per_day, "startup_share": p.startup_share,
            "gpu_usd_per_million": p.usd_per_million, "lambda_usd_per_million": lam, "s3_usd_per_million": s3,
            "total_usd_per_million": p.usd_per_million + lam + s3, **asdict(p)}


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


HEADER = ("policy", "images/day", "images/job", "jobs/day", "inst/job", "job time", "start-up share",
          "avg busy inst", "latency (max)", "GPU $/day", "GPU $/1M images", "Lambda $/1M", "S3 $/1M",
          "total $/1M")


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 0.995 or x == 0 else f"${x:.3f}"


def rows(plans: list[Plan], calls_per_image: dict[str, float] | None = None) -> list[tuple[str, ...]]:
    calls = DEFAULT_CALLS_PER_IMAGE if calls_per_image is None else calls_per_image
    out = []
    for p in plans:
        c = cost_row(p, calls)
        out.append((p.policy, _count(p.images_per_day), f"{p.images_per_job:,}", f"{p.jobs_per_day:,.0f}",
                    str(p.instances_per_job), _duration(p.job_minutes * 60), f"{p.startup_share:.0%}",
                    f"{p.busy_instances:,.1f}", _duration(p.latency_s), f"${p.usd_per_day:,.2f}",
                    _usd(p.usd_per_million), _usd(c["lambda_usd_per_million"]), _usd(c["s3_usd_per_million"]),
                    _usd(c["total_usd_per_million"])))
    return out


def markdown_table(plans: list[Plan], calls_per_image: dict[str, float] | None = None) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(plans, calls_per_image)]
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
    p.add_argument("--policy", choices=POLICIES, action="append",
                   help="batch (as built: one job per SQS batch) or dispatcher (proposed, issue 13); default both")
    p.add_argument("--max-latency", type=float, default=3600,
                   help="dispatcher: MaxLatencySeconds, how long it gathers images for one job (default 3600)")
    p.add_argument("--max-concurrent-jobs", type=int, default=4,
                   help="dispatcher: MaxConcurrentJobs; more would be needed -> larger jobs (default 4)")
    p.add_argument("--bench", type=Path, metavar="FILE",
                   help="a `dermscore bench --json` file: its calls per image by operation price the S3 requests "
                        f"(default: {DEFAULT_CALLS_SOURCE})")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (as in docs/scaling.md)")
    p.add_argument("--json", action="store_true",
                   help="print JSON instead of the table: {'inputs': ..., 'rows': [one per policy and volume]}")


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
    policies = args.policy or list(POLICIES)
    plans = [plan(n, **values, window_s=args.window, batch_cap=args.batch_cap, instance_count=args.instance_count,
                  max_instances=args.max_instances, min_images_per_shard=args.min_images_per_shard,
                  min_images_per_job=args.min_images_per_job, max_job_wait_s=args.max_job_wait, policy=policy,
                  max_latency_s=args.max_latency, max_concurrent_jobs=args.max_concurrent_jobs)
             for policy in policies for n in volumes]
    calls = calls_from_bench(args.bench) if args.bench else dict(DEFAULT_CALLS_PER_IMAGE)
    calls_source = str(args.bench) if args.bench else DEFAULT_CALLS_SOURCE
    if args.json:
        inputs = {"instance": args.instance, **values, "window_s": args.window, "batch_cap": args.batch_cap,
                  "min_images_per_job": args.min_images_per_job, "max_job_wait_s": args.max_job_wait,
                  "max_latency_s": args.max_latency, "max_concurrent_jobs": args.max_concurrent_jobs,
                  "max_instances": args.max_instances, "calls_per_image": calls, "calls_source": calls_source,
                  "prices": USD_PRICES, "lambda": {k: asdict(v) for k, v in LAMBDA.items()},
                  "dispatch_every_s": DISPATCH_EVERY_S}
        print(json.dumps({"inputs": inputs, "rows": [cost_row(p, calls) for p in plans]}, indent=2))
        return 0
    prof = INSTANCES.get(args.instance)
    print(f"{args.instance}: ${values['usd_per_hour']}/h, {values['images_per_second']:g} images/s per instance, "
          f"{values['startup_minutes']:g} min start-up per job"
          + (f"  [{prof.source}]" if prof and None in (args.usd_per_hour, args.images_per_second,
                                                       args.startup_minutes) else ""))
    print(f"batching: window {args.window:g} s, <= {args.batch_cap:,} images/job, MinImagesPerJob "
          f"{args.min_images_per_job}, MaxJobWait {args.max_job_wait:g} s; "
          f"shards >= {args.min_images_per_shard} images; dispatcher: MaxLatency {args.max_latency:g} s, "
          f"MaxConcurrentJobs {args.max_concurrent_jobs}")
    s3_calls = sum(n for op, n in calls.items() if op in S3_TIER)
    print(f"calls per image: {sum(calls.values()):.2f}, {s3_calls:.2f} of them S3 ({calls_source}); "
          "Lambda durations: assumptions (analytics/plan.py LAMBDA)")
    if args.markdown:
        print(markdown_table(plans, calls))
    else:
        table = [HEADER, *rows(plans, calls)]
        widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
        for r in table:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)))
    print(f"floor without start-up: ${plans[0].usd_per_million_ideal:,.2f} per 1M images")
    for p in plans:
        if p.collect_s_per_job > COLLECT_TIMEOUT_S:
            print(f"note: {p.policy} at {_count(p.images_per_day)}/day: collect needs "
                  f"~{_duration(p.collect_s_per_job)} per job (sequential per-image PUTs), above its "
                  f"{COLLECT_TIMEOUT_S} s Lambda timeout: large jobs need collect fanned out per shard")
    return 0


def as_dict(p: Plan) -> dict[str, Any]:
    return asdict(p)
