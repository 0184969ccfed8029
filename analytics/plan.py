"""``dermscore plan``: a capacity and cost model for SageMaker Batch Transform (docs/scaling.md).

For a daily volume at a steady arrival rate (``rate = images/day / 86,400 s``) it works out how
the pipeline makes transform jobs, how many shards and instances each job gets (the pipeline's
own sharding functions, ``dermscore.sharding``), and from the per-instance throughput, the
instance price and the job start-up time what the GPU, Lambda and S3 cost per million images.

Two policies (``--policy``; both by default):

``dispatcher``, **as built**, for a steady stream: arrival and dispatch are two steps. Enqueue writes one
pending manifest part per SQS batch; the dispatcher (``handlers/dispatch.py``, every 60 s, one
run at a time) creates a job once ``MinImagesPerJob`` images are pending **or** the oldest part
is ``MaxLatencySeconds`` old, whichever comes first (``dermscore.batching.plan_jobs``), at most
``MaxImagesPerJob`` images per job and ``MaxConcurrentJobs`` jobs running::

    images/job   = min(MaxImagesPerJob, images/day,
                       max(1, min(MinImagesPerJob, rate x (MaxLatencySeconds + 60 s))))

(the latency bound is seen by the next scheduled run: up to one 60 s interval later). If more
than ``MaxConcurrentJobs`` jobs would run at once, the pending images wait for a free slot and
the next jobs are larger (up to ``MaxImagesPerJob``). The defaults of these rows are
template.yaml's parameter defaults, read the way the deployed dispatcher reads them
(:func:`template_defaults`), so the model and the stack cannot drift; flags override them.

``drop``, the same dispatcher for a **drop** of N images (one a day: ``--drop N``), as a research
group uploads a folder: the quiet rule sends the drop as one job once no image has arrived for
``QuietSeconds``::

    images/job   = min(MaxImagesPerJob, N)
    wait         = EnqueueBatchingWindowSeconds + QuietSeconds + 60 s   (last image -> job created)

``batch``, **the old policy** (one job per SQS batch, kept for comparison): one job per SQS batch
(an enqueue invocation), so a job never holds more than ~3,000 images (Lambda's 6 MB batch)::

    images/job   = min(batch cap, max(rate x window, min(MinImagesPerJob, rate x MaxJobWait)))

Then, for either::

    shards       = shards_for(images/job, instances, MinImagesPerShard, 50,000)   (files of the job)
    instances    = the fewest whose processing is no shorter than the start-up, at most
                   TransformInstanceCount (--max-instances), never more than the shards;
                   --instance-count K: min(K, shards), as the dispatcher does
    job time     = start-up + (the busiest instance's images: ceil(shards / instances) shards,
                   i.e. the largest shard where shards = instances) / per-instance rate
    jobs/day     = images/day / images/job
    GPU $/day    = jobs/day x instances x job time / 3600 x $/h;    $/1M = $/day / images/day x 1e6
    latency      = time to fill the job (images/job / rate; for the dispatcher at most
                   MaxLatencySeconds + 60 s unless jobs wait for a slot) + job time + collect

Around the GPU, per million images: Lambda (GB-seconds of each function at its template.yaml
memory over a stated duration per invocation and per image, plus requests: ``LAMBDA``) and S3
requests (the calls per image by operation measured by ``dermscore bench``,
``DEFAULT_CALLS_PER_IMAGE`` or ``--bench FILE``, priced with ``dermscore.config.USD_PRICES``).

Every input is a flag; the defaults for ml.g4dn.xlarge are labelled assumptions (no GPU was
available where this was written): see ``INSTANCES`` and docs/scaling.md.

**CPU instance types** (``ml.m5``, ``ml.c5``, ``ml.c6i`` sizes priced in
``dermscore.config.TRANSFORM_USD_PER_HOUR``) are priced from **measurement**: the images per second
per vCPU of the serving stack that ``dermscore bench`` measured on this machine's cores
(``transform.images_per_vcpu_s``: 1,000 / the serving processes' CPU ms per image), times the
type's vCPUs (``--bench FILE``, else :data:`DEFAULT_CPU_THROUGHPUT`). ``--compare`` prints them
beside the GPU profile, one row per type and volume (dispatcher policy).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dermscore import sharding
from dermscore.config import S3_TIER, TRANSFORM_USD_PER_HOUR, TRANSFORM_VCPUS, USD_PRICES, Settings
from dermscore.options import UserError
from handlers import claims

DAY_S = 86_400
DEFAULT_VOLUMES = (10_000, 1_000_000, 100_000_000)

# Lambda hands enqueue at most 10,000 messages *and* 6 MB per invocation; one S3 event
# notification is ~2 KB as an SQS message, so ~3,000 images is the practical cap per SQS batch
# (per pending part; under the old batch policy, per job).
LAMBDA_BATCH_CAP = 3_000


@dataclass(frozen=True)
class InstanceProfile:
    usd_per_hour: float
    images_per_second: float
    startup_minutes: float
    source: str


INSTANCES: dict[str, InstanceProfile] = {
    # Price: dermscore.config.TRANSFORM_USD_PER_HOUR. Throughput: ASSUMPTION, not measured: a T4
    # runs a DenseNet-class network forward at ~1,000 images/s; end to end the 4 vCPUs
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
class CpuThroughput:
    """What one vCPU of a CPU instance scores per second: measured by ``dermscore bench`` on this
    machine's cores (one core is taken to do what one vCPU does)."""

    images_per_vcpu_s: float
    source: str


