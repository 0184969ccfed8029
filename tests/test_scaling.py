"""Scale-out (issues 8, 13): manifest shards, InstanceCount, parallel local "instances", throttled
CreateTransformJob, the dispatch policy and the capacity model.

The sharded end-to-end test scores ``DERMSCORE_SCALE_IMAGES`` images (default 200 in CI;
``DERMSCORE_SCALE_IMAGES=1000`` for the issue's full size) with a tiny random model once with
``InstanceCount=4`` and once with ``InstanceCount=1`` and compares the rows.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError
from conftest import preserved_environ, random_model, sample_images, unique_name

from dermscore import batching, layout, sharding
from dermscore.config import Settings

SCALE_IMAGES = int(os.environ.get("DERMSCORE_SCALE_IMAGES", "200"))
JOB_COLUMNS = {"job_name", "scored_at", "processing_ms", "bucket"}   # differ between the two runs (job, stack)


# --------------------------------------------------------------------------- shard sizing (pure)

@pytest.mark.parametrize(("images", "instances", "min_per_shard", "shards"), [
    (0, 4, 1, 0),
    (1, 4, 1, 1),
    (3, 4, 1, 3),            # never an empty shard
    (1000, 4, 250, 4),
    (999, 4, 250, 3),        # 4 shards would be < 250 images each
    (249, 4, 250, 1),        # below the minimum: still one shard, never zero
    (10_000, 4, 250, 4),     # one shard per instance
    (10_000, 100, 250, 40),
    (1000, 1, 1, 1),
    (5, 0, 1, 1),            # a nonsensical count is treated as 1
])
def test_shard_count(images: int, instances: int, min_per_shard: int, shards: int) -> None:
    assert sharding.shard_count(images, instances, min_per_shard) == shards
    if shards:
        assert sharding.instances_for(shards, instances) <= shards          # no idle instance
        assert all(s >= min(min_per_shard, images) for s in sharding.shard_sizes(images, shards))


@pytest.mark.parametrize(("images", "shards"), [(10, 3), (1000, 4), (7, 7), (1, 1), (10_001, 40)])
def test_shard_sizes_are_balanced_and_complete(images: int, shards: int) -> None:
    sizes = sharding.shard_sizes(images, shards)
    assert len(sizes) == shards and all(sizes) and sum(sizes) == images     # every line in one shard
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_instances_never_exceed_shards_or_configuration() -> None:
    assert sharding.instances_for(2, 4) == 2
    assert sharding.instances_for(4, 4) == 4
    assert sharding.instances_for(40, 4) == 4
    assert sharding.instances_for(1, 0) == 1


def test_shard_keys_live_under_one_job_prefix() -> None:
    keys = [layout.shard_key("dermscore-abc", i, 4) for i in range(4)]
    prefix = layout.job_input_prefix("dermscore-abc", 4)
    assert prefix.startswith(layout.MANIFESTS) and prefix.endswith("/")
    assert all(k.startswith(prefix) and k.endswith(".jsonl") for k in keys)
    assert len({k.rsplit("/", 1)[1] for k in keys}) == 4                    # distinct <name>.out outputs
    assert keys == sorted(keys)
    # a different shard count never shares the folder (no stale shards after a settings change)
    assert not layout.job_input_prefix("dermscore-abc", 2).startswith(prefix)


def test_files_are_assigned_whole_to_instances() -> None:
    from infra.runner import assign_files

    keys = [f"k{i}" for i in range(6)]
    groups = assign_files(keys, 4)
    assert len(groups) == 4 and sorted(k for g in groups for k in g) == keys
    assert assign_files(keys[:2], 4) == [["k0"], ["k1"]]


def test_shards_stay_bounded_in_size_whatever_the_job() -> None:
    assert sharding.shards_for(1_000_000, 4, 250, 50_000) == 20            # 20 files of 50,000 lines
    assert sharding.shards_for(1_000, 4, 250, 50_000) == 4
    assert sharding.shards_for(100, 4, 250, 0) == 1
    assert max(sharding.shard_sizes(1_000_001, sharding.shards_for(1_000_001, 4, 250, 50_000))) <= 50_000


def test_transform_request_uses_settings_and_one_instance_per_shard() -> None:
    from handlers.dispatch import transform_request

    s = Settings(bucket="bk", model_name="m", instance_type="ml.c5.xlarge", max_payload_mb=3,
                 max_concurrent_transforms=4, invocations_timeout_s=600, instance_count=8)
    req = transform_request(s, "dermscore-abc", "s3://bk/manifests/dermscore-abc/3-shards/", 3)
    assert req["TransformResources"] == {"InstanceType": "ml.c5.xlarge", "InstanceCount": 3}
    assert req["MaxPayloadInMB"] == 3 and req["MaxConcurrentTransforms"] == 4 and req["ModelName"] == "m"
    assert req["ModelClientConfig"] == {"InvocationsTimeoutInSeconds": 600}
    assert req["TransformOutput"]["S3OutputPath"] == "s3://bk/transform-output/dermscore-abc/"
    assert req["TransformInput"]["DataSource"]["S3DataSource"] == {
        "S3DataType": "S3Prefix", "S3Uri": "s3://bk/manifests/dermscore-abc/3-shards/"}


# --------------------------------------------------------------------------- throttling, batching (pure)

def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(0)
    delays = [batching.backoff_s(n, 60, cap_s=900, jitter=0) for n in range(1, 7)]
    assert delays == [60, 120, 240, 480, 900, 900]
    jittered = {batching.backoff_s(1, 100, jitter=0.2, rng=rng) for _ in range(50)}
    assert len(jittered) > 1 and all(80 <= d <= 120 for d in jittered)


def test_quota_named_in_service_quotas_words() -> None:
    assert batching.quota_name("ml.g4dn.xlarge", "ResourceLimitExceeded",
                               "The account-level service limit 'ml.g4dn.xlarge for transform job usage' is 0 "
                               "Instances") == "ml.g4dn.xlarge for transform job usage"
    assert batching.quota_name("ml.g4dn.xlarge", "ResourceLimitExceeded", "limit exceeded") == \
        "ml.g4dn.xlarge for transform job usage"                     # nothing quoted: the instance quota
    assert batching.quota_name("ml.g4dn.xlarge", "ResourceLimitExceeded",
                               "The account-level service limit 'Number of concurrent transform jobs' is 4 "
                               "Jobs") == "Number of concurrent transform jobs"
    assert "throttling" in batching.quota_name("ml.g4dn.xlarge", "ThrottlingException").lower()
    assert batching.is_retryable_create_error("ThrottlingException")
    assert batching.is_retryable_create_error("ResourceLimitExceeded")
    assert not batching.is_retryable_create_error("ValidationException")


NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def parts(*sizes_and_ages: tuple[int, float]) -> list[batching.Part]:
    return [batching.Part(f"pending/{i:016x}-{n:07d}.jsonl", n, NOW - timedelta(seconds=age))
            for i, (n, age) in enumerate(sizes_and_ages)]


def plan_jobs(found: list[batching.Part], **kw: Any) -> list[list[int]]:
    """The images of each part of each job the policy makes now."""
    policy = {"min_images": 100, "max_images": 1000, "max_latency_s": 3600, "slots": 4, **kw}
    return [[p.images for p in job] for job in batching.plan_jobs(found, NOW, **policy)]


def test_dispatch_policy_waits_for_a_job_s_worth_or_the_latency_bound() -> None:
    assert plan_jobs(parts((30, 10), (40, 5))) == []                        # 70 < 100, young: wait
    assert plan_jobs(parts((30, 10), (40, 5), (30, 1))) == [[30, 40, 30]]   # 100: one job
    assert plan_jobs(parts((30, 3600), (40, 5))) == [[30, 40]]              # the oldest waited 1 h: go
    assert plan_jobs([]) == [] and plan_jobs(parts((500, 0)), slots=0) == []


def test_dispatch_policy_packs_backlogs_into_jobs_oldest_first() -> None:
    backlog = parts((900, 50), (900, 40), (100, 30), (60, 20))
    assert plan_jobs(backlog) == [[900], [900, 100]]                        # <= 1000 each; 60 young: waits
    assert plan_jobs(backlog, slots=1) == [[900]]                           # MaxConcurrentJobs
    assert plan_jobs(parts((5000, 0), (10, 0)), max_images=1000) == [[5000]]   # a big part is a job alone
    assert plan_jobs(parts((600, 4000), (50, 20))) == [[600, 50]]


def test_n_pending_images_never_make_more_than_ceil_n_over_min_jobs() -> None:
    """Parts arriving over time, the dispatcher running every minute: every job but a final,
    latency-forced one holds at least MinImagesPerJob images."""
    rng = random.Random(13)
    for _ in range(200):
        minimum, pending, made, total = rng.randint(5, 500), [], 0, 0
        t = NOW
        for minute in range(120):
            for _ in range(rng.randint(0, 3)):
                n = rng.randint(1, 200)
                total += n
                pending.append(batching.Part(f"pending/{minute:08x}{len(pending):08x}-{n:07d}.jsonl", n, t))
            jobs = batching.plan_jobs(pending, t, min_images=minimum, max_images=10 * minimum,
                                      max_latency_s=1800, slots=4)
            made += len(jobs)
            taken = {p.key for job in jobs for p in job}
            pending = [p for p in pending if p.key not in taken]
            t += timedelta(minutes=1)
        flushed = batching.plan_jobs(pending, t + timedelta(hours=1), min_images=minimum,
                                     max_images=10 * minimum, max_latency_s=1800, slots=10**6)
        made += len(flushed)
        assert sum(p.images for job in flushed for p in job) == sum(p.images for p in pending)
        assert made <= math.ceil(total / minimum) or total == 0


def test_a_drop_goes_out_once_no_image_has_arrived_for_quiet_seconds() -> None:
    drop = parts((900, 130), (900, 125), (200, 121))            # far below a job's worth, all young
    assert plan_jobs(drop, min_images=10_000, max_images=20_000) == []
    release = batching.quiet(drop, NOW, quiet_s=120, last_quiet=None, spacing_s=600)
    assert release and plan_jobs(drop, min_images=10_000, max_images=20_000, release=True) == [[900, 900, 200]]
    assert plan_jobs(drop, min_images=10_000, max_images=1000, release=True) == [[900], [900], [200]]
    assert not batching.quiet(drop + parts((5, 30)), NOW, quiet_s=120, last_quiet=None, spacing_s=600)
    assert not batching.quiet(drop, NOW, quiet_s=0, last_quiet=None, spacing_s=600)          # rule off
    # spacing: a release 5 minutes ago holds the next one back until 10 minutes have passed
    assert not batching.quiet(drop, NOW, quiet_s=120, last_quiet=NOW - timedelta(minutes=5), spacing_s=600)
    assert batching.quiet(drop, NOW, quiet_s=120, last_quiet=NOW - timedelta(minutes=10), spacing_s=600)
    assert not batching.quiet([], NOW, quiet_s=120, last_quiet=None, spacing_s=600)


def test_a_trickle_makes_at_most_one_quiet_job_per_spacing() -> None:
    """Parts arriving with quiet gaps longer than QuietSeconds (the worst case for the rule): jobs
    the quiet rule releases are at least the spacing apart, and nothing is left behind."""
    rng = random.Random(20)
    for _ in range(100):
        quiet_s, spacing_s = rng.choice((60, 120)), rng.choice((300, 600))
        pending, releases, total, dispatched, last = [], [], 0, 0, None
        t = NOW
        for minute in range(240):
            if rng.random() < 0.3:
                n = rng.randint(1, 20)
                total += n
                pending.append(batching.Part(f"pending/{minute:08x}-{n:07d}.jsonl", n, t))
            release = batching.quiet(pending, t, quiet_s=quiet_s, last_quiet=last, spacing_s=spacing_s)
            jobs = batching.plan_jobs(pending, t, min_images=10**6, max_images=10**7, max_latency_s=10**6,
                                      slots=4, release=release)
            if jobs:
                assert release
                releases.append(t)
                last = t
            taken = {p.key for job in jobs for p in job}
            dispatched += sum(p.images for p in pending if p.key in taken)
            pending = [p for p in pending if p.key not in taken]
            t += timedelta(minutes=1)
        assert all((b - a).total_seconds() >= spacing_s for a, b in zip(releases, releases[1:], strict=False))
        later = t + timedelta(seconds=spacing_s + quiet_s)
        if pending:   # what is left goes with the next release
            assert batching.quiet(pending, later, quiet_s=quiet_s, last_quiet=last, spacing_s=spacing_s)
        assert dispatched + sum(p.images for p in pending) == total


# --------------------------------------------------------------------------- on the local stack

@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model(tmp_path_factory.mktemp("scale-model"), size=32)


def make_pipeline(endpoint: str, model_dir: Path, visibility_timeout: int = 30, max_latency_s: float = 0,
                  **overrides: Any):
    from infra.local import LocalPipeline

    name = unique_name()
    return LocalPipeline(model_dir, bucket=f"{name}-images", stack_name=name, endpoint=endpoint,
                         batching_window_s=0.5, visibility_timeout=visibility_timeout, max_latency_s=max_latency_s,
                         overrides={"ModelName": f"{name}-model", **overrides})


def upload_copies(p, files: list[Path], n: int, prefix: str) -> list[str]:
    """``n`` uploads of the real sample images, reused under distinct keys."""
    s3 = p.s3
    keys = []
    for i in range(n):
        f = files[i % len(files)]
        key = f"{prefix}{i:05d}-{f.name}"
        s3.put_object(Bucket=p.stack.bucket, Key=key, Body=f.read_bytes())
        keys.append(key)
    return keys


def receive_all(p, expected: int, timeout_s: float | None = None) -> list[dict[str, Any]]:
    """Every message now on the queue, so that one enqueue batch holds them all (moto scans the
    whole queue per ReceiveMessage: allow time in proportion; keep the visibility timeout longer)."""
    messages: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + (timeout_s or 60 + 0.5 * expected)
    while len(messages) < expected and time.monotonic() < deadline:
        for m in p.poller.receive(window_s=0.2):
            messages[m["MessageId"]] = m
    assert len(messages) == expected, f"{len(messages)} of {expected} messages arrived"
    return list(messages.values())


def prediction_rows(p) -> list[dict[str, Any]]:
    s3 = p.s3
    rows = []
    for key in p.stack.list_keys(layout.PREDICTIONS):
        rows += pq.read_table(io.BytesIO(s3.get_object(Bucket=p.stack.bucket, Key=key)["Body"].read())).to_pylist()
    return rows


def score_in_one_batch(endpoint: str, model_dir: Path, files: list[Path], instances: int):
    p = make_pipeline(endpoint, model_dir, visibility_timeout=600, TransformInstanceCount=instances,
                      MinImagesPerShard=10)
    keys = upload_copies(p, files, SCALE_IMAGES, "incoming/scale/")
    result = p.poller.dispatch(receive_all(p, SCALE_IMAGES + 1))     # + the s3:TestEvent
    assert result.failed == [] and result.error is None
    assert p.dispatcher.run_once()["jobs_created"] == 1
    ran = p.runner.run_pending()
    assert [r["status"] for r in ran] == ["Completed"], ran
    return p, keys, ran[0]["job_name"]


def test_sharded_job_scores_every_image_once_like_one_instance(moto_endpoint: str, small_model: Path) -> None:
    from infra.stack import use_endpoint

    files = sample_images(50)
    with preserved_environ():
        use_endpoint(moto_endpoint)
        t0 = time.perf_counter()
        p4, keys, job4 = score_in_one_batch(moto_endpoint, small_model, files, 4)
        t4 = time.perf_counter() - t0
        p1, keys1, job1 = score_in_one_batch(moto_endpoint, small_model, files, 1)
        t1 = time.perf_counter() - t0 - t4
        try:
            sm = p4.stack.client("sagemaker")
            job = sm.describe_transform_job(TransformJobName=job4)
            assert job["TransformResources"]["InstanceCount"] == 4
            prefix = layout.job_input_prefix(job4, 4)
            assert job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{p4.stack.bucket}/{prefix}"
            shards = p4.stack.list_keys(prefix)
            assert shards == [layout.shard_key(job4, i, 4) for i in range(4)]
            s3 = p4.s3
            lines = [[json.loads(ln)["key"] for ln in
                      s3.get_object(Bucket=p4.stack.bucket, Key=k)["Body"].read().decode().splitlines()]
                     for k in shards]
            assert sorted(k for part in lines for k in part) == sorted(keys)      # each image in one shard
            assert max(map(len, lines)) - min(map(len, lines)) <= 1
            outs = sorted(p4.stack.list_keys(layout.transform_output_prefix(job4)))
            assert [o.rsplit("/", 1)[1] for o in outs] == [k.rsplit("/", 1)[1] + ".out" for k in shards]
            assert len(p4.runner.instance_pids[job4]) == 4                       # four worker processes

            p1_job = p1.stack.client("sagemaker").describe_transform_job(TransformJobName=job1)
            assert p1_job["TransformResources"]["InstanceCount"] == 1
            assert len(p1.stack.list_keys(layout.job_input_prefix(job1, 1))) == 1

            rows4, rows1 = prediction_rows(p4), prediction_rows(p1)
            assert len(rows4) == len({r["image_key"] for r in rows4}) == SCALE_IMAGES   # all scored, once
            assert {r["job_name"] for r in rows4} == {job4}
            by_key1 = {r["image_key"]: r for r in rows1}
            assert sorted(by_key1) == sorted(r["image_key"] for r in rows4) == sorted(keys)
            for r4 in rows4:
                r1 = by_key1[r4["image_key"]]
                for col, v in r4.items():
                    if col in JOB_COLUMNS:
                        continue
                    if isinstance(v, float):
                        assert v == pytest.approx(r1[col], abs=1e-5), (col, r4["image_key"])
                    else:
                        assert v == r1[col], (col, r4["image_key"])
            assert p4.stack.queue_depth() == {"visible": 0, "in_flight": 0}
            assert not p4.stack.list_keys(layout.FAILURES) and not p1.stack.list_keys(layout.FAILURES)
            print(f"\n{SCALE_IMAGES} images: InstanceCount=4 {t4:.1f}s (incl. 4 process start-ups), "
                  f"InstanceCount=1 {t1:.1f}s")
        finally:
            p4.close()
            p1.close()


class RefusingSageMaker:
    """The real (moto) client, but CreateTransformJob first fails with the given error codes."""

    def __init__(self, client, codes: list[str]) -> None:
        self._client, self.codes, self.calls = client, list(codes), 0

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def create_transform_job(self, **kwargs):
        self.calls += 1
        if self.codes:
            code = self.codes.pop(0)
            message = ("The account-level service limit 'ml.g4dn.xlarge for transform job usage' is 0 Instances, "
                       "with current utilization of 0 Instances and a request delta of 1 Instances."
                       if code == "ResourceLimitExceeded" else "Rate exceeded")
            raise ClientError({"Error": {"Code": code, "Message": message}}, "CreateTransformJob")
        return self._client.create_transform_job(**kwargs)


def test_refused_create_keeps_the_parts_pending_and_succeeds_later(moto_endpoint: str, small_model: Path,
                                                                   caplog) -> None:
    """ResourceLimitExceeded, then ThrottlingException: the job's intent waits out a back-off (the
    images are safe in pending/, the queue is done with them), one warning names the quota, the
    third try creates the job and every image is scored."""
    from infra.stack import use_endpoint

    with preserved_environ():
        use_endpoint(moto_endpoint)
        with make_pipeline(moto_endpoint, small_model, ThrottleBackoffSeconds=1) as p:
            refusing = RefusingSageMaker(p.stack.runtime("dispatch").sagemaker,
                                         ["ResourceLimitExceeded", "ThrottlingException"])
            p.stack.inject("dispatch", sagemaker=refusing)
            keys = p.upload(sample_images(6), "incoming/throttle/")

            first = p.poller.dispatch(receive_all(p, 7))
            assert first.failed == []                            # arrival succeeded: the part is pending
            assert p.dispatcher.run_once()["refused"] == 1 and p.runner.pending() == []
            # the structured fields (Powertools' JSON keys) of the one warning that names the quota
            refusal = next(r for r in caplog.records if getattr(r, "error_code", None) == "ResourceLimitExceeded")
            assert refusal.quota_to_raise == "ml.g4dn.xlarge for transform job usage"
            assert "ml.g4dn.xlarge for transform job usage" in refusal.getMessage()
            assert refusal.levelname == "WARNING" and refusal.images == 6 and refusal.retry_in_s >= 1
            (intent,) = p.stack.list_keys(layout.DISPATCH)
            assert len(p.stack.list_keys(layout.PENDING)) == 1   # the part stays until its job exists

            p.drain(timeout_s=90)                               # throttled once more, then created
            assert refusing.calls == 3
            assert [r["status"] for r in p.runner.results] == ["Completed"]
            assert sorted(r["image_key"] for r in prediction_rows(p)) == sorted(keys)
            assert p.stack.list_keys(layout.PENDING) == [] and p.stack.list_keys(layout.DISPATCH) == []
            assert p.stack.queue_depth(dlq=True)["visible"] == 0


def test_small_volume_waits_for_the_latency_bound_then_runs(moto_endpoint: str, small_model: Path) -> None:
    """MinImagesPerJob 100, MaxLatencySeconds 3: three images wait in pending/, then go as one job."""
    from infra.stack import use_endpoint

    with preserved_environ():
        use_endpoint(moto_endpoint)
        with make_pipeline(moto_endpoint, small_model, max_latency_s=3, MinImagesPerJob=100) as p:
            keys = p.upload(sample_images(3), "incoming/small/")
            assert p.poller.dispatch(receive_all(p, 4)).failed == []
            report = p.dispatcher.run_once()
            assert (report["jobs_created"], report["images_waiting"]) == (0, 3) and p.runner.pending() == []
            p.drain(timeout_s=60)
            assert [r["status"] for r in p.runner.results] == ["Completed"]
            assert sorted(r["image_key"] for r in prediction_rows(p)) == sorted(keys)
            assert p.stack.queue_depth(dlq=True)["visible"] == 0


# --------------------------------------------------------------------------- capacity model

PLAN_PROFILE = dict(usd_per_hour=0.736, images_per_second=500, startup_minutes=6)


def test_plan_cost_arithmetic_by_hand() -> None:
    from analytics.plan import plan

    # the old batch policy: 1M images/day at 11.57 images/s: a 300 s window would gather 3,472, the cap is 3,000.
    p = plan(1_000_000, **PLAN_PROFILE, policy="batch", window_s=300, batch_cap=3000, instance_count=1)
    assert p.images_per_job == 3000 and p.jobs_per_day == pytest.approx(333.33, rel=1e-3)
    job_h = (6 * 60 + 3000 / 500) / 3600
    assert p.instance_hours_per_day == pytest.approx(1_000_000 / 3000 * job_h)
    assert p.usd_per_million == pytest.approx(1_000_000 / 3000 * job_h * 0.736)
    assert p.usd_per_million_ideal == pytest.approx(0.736 / 3600 / 500 * 1e6)
    assert p.startup_share > 0.95                    # small jobs: the start-up is the bill


def test_plan_defaults_are_the_template_s(tmp_path: Path) -> None:
    from analytics.plan import plan, template_defaults
    from dermscore.template import TEMPLATE_PATH, load_template

    params = load_template()["Parameters"]
    d = template_defaults()
    assert (d.min_images_per_job, d.max_latency_s, d.max_images_per_job, d.max_concurrent_jobs) == tuple(
        int(params[k]["Default"]) for k in ("MinImagesPerJob", "MaxLatencySeconds", "MaxImagesPerJob",
                                            "MaxConcurrentJobs"))
    assert (d.instance_count, d.min_images_per_shard, d.batching_window_s) == tuple(
        int(params[k]["Default"]) for k in ("TransformInstanceCount", "MinImagesPerShard",
                                            "EnqueueBatchingWindowSeconds"))
    assert (d.max_images_per_shard, d.dispatch_every_s, d.collect_timeout_s) == (
        Settings.max_images_per_shard, 60, 900)
    # another template, other defaults: the model follows the file, not a copy of its numbers
    text = TEMPLATE_PATH.read_text()
    assert text.count(f"Default: {d.min_images_per_job}\n") == 1
    other = tmp_path / "template.yaml"
    other.write_text(text.replace(f"Default: {d.min_images_per_job}\n", "Default: 100000\n"))
    assert template_defaults(other).min_images_per_job == 100_000
    p = plan(1_000_000, **PLAN_PROFILE, defaults=template_defaults(other))
    assert p.images_per_job == 100_000 and p.policy == "dispatcher"
    # flags override the template
    assert plan(1_000_000, **PLAN_PROFILE, min_images_per_job=200_000).images_per_job == 200_000


def test_plan_drop_row_by_hand() -> None:
    """A drop of 2,000 images with template.yaml's defaults: one job, created QuietSeconds after the
    last image's part (written within the SQS window), seen by the next scheduled run."""
    from analytics.plan import plan, template_defaults

    d = template_defaults()
    assert (d.quiet_s, d.batching_window_s, d.dispatch_every_s) == (120, 20, 60)
    assert d.batching_window_s < d.quiet_s   # a drop in progress writes a part more often than the rule waits
    p = plan(2_000, **PLAN_PROFILE, policy="drop")
    assert (p.images_per_job, p.jobs_per_day, p.instances_per_job) == (2_000, 1, 1)
    assert p.batch_fill_s == 20 + 120 + 60
    assert p.latency_s == pytest.approx(200 + 360 + 2_000 / 500 + p.collect_s_per_job)   # ~9.5 min
    assert p.usd_per_million == pytest.approx((360 + 4) / 3600 * 0.736 / 2_000 * 1e6)


