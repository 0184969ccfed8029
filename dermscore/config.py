"""Runtime settings of the handlers, read from the environment.

The names are the ones ``template.yaml`` sets on the Lambda functions; the
local stack sets the same variables, so handlers run unchanged in both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    bucket: str
    model_name: str = "dermscore-model"       # SageMaker Model resource name
    job_prefix: str = "dermscore"             # transform job names start with this (EventBridge filter)
    role_arn: str = ""                        # not needed by CreateTransformJob; kept for completeness
    instance_type: str = "ml.g4dn.xlarge"
    instance_count: int = 1
    max_concurrent_transforms: int = 1
    max_payload_mb: int = 6
    invocations_timeout_s: int = 3600
    batch_strategy: str = "MultiRecord"

    @classmethod
    def from_env(cls) -> "Settings":
        e = os.environ
        return cls(
            bucket=e["BUCKET_NAME"],
            model_name=e.get("MODEL_NAME", cls.model_name),
            job_prefix=e.get("JOB_PREFIX", cls.job_prefix),
            instance_type=e.get("TRANSFORM_INSTANCE_TYPE", cls.instance_type),
            instance_count=int(e.get("TRANSFORM_INSTANCE_COUNT", cls.instance_count)),
            max_concurrent_transforms=int(e.get("MAX_CONCURRENT_TRANSFORMS", cls.max_concurrent_transforms)),
            max_payload_mb=int(e.get("MAX_PAYLOAD_MB", cls.max_payload_mb)),
            invocations_timeout_s=int(e.get("INVOCATIONS_TIMEOUT_S", cls.invocations_timeout_s)),
        )
