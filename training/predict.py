"""Score local image files with the same code path the transform job uses.

    dermscore predict IMAGE... [--model models/default] [--json]

A quick look at what a model says about a few files, without S3 or the local
stack: the files go through :class:`batch.scorer.Scorer` (decode, batched
forward, calibrated probabilities, melanoma threshold), so the numbers are the
ones the pipeline would write to Parquet.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from dermscore import options
from dermscore.messages import OutputLine

log = logging.getLogger("dermscore.predict")

COLUMNS = ("file", "top class", "confidence", "p(mel)", "malignant", "risk", "melanoma flag")


def format_table(records: Iterable[OutputLine]) -> str:
    """Fixed-width table, one row per record; unreadable files show their reason code."""
    rows = []
    for r in records:
        if r.ok:
            rows.append((r.key, str(r.top_class), f"{r.confidence:.3f}", f"{(r.probabilities or {})['mel']:.3f}",
                         f"{r.malignant_prob:.3f}", str(r.risk_level), "YES" if r.melanoma_flag else "no"))
        else:
            rows.append((r.key, f"error: {r.reason}", "", "", "", "", (r.detail or "")[:60]))
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=False)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def predict(images: list[Path], model_dir: Path, as_json: bool, out: TextIO | None = None,
            device: str | None = None, batch_size: int | None = None, runtime: str | None = None) -> int:
    """Score ``images`` and write the table / JSON lines to ``out``; returns the number of errors.
    ``runtime``: what runs the forward pass (batch.runtime; None: $DERMSCORE_RUNTIME, else auto)."""
    from batch.runtime import RuntimeUnavailable
    from batch.scorer import Scorer

    out = out or sys.stdout   # looked up now: the caller may have replaced sys.stdout since import
    try:
        scorer = Scorer.from_model_dir(model_dir, device=device, batch_size=batch_size, runtime=runtime)
    except RuntimeUnavailable as exc:
        raise options.UserError(str(exc)) from exc
    if as_json:  # streamed: fine for thousands of files
        errors = 0
        for r in scorer.score_files(images):
            errors += not r.ok
            out.write(r.to_json() + "\n")
        return errors
    from tqdm import tqdm

    records = list(tqdm(scorer.score_files(images), total=len(images), desc="score", unit="img",
                        disable=len(images) < 10, file=sys.stderr))
    out.write(format_table(records))
    m = scorer.meta
    out.write(f"\nmodel {m.name} v{m.version} ({m.arch}); melanoma flag at p(mel) >= {m.melanoma_threshold:.3f}. "
              "Research use only, not a diagnosis.\n")
    return sum(not r.ok for r in records)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="JPEG/PNG files to score")
    options.add_model(p)
    p.add_argument("--json", action="store_true", help="print one JSON line per image (the transform output format)")
    options.add_device(p)
    options.add_runtime(p)
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the scorer's)")


def run(args: argparse.Namespace) -> int:
    missing = [p for p in args.images if not p.is_file()]
    if missing:
        raise options.UserError(f"{missing[0]} is not a file" + (f" (nor are {len(missing) - 1} more)" if
                                                                  len(missing) > 1 else "")
                                + ": pass the paths of JPEG or PNG files")
    errors = predict(args.images, args.model, args.json, device=args.device, batch_size=args.batch_size,
                     runtime=args.runtime)
    if errors:
        sys.stderr.write(f"{errors} of {len(args.images)} files could not be scored (their reasons are above)\n")
        return options.PARTIAL_FAILURE
    return 0
