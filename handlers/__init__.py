"""Lambda handlers: ``enqueue`` (SQS batch of S3 events -> manifest + transform job),
``collect`` (transform job state change -> Parquet + per-image JSON + failure rows) and
``reconcile`` (scheduled: jobs whose outcome never arrived -> collected, re-submitted or failure rows).

The local stack (``infra``) calls these very functions; there is no second implementation.
"""