# MEASURED: `dermscore bench --count 1000` on 2026-12-03 (main at 8a4777b), 2-core Intel Xeon VM,
# through TorchServe, heatmaps off: the serving processes used 29.7 ms of CPU per image (S3 GET,
# decode, forward, HTTP; the forward alone ~27.5 ms, decode 4.3 ms). That run scored with PyTorch
# eager, before ONNX Runtime: replace it with a current run (`--bench FILE`, docs/benchmark.md).
DEFAULT_CPU_THROUGHPUT = CpuThroughput(
    1000 / 19.46, "measured: dermscore bench 2026-12-03 on this project's 2-core machine (serving CPU 19.5 ms "
                  "per image, ONNX Runtime, heatmaps off; median of three runs, docs/benchmark/cpu-1000-run*.json), "
                  "x the type's vCPUs")
CPU_STARTUP_MINUTES = 6.0   # ASSUMPTION, as for the GPU profile (provisioning + image pull + model load)
# The instance types `--compare` prints: the GPU profile and the CPU types a new account can start with.
COMPARED = ("ml.g4dn.xlarge", "ml.m5.large", "ml.c5.xlarge", "ml.c6i.xlarge", "ml.c5.2xlarge")


# AWS calls per image by operation made by the pipeline (the user's upload excluded), as measured by
# `dermscore bench` (e2e.api_calls_per_image_by_operation); `--bench FILE` reads them from a bench
# JSON instead. SQS calls are counted but not priced (only S3's operations are, dermscore.config.S3_TIER).
DEFAULT_CALLS_PER_IMAGE: dict[str, float] = {
    "PutObject": 1.12, "GetObject": 1.07, "ListObjectsV2": 0.08, "HeadObject": 0.013,   # S3
    "ReceiveMessage": 0.17, "DeleteMessageBatch": 0.11,                                 # SQS
}
DEFAULT_CALLS_SOURCE = ("dermscore bench --phases e2e --images 400 --heatmaps off, in-process, with the dispatcher "
                        "(docs/benchmark.md)")


@dataclass(frozen=True)
class LambdaCost:
    """A function's memory (template.yaml) and its duration: ASSUMPTIONS (no Lambda was measured;
    the local handlers run against moto on a shared 2-core machine, which says nothing about
    Lambda's durations), per invocation and per image."""

    memory_mb: int
    s_per_invocation: float
    s_per_image: float


PUT_S = 0.020   # one S3 PUT from Lambda, ASSUMPTION (~15-30 ms)

LAMBDA: dict[str, LambdaCost] = {
    # enqueue (Globals MemorySize 1024), one invocation per SQS batch: parses the events (~0.05 ms
    # per image, no request per image), then 1 PUT (the pending part) + 1 LIST (the pending
    # volume) at ~20-50 ms each, plus the handler's own overhead: 0.2 s per invocation.
    "enqueue": LambdaCost(1024, 0.2, 0.000_05),
    # collect (MemorySize 2048), one invocation per job: 1 s for the job (its marker, the Parquet
    # files, the report), plus one conditional PUT of each image's JSON document (~20 ms), WORKERS
    # in parallel (handlers/claims.py): 20 ms / WORKERS per image, assuming the PUTs stay I/O-bound.
    "collect": LambdaCost(2048, 1.0, PUT_S / claims.WORKERS),
    # the dispatcher (Globals MemorySize 1024), every 60 s and when enqueue wakes it: 0.5 s per run
    # (LIST pending/, ListTransformJobs, the intent) + ~2 us per image (streaming parts into shards).
    "dispatch": LambdaCost(1024, 0.5, 0.000_002),
}
POLICIES = ("dispatcher", "drop", "batch")
DEFAULT_DROPS = (2_000,)


# --------------------------------------------------------------------------- the template's defaults