def test_plan_dispatcher_row_at_1m_per_day_by_hand() -> None:
    """1M images/day with template.yaml's defaults (MinImagesPerJob 1.62M, MaxLatencySeconds 6 h,
    one instance per job): the latency bound makes the job; every figure worked out by hand."""
    from analytics.plan import DEFAULT_CALLS_PER_IMAGE, LAMBDA, cost_row, plan, template_defaults
    from handlers import claims

    d = template_defaults()
    assert (d.min_images_per_job, d.max_latency_s, d.max_images_per_job, d.instance_count) == (
        1_620_000, 21_600, 2_000_000, 1)
    p = plan(1_000_000, **PLAN_PROFILE)
    row = cost_row(p, DEFAULT_CALLS_PER_IMAGE)
    rate = 1_000_000 / 86_400                                  # 11.57 images/s
    per_job = int(rate * (21_600 + 60))                        # 250,694 < 1.62M: 6 h (+ one run) of arrivals
    assert p.images_per_job == per_job == 250_694
    assert p.shards_per_job == 6 and p.instances_per_job == 1  # <= 50,000 lines per file, all on one instance
    job_s = 360 + per_job / 500                                # 861 s: the one instance reads all 6 files
    jobs = 1_000_000 / per_job                                 # 3.99 jobs/day
    assert p.jobs_per_day == pytest.approx(jobs)
    assert row["startup_share"] == pytest.approx(360 / job_s)  # 42 %
    assert row["gpu_usd_per_million"] == pytest.approx(jobs * job_s / 3600 * 0.736)   # $0.70
    collect_s = 1 + per_job * 0.020 / claims.WORKERS          # one PUT per image, WORKERS in parallel
    assert LAMBDA["collect"].s_per_image == pytest.approx(0.020 / claims.WORKERS)
    assert p.collect_s_per_job == pytest.approx(collect_s) and collect_s < 900
    assert p.latency_s == pytest.approx(per_job / rate + job_s + collect_s)           # ~6.3 h
    assert per_job / rate <= 21_600 + 60
    enq, dis, col = LAMBDA["enqueue"], LAMBDA["dispatch"], LAMBDA["collect"]
    enqueues = 1_000_000 / (rate * 20)         # one per SQS batch: 231 images in the 20 s window
    runs = 86_400 / 60 + jobs                  # the schedule, and a wake-up per job
    gb_s = (1.0 * (enqueues * enq.s_per_invocation + 1e6 * enq.s_per_image)
            + 1.0 * (runs * dis.s_per_invocation + 1e6 * dis.s_per_image)
            + 2.0 * (jobs * col.s_per_invocation + 1e6 * col.s_per_image))
    assert row["lambda_usd_per_million"] == pytest.approx(
        gb_s * 0.0000166667 + (enqueues + runs + jobs) / 1e6 * 0.20)
    c = DEFAULT_CALLS_PER_IMAGE
    assert row["s3_usd_per_million"] == pytest.approx(
        1e6 * ((c["PutObject"] + c["ListObjectsV2"]) * 0.005 + (c["GetObject"] + c["HeadObject"]) * 0.0004) / 1000)
    assert row["total_usd_per_million"] == pytest.approx(
        row["gpu_usd_per_million"] + row["lambda_usd_per_million"] + row["s3_usd_per_million"])


