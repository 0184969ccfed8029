"""Lambda handlers: ``enqueue`` (SQS batch of S3 events -> manifest + transform job) and
``collect`` (transform job state change -> Parquet + per-image JSON + failure rows).

The local stack (``infra``) calls these very functions; there is no second implementation.
"""