@dataclass(frozen=True)
class TemplateDefaults:
    """What the deployed stack runs with when no parameter is overridden: template.yaml's defaults,
    read as the DispatchFunction reads them (its environment -> ``Settings``), plus the enqueue
    event source, the dispatcher's schedule and collect's timeout."""

    instance_type: str          # TransformInstanceType
    instance_count: int         # TransformInstanceCount: most instances per job
    min_images_per_shard: int   # MinImagesPerShard
    max_images_per_shard: int   # Settings.max_images_per_shard (lines per manifest file)
    min_images_per_job: int     # MinImagesPerJob
    max_latency_s: int          # MaxLatencySeconds
    quiet_s: int                # QuietSeconds
    max_images_per_job: int     # MaxImagesPerJob
    max_concurrent_jobs: int    # MaxConcurrentJobs
    batch_size: int             # EnqueueBatchSize: SQS messages per enqueue invocation
    batching_window_s: int      # EnqueueBatchingWindowSeconds
    dispatch_every_s: int       # DispatchFunction's schedule, rate(1 minute)
    collect_timeout_s: int      # CollectFunction Timeout


@functools.lru_cache(maxsize=4)
def template_defaults(path: str | Path | None = None) -> TemplateDefaults:
    """:class:`TemplateDefaults` of ``template.yaml`` (``dermscore.template.local_spec``)."""
    from dermscore.template import TEMPLATE_PATH, local_spec

    spec = local_spec("plan", path=path or TEMPLATE_PATH)
    s = Settings.from_env(spec.dispatch_env)
    return TemplateDefaults(
        instance_type=s.instance_type, instance_count=s.instance_count,
        min_images_per_shard=s.min_images_per_shard, max_images_per_shard=s.max_images_per_shard,
        min_images_per_job=s.min_images_per_job, max_latency_s=s.max_latency_s, quiet_s=s.quiet_s,
        max_images_per_job=s.max_images_per_job, max_concurrent_jobs=s.max_concurrent_jobs,
        batch_size=spec.batch_size, batching_window_s=spec.batching_window_s,
        dispatch_every_s=spec.dispatch_interval_s, collect_timeout_s=spec.collect_timeout_s)


# --------------------------------------------------------------------------- the model

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
    batch_fill_s: float              # time to fill one job (the wait before it is created)
    latency_s: float                 # worst case: fill + job + collect
    usd_per_day: float
    usd_per_million: float           # GPU only
    usd_per_million_ideal: float     # GPU without any start-up
    policy: str = "dispatcher"
    enqueue_invocations_per_day: float = 0.0
    dispatch_invocations_per_day: float = 0.0
    collect_s_per_job: float = 0.0
    concurrent_jobs: float = 0.0     # jobs running at once on average
    max_concurrent_jobs: int = 0     # the dispatcher's bound (0: none, the batch policy)
    over_capacity: bool = False      # even MaxImagesPerJob jobs need more than MaxConcurrentJobs slots
    collect_timeout_s: int = 900


def images_per_job(images_per_day: float, window_s: float, cap: int, min_images_per_job: int = 1,
                   max_job_wait_s: float = 0) -> int:
    """The old batch policy: how many images one job (one SQS batch) gets on average."""
    rate = images_per_day / DAY_S
    by_window = rate * window_s
    by_policy = min(float(min_images_per_job), rate * max(max_job_wait_s, window_s))
    return int(max(1, min(cap, max(by_window, by_policy), images_per_day)))


def dispatcher_images_per_job(images_per_day: float, min_images_per_job: int, max_latency_s: float,
                              max_images_per_job: int, dispatch_every_s: float = 60) -> int:
    """The dispatcher as built (``dermscore.batching.plan_jobs``): a job goes when
    ``min_images_per_job`` images are pending or the oldest has waited ``max_latency_s`` (seen by
    the next run, up to ``dispatch_every_s`` later), whichever comes first, at most
    ``max_images_per_job`` images::

        min(MaxImagesPerJob, images/day, max(1, min(MinImagesPerJob, rate x (MaxLatency + 60 s))))
    """
    rate = images_per_day / DAY_S
    by_time = rate * (max_latency_s + dispatch_every_s)
    return int(min(max_images_per_job, images_per_day, max(1.0, min(float(min_images_per_job), by_time))))


def best_instance_count(images: int, images_per_second: float, startup_s: float, max_instances: int,
                        min_images_per_shard: int, max_images_per_shard: int = 0) -> int:
    """Fewest instances whose processing time is no longer than the start-up: beyond that,
    more instances cut latency little and add a start-up each; never more than the shards."""
    shards = sharding.shards_for(images, max_instances, min_images_per_shard, max_images_per_shard)
    wanted = math.ceil(images / (images_per_second * max(startup_s, 1.0)))
    return sharding.instances_for(shards, max(1, min(wanted, max_instances)))


def busiest_instance_images(images: int, shards: int, instances: int) -> int:
    """Images of the instance with the most work: Batch Transform hands whole files to instances,
    so with more shards than instances one gets ``ceil(shards / instances)`` of them (the largest
    first); with one shard per instance, the largest shard."""
    sizes = sharding.shard_sizes(images, shards)
    return sum(sizes[:math.ceil(shards / max(1, instances))])