def test_plan_dispatcher_at_100m_per_day_makes_minimum_sized_jobs() -> None:
    from analytics.plan import LAMBDA, plan

    p = plan(100_000_000, **PLAN_PROFILE)
    assert p.images_per_job == 1_620_000 and p.shards_per_job == 33 and p.instances_per_job == 1
    assert p.job_minutes == pytest.approx((360 + 1_620_000 / 500) / 60)       # 60 min: start-up 10 %
    assert p.startup_share == pytest.approx(0.10)
    assert p.batch_fill_s == pytest.approx(1_620_000 / (100_000_000 / 86_400))   # 23 min: the minimum is reached
    assert p.concurrent_jobs == pytest.approx(100_000_000 / 1_620_000 * 3600 / 86_400) and not p.over_capacity
    assert p.collect_s_per_job == pytest.approx(1 + 1_620_000 * LAMBDA["collect"].s_per_image)
    # one job slot: images wait for it, jobs grow to MaxImagesPerJob, and still do not keep up
    tight = plan(100_000_000, **PLAN_PROFILE, max_concurrent_jobs=1)
    assert tight.images_per_job == 2_000_000 and tight.over_capacity
    assert tight.batch_fill_s == pytest.approx(2_000_000 / (100_000_000 / 86_400))


def test_plan_shards_big_jobs_and_keeps_small_ones_on_one_instance() -> None:
    from analytics.plan import plan

    small = plan(1_000_000, **PLAN_PROFILE, policy="batch", max_instances=8)
    big = plan(100_000_000, **PLAN_PROFILE, max_instances=8)
    assert small.instances_per_job == 1
    assert big.instances_per_job == 8 and big.shards_per_job == 33       # files of <= 50,000 images
    # Batch Transform hands whole files to instances: the busiest gets ceil(33 / 8) = 5 of them
    assert big.job_minutes == pytest.approx((360 + 5 * math.ceil(1_620_000 / 33) / 500) / 60)
    assert big.usd_per_million < small.usd_per_million
    assert plan(100_000_000, **PLAN_PROFILE, instance_count=4).instances_per_job == 4
    # the old batch policy's deferral traded latency for cost at low volume
    quick = plan(10_000, **PLAN_PROFILE, policy="batch")
    patient = plan(10_000, **PLAN_PROFILE, policy="batch", batch_min_images_per_job=3000, max_job_wait_s=3600)
    assert patient.usd_per_day < quick.usd_per_day and patient.latency_s > quick.latency_s


