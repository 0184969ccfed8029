"""Runtime settings of the handlers, read from the environment.

The names are the ones ``template.yaml`` sets on the Lambda functions; the
local stack sets the same variables, so handlers run unchanged in both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# On-demand price per instance-hour of SageMaker Batch Transform instances, USD, us-east-1: the
# one figure behind every cost the project prints (benchmark, capacity plan, reports). Check the
# SageMaker pricing page for your region. A type missing here has no cost rather than a guess.
#
# The CPU types: SageMaker on-demand prices for batch transform / real-time inference instances,
# us-east-1, https://aws.amazon.com/sagemaker/pricing/ ("Real-Time Inference" / "Batch Transform"
# tabs, which list the same hourly rates), as entered 2026-12-03 from the published rates
# (not re-read from the page in the session that added them: check them before relying on them).
TRANSFORM_USD_PER_HOUR: dict[str, float] = {
    "ml.g4dn.xlarge": 0.736,
    "ml.m5.large": 0.115, "ml.m5.xlarge": 0.23, "ml.m5.2xlarge": 0.461, "ml.m5.4xlarge": 0.922,
    "ml.c5.xlarge": 0.204, "ml.c5.2xlarge": 0.408, "ml.c5.4xlarge": 0.816, "ml.c5.9xlarge": 1.836,
    "ml.c6i.large": 0.102, "ml.c6i.xlarge": 0.204, "ml.c6i.2xlarge": 0.408, "ml.c6i.4xlarge": 0.816,
}
DEFAULT_INSTANCE_TYPE = "ml.g4dn.xlarge"
# vCPUs of each priced type (EC2's instance type specifications): what a CPU instance's rate scales with.
TRANSFORM_VCPUS: dict[str, int] = {
    "ml.g4dn.xlarge": 4,
    "ml.m5.large": 2, "ml.m5.xlarge": 4, "ml.m5.2xlarge": 8, "ml.m5.4xlarge": 16,
    "ml.c5.xlarge": 4, "ml.c5.2xlarge": 8, "ml.c5.4xlarge": 16, "ml.c5.9xlarge": 36,
    "ml.c6i.large": 2, "ml.c6i.xlarge": 4, "ml.c6i.2xlarge": 8, "ml.c6i.4xlarge": 16,
}

# Request and compute prices of the services around the transform, USD, us-east-1, as published
# on the AWS pricing pages in 2026-12 (S3 Standard requests; Lambda x86; docs/scaling.md names the
# sources). ``dermscore plan`` prices the bench's calls per image with these.
USD_PRICES: dict[str, float] = {
    "s3_put_copy_post_list_per_1000": 0.005,   # PUT, COPY, POST, LIST requests
    "s3_get_head_per_1000": 0.0004,            # GET, SELECT and all other requests (HEAD included)
    "lambda_per_gb_second": 0.0000166667,      # x86, first pricing tier
    "lambda_per_million_requests": 0.20,
}
# The S3 price tier of each S3 operation the pipeline makes (other services' calls are not S3's).
S3_TIER: dict[str, str] = {
    **dict.fromkeys(("PutObject", "CopyObject", "PostObject", "ListObjectsV2", "ListObjects",
                     "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"),
                    "s3_put_copy_post_list_per_1000"),
    **dict.fromkeys(("GetObject", "HeadObject", "HeadBucket", "GetBucketLocation"), "s3_get_head_per_1000"),
}


@dataclass(frozen=True)
class Settings:
    bucket: str
    model_name: str = "dermscore-model"       # SageMaker Model resource name
    job_prefix: str = "dermscore"             # transform job names start with this (EventBridge filter)
    role_arn: str = ""                        # not needed by CreateTransformJob; kept for completeness
    instance_type: str = DEFAULT_INSTANCE_TYPE
    instance_count: int = 1
    max_concurrent_transforms: int = 1
    max_payload_mb: int = 6
    invocations_timeout_s: int = 3600
    batch_strategy: str = "MultiRecord"
    # Scale-out and dispatch policy (docs/scaling.md, dermscore.batching).
    min_images_per_shard: int = 250           # below this a shard is not worth one more instance
    max_images_per_shard: int = 50_000        # manifest files stay this small (the dispatcher's memory)
    min_images_per_job: int = 1               # pending images wait for this many (up to max_latency_s)
    max_images_per_job: int = 2_000_000       # larger backlogs become several jobs
    max_latency_s: int = 900                  # the oldest pending image waits at most this long
    quiet_s: int = 0                          # a drop has ended when no part is newer (0: rule off)
    quiet_spacing_s: int = 600                # fewest seconds between two jobs the quiet rule sends
    max_concurrent_jobs: int = 4              # running transform jobs of this stack (the account quota)
    throttle_backoff_s: int = 60              # first back-off after a throttled/quota-refused create
    dispatch_function: str = ""               # enqueue wakes it when the pending volume reaches a job
    # Reliability (docs/reliability.md): where collect re-queues the images of a failed job, and
    # how many transform attempts an image gets before it becomes a failure row.
    queue_url: str = ""
    max_job_attempts: int = 3
    # The reconciler (handlers.reconcile): the collect function it re-drives lost events to, and
    # how old a job's manifest must be before a job without an outcome is looked at.
    collect_function: str = ""
    reconcile_after_minutes: float = 120.0
    manifest_retention_days: float = 0.0      # ManifestRetentionDays (0: none): the reconciler's horizon
    give_up_wait_s: float = 960.0             # fence -> failure rows: collect's timeout (900 s) and a minute

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the function's environment (``os.environ`` on Lambda; the local stack passes the
        function's own variables from template.yaml)."""
        e = os.environ if env is None else env
        return cls(
            bucket=e["BUCKET_NAME"],
            model_name=e.get("MODEL_NAME", cls.model_name),
            job_prefix=e.get("JOB_PREFIX", cls.job_prefix),
            instance_type=e.get("TRANSFORM_INSTANCE_TYPE", cls.instance_type),
            instance_count=int(e.get("TRANSFORM_INSTANCE_COUNT", cls.instance_count)),
            max_concurrent_transforms=int(e.get("MAX_CONCURRENT_TRANSFORMS", cls.max_concurrent_transforms)),
            max_payload_mb=int(e.get("MAX_PAYLOAD_MB", cls.max_payload_mb)),
            invocations_timeout_s=int(e.get("INVOCATIONS_TIMEOUT_S", cls.invocations_timeout_s)),
            min_images_per_shard=int(e.get("MIN_IMAGES_PER_SHARD", cls.min_images_per_shard)),
            max_images_per_shard=int(e.get("MAX_IMAGES_PER_SHARD", cls.max_images_per_shard)),
            min_images_per_job=int(e.get("MIN_IMAGES_PER_JOB", cls.min_images_per_job)),
            max_images_per_job=int(e.get("MAX_IMAGES_PER_JOB", cls.max_images_per_job)),
            max_latency_s=int(e.get("MAX_LATENCY_S", cls.max_latency_s)),
            quiet_s=int(e.get("QUIET_S", cls.quiet_s)),
            quiet_spacing_s=int(e.get("QUIET_SPACING_S", cls.quiet_spacing_s)),
            max_concurrent_jobs=int(e.get("MAX_CONCURRENT_JOBS", cls.max_concurrent_jobs)),
            dispatch_function=e.get("DISPATCH_FUNCTION_NAME", cls.dispatch_function),
            throttle_backoff_s=int(e.get("THROTTLE_BACKOFF_S", cls.throttle_backoff_s)),
            queue_url=e.get("QUEUE_URL", cls.queue_url),
            max_job_attempts=int(e.get("MAX_JOB_ATTEMPTS", cls.max_job_attempts)),
            collect_function=e.get("COLLECT_FUNCTION_NAME", cls.collect_function),
            reconcile_after_minutes=float(e.get("RECONCILE_AFTER_MINUTES", cls.reconcile_after_minutes)),
            manifest_retention_days=float(e.get("MANIFEST_RETENTION_DAYS", cls.manifest_retention_days)),
            give_up_wait_s=float(e.get("GIVE_UP_WAIT_S", cls.give_up_wait_s)),
        )