def plan(images_per_day: int, *, usd_per_hour: float, images_per_second: float, startup_minutes: float,
         policy: str = "dispatcher", defaults: TemplateDefaults | None = None,
         instance_count: int | None = None, max_instances: int | None = None,
         min_images_per_shard: int | None = None, max_images_per_shard: int | None = None,
         min_images_per_job: int | None = None, max_latency_s: float | None = None,
         max_images_per_job: int | None = None, max_concurrent_jobs: int | None = None,
         window_s: float | None = None, batch_cap: int = LAMBDA_BATCH_CAP,
         batch_min_images_per_job: int = 1, max_job_wait_s: float = 900, batch_window_s: float = 300,
         collect_s: float | None = None, quiet_s: float | None = None) -> Plan:
    """One row of the model. Every ``None`` takes template.yaml's default (``defaults``, else
    :func:`template_defaults`): ``max_instances`` is ``TransformInstanceCount``; ``instance_count``
    fixes the instances per job (``min(K, shards)``, as the dispatcher does) instead of choosing
    the fewest that keep processing >= start-up. ``min_images_per_job``, ``max_latency_s``,
    ``max_images_per_job`` and ``max_concurrent_jobs`` are the dispatcher's; ``batch_cap``,
    ``batch_min_images_per_job`` and ``max_job_wait_s`` the old batch policy's (its defaults as
    before the dispatcher). ``collect_s``: seconds from the job's end to its rows (default: the
    ``LAMBDA["collect"]`` duration of a job of this size). For ``policy="drop"``,
    ``images_per_day`` is the size of one drop a day and ``quiet_s`` the quiet rule's
    ``QuietSeconds``."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
    d = defaults or template_defaults()
    cfg = dict(
        max_instances=d.instance_count if max_instances is None else max_instances,
        min_images_per_shard=d.min_images_per_shard if min_images_per_shard is None else min_images_per_shard,
        max_images_per_shard=d.max_images_per_shard if max_images_per_shard is None else max_images_per_shard)
    window = d.batching_window_s if window_s is None else window_s
    startup_s = startup_minutes * 60
    rate = images_per_day / DAY_S

    def one(per_job: int, fill_s: float) -> Plan:
        return _plan(images_per_day, per_job, fill_s, usd_per_hour, images_per_second, startup_s, instance_count,
                     collect_s=collect_s, policy=policy, window_s=window, batch_size=d.batch_size,
                     batch_cap=batch_cap, dispatch_every_s=d.dispatch_every_s,
                     collect_timeout_s=d.collect_timeout_s, **cfg)

    if policy == "batch":   # with its own SQS window (its jobs were its batches)
        window = batch_window_s
        per_job = images_per_job(images_per_day, window, batch_cap, batch_min_images_per_job, max_job_wait_s)
        return one(per_job, per_job / rate)
    min_job = d.min_images_per_job if min_images_per_job is None else min_images_per_job
    latency = d.max_latency_s if max_latency_s is None else max_latency_s
    max_job = d.max_images_per_job if max_images_per_job is None else max_images_per_job
    if policy == "drop":   # the quiet rule: the last image's part, QuietSeconds, the next scheduled run
        quiet = d.quiet_s if quiet_s is None else quiet_s
        return one(min(images_per_day, max_job), window + quiet + d.dispatch_every_s)
    slots = d.max_concurrent_jobs if max_concurrent_jobs is None else max_concurrent_jobs
    per_job = dispatcher_images_per_job(images_per_day, min_job, latency, max_job, d.dispatch_every_s)
    bound = latency + d.dispatch_every_s
    p = one(per_job, min(per_job / rate, bound))
    # MaxConcurrentJobs: more jobs at once than allowed -> images wait for a slot, the next jobs are larger.
    while p.concurrent_jobs > slots and per_job < min(images_per_day, max_job):
        per_job = min(images_per_day, max_job, math.ceil(per_job * p.concurrent_jobs / slots) + 1)
        p = one(per_job, per_job / rate)
    return replace(p, max_concurrent_jobs=slots, over_capacity=p.concurrent_jobs > slots)


def _plan(images_per_day: int, per_job: int, fill_s: float, usd_per_hour: float, images_per_second: float,
          startup_s: float, instance_count: int | None, *, max_instances: int, min_images_per_shard: int,
          max_images_per_shard: int, collect_s: float | None, policy: str, window_s: float, batch_size: int,
          batch_cap: int, dispatch_every_s: float, collect_timeout_s: int) -> Plan:
    if instance_count is None:
        k = best_instance_count(per_job, images_per_second, startup_s, max_instances, min_images_per_shard,
                                max_images_per_shard)
    else:
        k = sharding.instances_for(sharding.shards_for(per_job, instance_count, min_images_per_shard,
                                                       max_images_per_shard), instance_count)
    shards = sharding.shards_for(per_job, k, min_images_per_shard, max_images_per_shard)
    processing_s = busiest_instance_images(per_job, shards, k) / images_per_second
    job_s = startup_s + processing_s
    jobs = images_per_day / per_job
    inst_hours = jobs * k * job_s / 3600
    usd = inst_hours * usd_per_hour
    c = LAMBDA["collect"]
    collect = c.s_per_invocation + per_job * c.s_per_image if collect_s is None else collect_s
    if policy == "batch":   # one enqueue invocation per job (deferrals not counted), no dispatcher
        enqueue_calls, dispatch_calls = jobs, 0.0
    else:                   # arrival: one invocation per SQS batch; dispatch: the schedule + a wake-up per job
        per_batch = max(1.0, min(batch_size, batch_cap, images_per_day / DAY_S * window_s, images_per_day))
        enqueue_calls, dispatch_calls = images_per_day / per_batch, DAY_S / dispatch_every_s + jobs
    return Plan(
        images_per_day=images_per_day, images_per_job=per_job, jobs_per_day=jobs, shards_per_job=shards,
        instances_per_job=k, job_minutes=job_s / 60, startup_share=startup_s / job_s,
        instance_hours_per_day=inst_hours, busy_instances=inst_hours / 24,
        batch_fill_s=fill_s, latency_s=fill_s + job_s + collect,
        usd_per_day=usd, usd_per_million=usd / images_per_day * 1e6,
        usd_per_million_ideal=usd_per_hour / 3600 / images_per_second * 1e6,
        policy=policy, enqueue_invocations_per_day=enqueue_calls, dispatch_invocations_per_day=dispatch_calls,
        collect_s_per_job=collect, concurrent_jobs=jobs * job_s / DAY_S, collect_timeout_s=collect_timeout_s)


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
        raise UserError(f"{path} has no e2e.api_calls_per_image_by_operation: pass --bench a file of "
                        "`dermscore bench --out FILE` with the e2e phase")
    return {op: float(n) for op, n in by_op.items()}


def cpu_throughput_from_bench(path: Path) -> CpuThroughput | None:
    """``transform.images_per_vcpu_s`` of a ``dermscore bench --out`` file (None if it has none)."""
    data = json.loads(Path(path).read_text())
    per_vcpu = (data.get("figures") or {}).get("transform.images_per_vcpu_s")
    if not per_vcpu:
        return None
    e2e = data.get("e2e") or {}
    return CpuThroughput(float(per_vcpu), f"measured: {path} ({(data.get('machine') or {}).get('device', '?')}, "
                                          f"heatmaps {e2e.get('heatmaps', '?')}), x the type's vCPUs")


@functools.lru_cache(maxsize=1)
def instance_devices() -> dict[str, str]:
    """template.yaml's TransformInstances mapping: instance type -> ``cpu`` or ``gpu``."""
    from dermscore.template import load_template

    return {k: v["Device"] for k, v in load_template()["Mappings"]["TransformInstances"].items()}