def test_plan_command_prints_the_three_volumes(capsys) -> None:
    from dermscore.cli import main

    assert main(["plan", "--instance", "ml.g4dn.xlarge"]) == 0
    out = capsys.readouterr().out
    assert "assumption" in out and "$/1M images" in out and "MinImagesPerJob 1,620,000" in out
    assert all(v in out for v in ("10k", "1M", "100M"))
    # a job that collect cannot write within its 900 s timeout gets a note
    from analytics.plan import LAMBDA

    n = str(int(2 * 900 / LAMBDA["collect"].s_per_image))
    assert main(["plan", "--policy", "dispatcher", "--images-per-day", "100000000", "--min-images-per-job", n,
                 "--max-images-per-job", n]) == 0
    out = capsys.readouterr().out
    assert "note: dispatcher at 100M/day: collect" in out and "900 s Lambda timeout" in out
    assert main(["plan", "--images-per-day", "5000", "--instance", "ml.c5.xlarge", "--usd-per-hour", "0.2",
                 "--images-per-second", "40", "--startup-minutes", "4", "--markdown"]) == 0
    assert "| 5k |" in capsys.readouterr().out
    assert main(["plan", "--instance", "ml.p3.2xlarge"]) == 2          # a user's mistake: one line, exit 2
    assert "no built-in profile for ml.p3.2xlarge" in capsys.readouterr().err


