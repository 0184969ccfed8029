"""Why an upload cannot be scored: the reason codes of the failures table, and the size check.

Pure Python on purpose: the Lambda functions need the codes and :func:`check_size` but not
Pillow or numpy (decoding is :mod:`dermscore.imaging`, inside the transform container).
"""

from __future__ import annotations

MAX_BYTES = 20 * 1024 * 1024          # larger objects are refused before download


class ImageRejected(Exception):
    """An input that cannot be scored; ``reason`` is a stable code for SQL."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Reason codes, the vocabulary of the failures table.
ZERO_BYTE = "zero_byte"
TOO_LARGE = "too_large"
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
CORRUPT = "corrupt_image"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
EXTREME_ASPECT = "extreme_aspect_ratio"    # longer side over imaging.MAX_ASPECT (4) x the shorter
WRONG_PREFIX = "wrong_prefix"
READ_ERROR = "read_error"
BAD_MANIFEST_LINE = "bad_manifest_line"   # transform input line is not {"bucket", "key", ...}
NON_FINITE_OUTPUT = "non_finite_output"   # the network produced NaN/inf for this image
SUPERSEDED = "superseded"                 # the key was uploaded again before this upload was scored
UNSAFE_KEY = "unsafe_key"                 # '.'/'..' segments, backslashes or control characters in the key
KEY_TOO_LONG = "key_too_long"             # a result key derived from it would exceed S3's 1,024 bytes
FOLDER_MARKER = "folder_marker"           # a zero-byte "folder/" object (the console's Create folder)
# ... found after the transform, by collect and the reconciler:
JOB_FAILED = "job_failed"                 # the transform job failed its last attempt (MaxJobAttempts)
JOB_STOPPED = "job_stopped"               # ... or was stopped
MISSING_OUTPUT = "missing_output"         # the job completed without an output line for this image
UNRECONCILED = "unreconciled"             # the reconciler gave up on the job (docs/reliability.md)
UNKNOWN = "unknown"                       # a failed output line that named no reason

# The stages that write failure rows: the failures table's ``stage`` column.
ENQUEUE, TRANSFORM, COLLECT, RECONCILE = "enqueue", "transform", "collect", "reconcile"
STAGES = (ENQUEUE, TRANSFORM, COLLECT, RECONCILE)
# Every reason code (docs/results.md lists exactly these: tests/test_docs.py).
CODES = tuple(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str) and k not in
              {"ENQUEUE", "TRANSFORM", "COLLECT", "RECONCILE"})


def check_size(n_bytes: int) -> None:
    if n_bytes == 0:
        raise ImageRejected(ZERO_BYTE, "object is empty")
    if n_bytes > MAX_BYTES:
        raise ImageRejected(TOO_LARGE, f"{n_bytes} bytes > limit {MAX_BYTES}")