def cpu_profile(instance: str, throughput: CpuThroughput = DEFAULT_CPU_THROUGHPUT) -> InstanceProfile | None:
    """A CPU type's profile: its price, ``throughput`` x its vCPUs, the assumed start-up; None for a
    type that is not a priced CPU type."""
    if instance_devices().get(instance) != "cpu" or instance not in TRANSFORM_USD_PER_HOUR \
            or instance not in TRANSFORM_VCPUS:
        return None
    vcpus = TRANSFORM_VCPUS[instance]
    return InstanceProfile(TRANSFORM_USD_PER_HOUR[instance], throughput.images_per_vcpu_s * vcpus,
                           CPU_STARTUP_MINUTES, f"price: dermscore.config (2026-12-03); rate: "
                           f"{throughput.images_per_vcpu_s:.1f} images/s per vCPU x {vcpus} vCPUs, "
                           f"{throughput.source}; start-up: assumption")


def profile(instance: str, throughput: CpuThroughput = DEFAULT_CPU_THROUGHPUT) -> InstanceProfile | None:
    """The built-in profile of ``instance``: the assumed GPU one, or a measured CPU one."""
    return INSTANCES.get(instance) or cpu_profile(instance, throughput)


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
        jobs = f"{p.jobs_per_day:,.1f}" if p.jobs_per_day < 100 else f"{p.jobs_per_day:,.0f}"
        busy = f"{p.busy_instances:,.1f}" if p.busy_instances >= 0.095 else f"{p.busy_instances:.2f}"
        out.append((p.policy, _count(p.images_per_day), f"{p.images_per_job:,}", jobs, str(p.instances_per_job),
                    _duration(p.job_minutes * 60), f"{p.startup_share:.0%}", busy, _duration(p.latency_s),
                    f"${p.usd_per_day:,.2f}", _usd(p.usd_per_million), _usd(c["lambda_usd_per_million"]),
                    _usd(c["s3_usd_per_million"]), _usd(c["total_usd_per_million"])))
    return out