PLAN_KEYS = ("images_per_day", "startup_share", "gpu_usd_per_million", "lambda_usd_per_million",
             "s3_usd_per_million", "total_usd_per_million")


def test_plan_json_has_every_policy_and_every_cost(capsys, tmp_path: Path) -> None:
    from dermscore.cli import main

    assert main(["plan", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["rows"]
    assert {(r["policy"], r["images_per_day"]) for r in rows} == {
        (p, n) for p in ("batch", "dispatcher") for n in (10_000, 1_000_000, 100_000_000)} | {("drop", 2_000)}
    for r in rows:
        for k in PLAN_KEYS:
            assert isinstance(r[k], (int, float)) and r[k] >= 0, (r["policy"], k)
        assert 0 < r["startup_share"] <= 1
        assert r["total_usd_per_million"] == pytest.approx(
            r["gpu_usd_per_million"] + r["lambda_usd_per_million"] + r["s3_usd_per_million"])
    assert data["inputs"]["min_images_per_job"] == data["inputs"]["template_defaults"]["min_images_per_job"]
    by = {(r["policy"], r["images_per_day"]): r for r in rows}
    # larger jobs: the dispatcher never costs more GPU time per image than one job per SQS batch
    for n in (10_000, 1_000_000, 100_000_000):
        assert by["dispatcher", n]["gpu_usd_per_million"] <= by["batch", n]["gpu_usd_per_million"]

    # flags override the template's defaults
    assert main(["plan", "--json", "--policy", "dispatcher", "--images-per-day", "100000000",
                 "--min-images-per-job", "500000", "--max-instances", "4"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    # 500,000 images take 1,000 s on one instance: 3 keep processing >= the 360 s start-up
    assert (row["images_per_job"], row["shards_per_job"], row["instances_per_job"]) == (500_000, 10, 3)
    assert main(["plan", "--json", "--policy", "dispatcher", "--images-per-day", "100000000",
                 "--instance-count", "4"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert (row["images_per_job"], row["instances_per_job"]) == (1_620_000, 4)

    # calls per image from a bench JSON: the S3 figure follows them
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"e2e": {"api_calls_per_image_by_operation": {"GetObject": 1.0, "PutObject": 1.0,
                                                                              "ReceiveMessage": 0.2}}}))
    assert main(["plan", "--json", "--bench", str(bench), "--policy", "batch", "--images-per-day", "1000000"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["s3_usd_per_million"] == pytest.approx(1e6 * (0.0004 + 0.005) / 1000)   # SQS is not S3


def test_plan_row_arithmetic_by_hand() -> None:
    """1M images/day, the old policy (one job per SQS batch of 3,000 images): every dollar by hand."""
    from analytics.plan import LAMBDA, cost_row, plan

    p = plan(1_000_000, **PLAN_PROFILE, policy="batch", window_s=300, batch_cap=3000, instance_count=1)
    calls = {"PutObject": 2.0, "GetObject": 3.0, "HeadObject": 1.0, "ReceiveMessage": 0.1}
    row = cost_row(p, calls)
    jobs = 1_000_000 / 3000
    job_s = 6 * 60 + 3000 / 500
    assert row["startup_share"] == pytest.approx(360 / job_s)
    assert row["gpu_usd_per_million"] == pytest.approx(jobs * job_s / 3600 * 0.736)              # 1M images/day
    enq, col = LAMBDA["enqueue"], LAMBDA["collect"]
    gb_s = (1.0 * (jobs * enq.s_per_invocation + 1e6 * enq.s_per_image)
            + 2.0 * (jobs * col.s_per_invocation + 1e6 * col.s_per_image))
    assert (enq.memory_mb, col.memory_mb) == (1024, 2048)
    assert row["lambda_usd_per_million"] == pytest.approx(gb_s * 0.0000166667 + 2 * jobs / 1e6 * 0.20)
    assert row["s3_usd_per_million"] == pytest.approx(1e6 * (2.0 * 0.005 + 4.0 * 0.0004) / 1000)  # $11.60
    assert row["total_usd_per_million"] == pytest.approx(
        row["gpu_usd_per_million"] + row["lambda_usd_per_million"] + row["s3_usd_per_million"])


def test_plan_lambda_memory_is_the_template_s() -> None:
    import re

    from analytics.plan import LAMBDA

    text = (Path(__file__).resolve().parents[1] / "template.yaml").read_text()
    default = int(re.search(r"Globals:.*?MemorySize: (\d+)", text, re.S).group(1))
    collect = re.search(r"CollectFunction:.*?MemorySize: (\d+)", text, re.S)
    for name, logical_id in (("enqueue", "EnqueueFunction"), ("dispatch", "DispatchFunction")):
        body = re.search(rf"\n  {logical_id}:(.*?)\n  \w+:\n", text, re.S).group(1)
        assert LAMBDA[name].memory_mb == int((re.search(r"MemorySize: (\d+)", body) or [0, default])[1])
    assert LAMBDA["collect"].memory_mb == int(collect.group(1))


def test_plan_prices_cpu_types_from_the_measured_rate_per_vcpu(capsys, tmp_path: Path) -> None:
    """A CPU type's rate is the bench's images/s per vCPU x its vCPUs; the comparison puts it beside the
    GPU profile (assumed), and a bench file without the figure falls back to the recorded measurement."""
    from analytics import plan as plan_mod
    from dermscore.cli import main
    from dermscore.config import TRANSFORM_USD_PER_HOUR, TRANSFORM_VCPUS

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"figures": {"transform.images_per_vcpu_s": 50.0}, "machine": {"device": "cpu (x)"},
                                 "e2e": {"heatmaps": "off", "api_calls_per_image_by_operation": {"GetObject": 1.0,
                                                                                                 "PutObject": 1.0}}}))
    measured = plan_mod.cpu_throughput_from_bench(bench)
    assert measured.images_per_vcpu_s == 50.0 and "measured" in measured.source
    prof = plan_mod.cpu_profile("ml.c5.xlarge", measured)
    assert prof.images_per_second == 50.0 * TRANSFORM_VCPUS["ml.c5.xlarge"] == 200.0
    assert prof.usd_per_hour == TRANSFORM_USD_PER_HOUR["ml.c5.xlarge"]
    assert plan_mod.cpu_profile("ml.g4dn.xlarge") is None          # a GPU type has no measured CPU profile
    assert plan_mod.profile("ml.g4dn.xlarge") == plan_mod.INSTANCES["ml.g4dn.xlarge"]

    assert main(["plan", "--compare", "--bench", str(bench), "--images-per-day", "1000000", "--json"]) == 0
    rows = {r["instance"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == set(plan_mod.COMPARED)
    assert rows["ml.g4dn.xlarge"]["rate_is"] == "assumed" and rows["ml.c5.xlarge"]["rate_is"] == "measured"
    c5 = rows["ml.c5.xlarge"]
    assert c5["images_per_second"] == 200.0
    # by hand: 1M images/day in jobs of c5["images_per_job"], each one instance for start-up + images / 200 s
    job_s = plan_mod.CPU_STARTUP_MINUTES * 60 + c5["images_per_job"] / 200.0
    hours = 1_000_000 / c5["images_per_job"] * job_s / 3600
    assert c5["gpu_usd_per_million"] == pytest.approx(hours * TRANSFORM_USD_PER_HOUR["ml.c5.xlarge"])
    assert c5["usd_per_million_ideal"] == pytest.approx(0.204 / 3600 / 200.0 * 1e6)
    # a bench file without the figure: the recorded measurement, said so
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"figures": {}, "e2e": {"api_calls_per_image_by_operation": {"GetObject": 1.0}}}))
    assert main(["plan", "--compare", "--bench", str(old), "--images-per-day", "10000"]) == 0
    out = capsys.readouterr().out
    assert "measured" in out and "assumed" in out and "| ml.m5.large | cpu |" in out
    # a CPU type is a built-in profile for the ordinary table too
    assert main(["plan", "--instance", "ml.m5.large", "--policy", "dispatcher", "--images-per-day", "10000"]) == 0
    assert "images/s per vCPU" in capsys.readouterr().out
