"""Pending manifest parts: what enqueue (new uploads) and rescore (images already stored) hand the dispatcher.

Both arrival paths write the same thing, one content-addressed part per batch of lines under
``pending/`` (``layout.pending_part_key``: a batch written twice rewrites the same object), and
wake the dispatcher once the pending volume makes a job (``handlers.dispatch`` sizes and sends it).
"""

from __future__ import annotations

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError

from dermscore import layout, reasons
from dermscore.aws import iter_keys
from dermscore.messages import ManifestLine
from handlers.runtime import Runtime
from handlers.storage import MANIFEST_CONTENT_TYPE

logger = Logger(service="dermscore-pending")


def refusal(key: str, size: int) -> tuple[str, str] | None:
    """Why an upload is refused before scoring (reason code, detail), from its key and size alone,
    or None: enqueue writes its failure row, a re-score skips it (it has that row already)."""
    if not key.startswith(layout.INCOMING):
        return reasons.WRONG_PREFIX, f"key is outside {layout.INCOMING}"
    problem = layout.key_problem(key)
    if problem:
        return problem
    try:
        reasons.check_size(size)
    except reasons.ImageRejected as exc:
        return exc.reason, exc.detail
    return None


def manifest_items(lines: list[ManifestLine]) -> list[ManifestLine]:
    """Sorted, de-duplicated by upload: the same images give the same manifest."""
    unique: dict[tuple[str, str, str], ManifestLine] = {}
    for ln in lines:
        unique.setdefault(ln.upload, ln)
    return sorted(unique.values())


def manifest_text(lines: list[ManifestLine]) -> str:
    return "".join(ln.to_json() + "\n" for ln in manifest_items(lines))


def write_part(rt: Runtime, lines: list[ManifestLine], scope: str = "") -> str | None:
    """The batch's lines as one pending manifest part (content-addressed); returns its key.

    ``scope`` joins the digest: a re-score run names its parts by its run id too, since its lines
    may equal an earlier part's (the same uploads), and a job is named by its parts' keys: a part
    that equalled one already dispatched would find that job done and never be scored again."""
    unique = manifest_items(lines)
    if not unique:
        return None
    text = manifest_text(unique)
    key = layout.pending_part_key(layout.content_digest(*filter(None, (scope, text))), len(unique))
    rt.s3.put_object(Bucket=rt.settings.bucket, Key=key, Body=text.encode(), ContentType=MANIFEST_CONTENT_TYPE)
    logger.info("manifest part pending", extra={"part": key, "images": len(unique)})
    return key


def pending_images(s3, bucket: str) -> int:
    """The images waiting in ``pending/``, from the parts' names (one LIST per 1,000 parts)."""
    return sum(layout.part_images(k) or 0 for k in iter_keys(s3, bucket, layout.PENDING))


def wake_dispatcher(rt: Runtime) -> bool:
    """Invoke the dispatcher now (asynchronously) if the pending volume makes a job; its schedule
    runs it anyway, this only saves the wait for the next tick when a burst arrives."""
    settings = rt.settings
    if not settings.dispatch_function or rt.lambda_ is None:
        return False
    pending = pending_images(rt.s3, settings.bucket)
    if pending < settings.min_images_per_job:
        return False
    try:
        rt.lambda_.invoke(FunctionName=settings.dispatch_function, InvocationType="Event", Payload=b"{}")
    except ClientError as exc:   # the part is safe in pending/: the schedule runs the dispatcher anyway
        logger.warning("could not wake the dispatcher; its schedule will run it", extra={"error": str(exc)})
        return False
    logger.info("dispatcher woken", extra={"pending_images": pending,
                                           "min_images_per_job": settings.min_images_per_job})
    return True