def markdown_table(plans: list[Plan], calls_per_image: dict[str, float] | None = None) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(plans, calls_per_image)]
    return "\n".join(lines)


def notes(plans: list[Plan], max_images_per_shard: int = 50_000) -> list[str]:
    """Where the pipeline as built would not keep up: collect past its timeout, too few job slots."""
    out = []
    c = LAMBDA["collect"]
    for p in plans:
        where = f"{p.policy} at {_count(p.images_per_day)}/day"
        if p.collect_s_per_job > p.collect_timeout_s:
            fits = int((p.collect_timeout_s - c.s_per_invocation) / c.s_per_image)
            per_file = c.s_per_invocation + min(max_images_per_shard, p.images_per_job) * c.s_per_image
            out.append(f"note: {where}: collect of a {p.images_per_job:,}-image job ({p.shards_per_job} files, "
                       f"read one at a time, ~{_duration(per_file)} each) needs ~{_duration(p.collect_s_per_job)} "
                       f"in one invocation (one PUT per image, {claims.WORKERS} in parallel), above its "
                       f"{p.collect_timeout_s} s Lambda timeout: only jobs of up to ~{fits:,} images fit "
                       "(MaxImagesPerJob), else collect must be invoked per file")
        if p.over_capacity:
            out.append(f"note: {where}: {p.concurrent_jobs:.1f} jobs would run at once, above MaxConcurrentJobs "
                       f"{p.max_concurrent_jobs}, even at {p.images_per_job:,} images/job: the backlog grows "
                       "(raise MaxConcurrentJobs, TransformInstanceCount or MaxImagesPerJob)")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images-per-day", type=int, action="append", metavar="N",
                   help="daily volume (repeatable; default: 10k, 1M and 100M)")
    p.add_argument("--instance",
                   help=f"transform instance type (default: template.yaml's TransformInstanceType; built-in "
                        f"profiles: {', '.join(INSTANCES)}; others need --usd-per-hour, --images-per-second "
                        "and --startup-minutes)")
    p.add_argument("--images-per-second", type=float, help="sustained end-to-end rate of ONE instance")
    p.add_argument("--usd-per-hour", type=float, help="instance price for transform jobs")
    p.add_argument("--startup-minutes", type=float, help="billed start-up per job and instance")
    p.add_argument("--policy", choices=POLICIES, action="append",
                   help="dispatcher (a steady stream of --images-per-day), drop (one drop of --drop images a day: "
                        "the quiet rule) or batch (the old policy: one job per SQS batch); default all three")
    p.add_argument("--drop", type=int, action="append", metavar="N",
                   help=f"images in one drop, for the drop rows (repeatable; default {DEFAULT_DROPS[0]:,})")
    p.add_argument("--instance-count", type=int,
                   help="fixed instances per job, min(K, shards), as the dispatcher does with TransformInstanceCount "
                        "(default: the fewest that keep processing >= start-up, up to --max-instances)")
    p.add_argument("--max-instances", type=int,
                   help="most instances per job (default: template.yaml's TransformInstanceCount)")
    p.add_argument("--min-images-per-shard", type=int, help="MinImagesPerShard (default: template.yaml's)")
    g = p.add_argument_group("dispatcher (defaults: template.yaml's parameter defaults)")
    g.add_argument("--min-images-per-job", type=int, help="MinImagesPerJob: a job once this many images are pending")
    g.add_argument("--max-latency", type=float, help="MaxLatencySeconds: ... or once the oldest waited this long")
    g.add_argument("--quiet-seconds", type=float,
                   help="QuietSeconds: ... or once no image arrived for this long (drops)")
    g.add_argument("--max-images-per-job", type=int, help="MaxImagesPerJob")
    g.add_argument("--max-concurrent-jobs", type=int,
                   help="MaxConcurrentJobs; more would be needed -> images wait, jobs get larger")
    g.add_argument("--window", type=float,
                   help="EnqueueBatchingWindowSeconds (SQS batching window, s): images per pending part")
    b = p.add_argument_group("batch (the old policy: one job per SQS batch)")
    b.add_argument("--batch-cap", type=int, default=LAMBDA_BATCH_CAP,
                   help="most images per SQS batch, i.e. per job (Lambda: 10,000 messages / 6 MB)")
    b.add_argument("--batch-min-images-per-job", type=int, default=1,
                   help="the old deferral minimum within one SQS batch (default 1: none)")
    b.add_argument("--max-job-wait", type=float, default=900, help="the old MaxJobWaitSeconds (default 900)")
    b.add_argument("--batch-window", type=float, default=300,
                   help="the old policy's SQS batching window, s (default 300: its jobs were its batches)")
    p.add_argument("--bench", type=Path, metavar="FILE",
                   help="a `dermscore bench --json` file: its calls per image by operation price the S3 requests "
                        f"(default: {DEFAULT_CALLS_SOURCE}), its transform.images_per_vcpu_s the CPU types")
    p.add_argument("--compare", action="store_true",
                   help=f"compare instance types ({', '.join(COMPARED)}) at each volume, dispatcher policy: the "
                        "GPU profile (assumed) beside CPU types priced from the measured rate per vCPU")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (as in docs/scaling.md)")
    p.add_argument("--json", action="store_true",
                   help="print JSON instead of the table: {'inputs': ..., 'rows': [one per policy and volume]}")


