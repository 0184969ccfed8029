"""SageMaker inference entry points: what the PyTorch serving container calls.

Per model and per request::

    model = model_fn(model_dir)                      # once per worker
    data  = input_fn(body, "application/jsonlines")  # manifest lines -> ManifestLine | BadLine
    pred  = predict_fn(data, model)                  # -> one OutputLine per input line
    body  = output_fn(pred, "application/jsonlines") # -> JSON Lines

The transform job uses ``SplitType=Line`` + ``BatchStrategy=MultiRecord``, so one request
carries many manifest lines and the response must carry exactly one line per input line, in
the same order. One unreadable image produces an error line; it never fails the request. The
work is done by :class:`batch.scorer.Scorer`.

Knobs (the SageMaker model's environment, ``TransformModel`` in template.yaml, all optional):
``DERMSCORE_DEVICE`` (default cuda when available), ``DERMSCORE_BATCH_SIZE`` (32 on CPU, 128
on CUDA), ``DERMSCORE_WORKERS`` (fetch/decode threads, default 4 x cores, max 32),
``DERMSCORE_GRADCAM`` (``high`` = heatmaps for high-risk images, ``all``, ``off``),
``DERMSCORE_RUNTIME`` (``auto``: PyTorch on CUDA, ONNX Runtime on the CPU from the archive's
``model.onnx``; ``torch``, ``onnx``: :mod:`batch.runtime`). A
request's wall time grows with its line count, so the model server's timeout
(``SAGEMAKER_MODEL_SERVER_TIMEOUT``) must cover MaxPayloadInMB worth of lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from batch import gradcam
from batch.model import pick_device
from batch.runtime import RUNTIME_ENV
from batch.scorer import BadLine, Scorer, make_s3_client
from dermscore.messages import ManifestLine, OutputLine

JSONLINES_TYPES = frozenset({"application/jsonlines", "application/x-jsonlines", "application/jsonl",
                             "application/json", "text/plain"})


# ---- manifest lines -> ManifestLine ---------------------------------------------------------

def parse_line(line: str) -> ManifestLine | BadLine:
    """One manifest line -> :class:`ManifestLine`, or a :class:`BadLine` that becomes an error line."""
    try:
        return ManifestLine.from_json(line)
    except ValueError as exc:
        return BadLine(line[:200], f"not JSON: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc))


def parse_manifest(body: bytes | bytearray | str) -> list[ManifestLine | BadLine]:
    """A request body (JSON Lines, or a JSON array) -> one entry per line.

    ``splitlines`` drops the final newline, so "a\\nb\\n" is two records; blank lines
    in the middle are kept as bad lines so the output stays aligned line-for-line.
    """
    text = body.decode("utf-8", errors="replace") if isinstance(body, (bytes, bytearray)) else str(body)
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            arr = json.loads(stripped)
        except ValueError:
            arr = None
        if isinstance(arr, list):
            return [parse_line(json.dumps(x)) for x in arr]
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [parse_line(ln) if ln.strip() else BadLine("", "empty line") for ln in lines]


def to_jsonlines(lines: Iterable[OutputLine]) -> str:
    """Output lines -> JSON Lines without a trailing newline (``AssembleWith=Line`` adds one per request)."""
    return "\n".join(line.to_json() for line in lines)


# ---- SageMaker serving contract -----------------------------------------------------------

def load_model(model_dir: str, env: Mapping[str, str]) -> Scorer:
    """The scorer the model's environment asks for (``env``: the container's, i.e. TransformModel's)."""
    heatmaps = env.get("DERMSCORE_GRADCAM", gradcam.DEFAULT_MODE).strip().lower() or gradcam.DEFAULT_MODE
    scorer = Scorer.from_model_dir(model_dir, device=pick_device(env.get("DERMSCORE_DEVICE")),
                                   batch_size=int(env.get("DERMSCORE_BATCH_SIZE", "0")) or None,
                                   workers=int(env.get("DERMSCORE_WORKERS", "0")) or None, heatmaps=heatmaps,
                                   runtime=env.get(RUNTIME_ENV) or "auto")
    scorer.s3 = make_s3_client(scorer.workers)  # once per worker process, shared by its threads
    return scorer


def model_fn(model_dir: str, context: Any = None) -> Scorer:
    """Load the model once per worker and create the one S3 client it will use."""
    return load_model(model_dir, os.environ)


def input_fn(request_body: bytes | str, request_content_type: str,
             context: Any = None) -> list[ManifestLine | BadLine]:
    ctype = (request_content_type or "application/jsonlines").split(";")[0].strip().lower()
    if ctype not in JSONLINES_TYPES:
        raise ValueError(f"unsupported content type {request_content_type!r}; send application/jsonlines")
    return parse_manifest(request_body)


def predict_fn(input_data: Iterable[ManifestLine | BadLine], model: Scorer, context: Any = None) -> list[OutputLine]:
    return list(model.score_items(input_data))


def output_fn(prediction: Iterable[OutputLine], accept: str | None = None, context: Any = None) -> str:
    ctype = (accept or "application/jsonlines").split(";")[0].strip().lower()
    if ctype not in JSONLINES_TYPES and ctype != "*/*":
        raise ValueError(f"unsupported accept type {accept!r}; ask for application/jsonlines")
    return to_jsonlines(prediction)