def throughput_in_use(args: argparse.Namespace) -> CpuThroughput:
    """The bench file's rate per vCPU when it has one, else :data:`DEFAULT_CPU_THROUGHPUT`."""
    return (cpu_throughput_from_bench(args.bench) if getattr(args, "bench", None) else None) \
        or DEFAULT_CPU_THROUGHPUT


def resolve(args: argparse.Namespace, defaults: TemplateDefaults) -> dict[str, Any]:
    instance = args.instance or defaults.instance_type
    prof = profile(instance, throughput_in_use(args))
    values = {"usd_per_hour": args.usd_per_hour, "images_per_second": args.images_per_second,
              "startup_minutes": args.startup_minutes}
    missing = [k for k, v in values.items() if v is None and prof is None]
    if missing:
        options = ", ".join(f"--{m.replace('_', '-')}" for m in missing)
        raise UserError(f"no built-in profile for {instance}: give {options}")
    for k in values:
        if values[k] is None:
            values[k] = getattr(prof, k)
    return values


def settings_in_use(args: argparse.Namespace, d: TemplateDefaults) -> dict[str, Any]:
    """The dispatcher's settings of this run: the flags, else template.yaml's defaults."""
    def pick(flag: Any, default: Any) -> Any:
        return default if flag is None else flag

    return {"max_instances": pick(args.max_instances, d.instance_count), "instance_count": args.instance_count,
            "min_images_per_shard": pick(args.min_images_per_shard, d.min_images_per_shard),
            "max_images_per_shard": d.max_images_per_shard,
            "min_images_per_job": pick(args.min_images_per_job, d.min_images_per_job),
            "max_latency_s": pick(args.max_latency, d.max_latency_s),
            "quiet_s": pick(args.quiet_seconds, d.quiet_s),
            "max_images_per_job": pick(args.max_images_per_job, d.max_images_per_job),
            "max_concurrent_jobs": pick(args.max_concurrent_jobs, d.max_concurrent_jobs),
            "window_s": pick(args.window, d.batching_window_s)}


COMPARE_HEADER = ("instance", "device", "images/s per instance", "rate", "$/h", "images/day", "inst/job", "job time",
                  "start-up share", "latency (max)", "instance $/1M images", "total $/1M", "keeps up")


def comparison(volumes: list[int], d: TemplateDefaults, cfg: dict[str, Any], calls: dict[str, float],
               throughput: CpuThroughput, instances: tuple[str, ...] = COMPARED) -> list[dict[str, Any]]:
    """One dispatcher row per instance type and volume: the GPU profile and the CPU types."""
    out = []
    for instance in instances:
        prof = profile(instance, throughput)
        if prof is None:
            raise UserError(f"no built-in profile for {instance}")
        device = instance_devices().get(instance, "?")
        for n in volumes:
            p = plan(n, usd_per_hour=prof.usd_per_hour, images_per_second=prof.images_per_second,
                     startup_minutes=prof.startup_minutes, policy="dispatcher", defaults=d, **cfg)
            out.append({"instance": instance, "device": device, "rate_is": "measured" if device == "cpu" else "assumed",
                        "images_per_second": prof.images_per_second, "usd_per_hour": prof.usd_per_hour,
                        "source": prof.source, **cost_row(p, calls)})
    return out


def comparison_markdown(rows_: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COMPARE_HEADER) + " |", "|" + "---|" * len(COMPARE_HEADER)]
    for r in rows_:
        lines.append("| " + " | ".join((
            r["instance"], r["device"], f"{r['images_per_second']:,.0f}", r["rate_is"], f"${r['usd_per_hour']:.3f}",
            _count(r["images_per_day"]), str(r["instances_per_job"]), _duration(r["job_minutes"] * 60),
            f"{r['startup_share']:.0%}", _duration(r["latency_s"]), _usd(r["gpu_usd_per_million"]),
            _usd(r["total_usd_per_million"]), "no" if r["over_capacity"] else "yes")) + " |")
    return "\n".join(lines)


def run_comparison(args: argparse.Namespace, d: TemplateDefaults, cfg: dict[str, Any],
                   calls: dict[str, float], volumes: list[int]) -> int:
    throughput = throughput_in_use(args)
    table = comparison(volumes, d, cfg, calls, throughput)
    if args.json:
        print(json.dumps({"inputs": {"throughput": asdict(throughput), "startup_minutes_cpu": CPU_STARTUP_MINUTES,
                                     "template_defaults": asdict(d), **cfg}, "rows": table}, indent=2))
        return 0
    gpu = INSTANCES["ml.g4dn.xlarge"].source
    print(f"instance types, dispatcher policy (template.yaml's defaults): GPU profile {gpu}; "
          f"CPU types: {throughput.images_per_vcpu_s:.1f} images/s per vCPU, {throughput.source}; "
          f"{CPU_STARTUP_MINUTES:g} min start-up (assumption); prices: dermscore.config.TRANSFORM_USD_PER_HOUR")
    print(comparison_markdown(table))
    return 0


def run(args: argparse.Namespace) -> int:
    d = template_defaults()
    values = resolve(args, d)
    instance = args.instance or d.instance_type
    cfg = settings_in_use(args, d)
    volumes = args.images_per_day or list(DEFAULT_VOLUMES)
    policies = args.policy or list(POLICIES)
    drops = args.drop or list(DEFAULT_DROPS)
    plans = [plan(n, **values, policy=policy, defaults=d, **cfg, batch_cap=args.batch_cap,
                  batch_min_images_per_job=args.batch_min_images_per_job, max_job_wait_s=args.max_job_wait,
                  batch_window_s=args.batch_window)
             for policy in policies for n in (drops if policy == "drop" else volumes)]
    calls = calls_from_bench(args.bench) if args.bench else dict(DEFAULT_CALLS_PER_IMAGE)
    calls_source = str(args.bench) if args.bench else DEFAULT_CALLS_SOURCE
    if args.compare:
        return run_comparison(args, d, cfg, calls, volumes)
    if args.json:
        inputs = {"instance": instance, **values, **cfg, "batch_cap": args.batch_cap,
                  "batch_min_images_per_job": args.batch_min_images_per_job, "max_job_wait_s": args.max_job_wait,
                  "template_defaults": asdict(d), "calls_per_image": calls, "calls_source": calls_source,
                  "prices": USD_PRICES, "lambda": {k: asdict(v) for k, v in LAMBDA.items()},
                  "dispatch_every_s": d.dispatch_every_s}
        print(json.dumps({"inputs": inputs, "rows": [cost_row(p, calls) for p in plans]}, indent=2))
        return 0
    prof = profile(instance, throughput_in_use(args))
    print(f"{instance}: ${values['usd_per_hour']}/h, {values['images_per_second']:g} images/s per instance, "
          f"{values['startup_minutes']:g} min start-up per job"
          + (f"  [{prof.source}]" if prof and None in (args.usd_per_hour, args.images_per_second,
                                                       args.startup_minutes) else ""))
    inst = (f"{cfg['instance_count']} instances/job" if cfg["instance_count"] is not None
            else f"instances/job <= {cfg['max_instances']}")
    if "dispatcher" in policies:
        print(f"dispatcher (as built; defaults: template.yaml): MinImagesPerJob {cfg['min_images_per_job']:,}, "
              f"MaxLatencySeconds {cfg['max_latency_s']:g} (+ {d.dispatch_every_s} s schedule), MaxImagesPerJob "
              f"{cfg['max_images_per_job']:,}, MaxConcurrentJobs {cfg['max_concurrent_jobs']}; {inst}, shards of "
              f">= {cfg['min_images_per_shard']} and <= {cfg['max_images_per_shard']:,} images; "
              f"SQS window {cfg['window_s']:g} s")
    if "drop" in policies:
        print(f"drop (one drop of N images a day, images/day = N): a job once no image arrived for QuietSeconds "
              f"{cfg['quiet_s']:g} (+ SQS window {cfg['window_s']:g} s + {d.dispatch_every_s} s schedule)")
    if "batch" in policies:
        print(f"batch (the old policy, one job per SQS batch): window {args.batch_window:g} s, <= {args.batch_cap:,} "
              f"images/job, MinImagesPerJob {args.batch_min_images_per_job}, MaxJobWait {args.max_job_wait:g} s")
    s3_calls = sum(n for op, n in calls.items() if op in S3_TIER)
    print(f"calls per image: {sum(calls.values()):.3g}, {s3_calls:.3g} of them S3 ({calls_source}); "
          "Lambda durations: assumptions (analytics/plan.py LAMBDA)")
    if args.markdown:
        print(markdown_table(plans, calls))
    else:
        table = [HEADER, *rows(plans, calls)]
        widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
        for r in table:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)))
    print(f"floor without start-up: ${plans[0].usd_per_million_ideal:,.2f} per 1M images")
    for line in notes(plans, cfg["max_images_per_shard"]):
        print(line)
    return 0


def as_dict(p: Plan) -> dict[str, Any]:
    return asdict(p)
