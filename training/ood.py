"""Out-of-distribution / low-quality flag: the energy score and its threshold.

    dermscore calibrate-ood --model models/default [--data ../shared/data/ham10000]

Every scored image gets ``ood_score`` = energy = ``-logsumexp(logits)`` (Liu et al.,
"Energy-based Out-of-distribution Detection", NeurIPS 2020; T = 1 on the raw logits, before
temperature calibration). In-distribution images give large logits, hence low (very negative)
energy; photos that are not dermoscopic, blurred, over/under-exposed or otherwise unlike the
training data give higher energy. ``ood_flag`` is ``ood_score >= ModelMeta.ood_threshold``.

The threshold is set on the model's validation split (never trained on) so that
:data:`IN_DISTRIBUTION_KEPT` (95 %) of validation images pass: the flag fires on about 5 % of
ordinary HAM10000-like images and on most images unlike them. ``training.train`` sets it at the end
of training; this command sets it for an existing model directory from its
``validation_split.csv`` without retraining (only ``metadata.json`` changes, the weights and
their sha256 stay the same).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from batch.bundle import METADATA_FILE, ModelMeta

log = logging.getLogger("dermscore.ood")

IN_DISTRIBUTION_KEPT = 0.95
VALIDATION_SPLIT = "validation_split.csv"


def energy(logits: np.ndarray) -> np.ndarray:
    """Energy score per row of ``logits``: ``-logsumexp``, numerically stable."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))


def threshold(scores: np.ndarray, kept: float = IN_DISTRIBUTION_KEPT) -> float:
    """The ``kept`` quantile of in-distribution scores: that share of them stays unflagged."""
    scores = np.asarray(scores, dtype=np.float64)
    if not len(scores):
        raise ValueError("no validation scores to set the OOD threshold on")
    return float(np.quantile(scores, kept, method="higher"))


def summary(scores: np.ndarray, thr: float, kept: float) -> dict:
    s = np.asarray(scores, dtype=np.float64)
    return {"method": "energy", "score": "-logsumexp(logits), T=1", "in_distribution_kept": kept,
            "validation_images": int(len(s)), "validation_flagged": float((s >= thr).mean()),
            "validation_score_median": float(np.median(s)), "validation_score_p99": float(np.quantile(s, 0.99))}


def validation_paths(model_dir: Path, data_dir: Path) -> list[str]:
    """The image files of the model's validation split, found under ``data_dir``."""
    import pandas as pd

    from training import data as ham

    split = pd.read_csv(Path(model_dir) / VALIDATION_SPLIT)
    meta = ham.read_metadata(data_dir)
    paths = meta.set_index("image_id")["path"]
    found = [paths[i] for i in split["image_id"] if i in paths.index]
    if len(found) < len(split):
        log.warning("%d of %d validation images not found under %s", len(split) - len(found), len(split), data_dir)
    return found


def score_files(model_dir: Path, paths: list[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Energy scores of ``paths`` through the inference code path (decode, model, forward)."""
    import torch
    from tqdm import tqdm

    from batch.scorer import Scorer
    from dermscore.imaging import decode

    scorer = Scorer.from_model_dir(model_dir, device="cpu", batch_size=batch_size)
    out = []
    with tqdm(total=len(paths), desc="ood scores", unit="img", disable=not progress) as bar:
        for i in range(0, len(paths), batch_size):
            px = np.stack([decode(Path(p).read_bytes(), scorer.input_size).pixels for p in paths[i:i + batch_size]])
            out.append(scorer.forward_scored(torch.from_numpy(px))[:, -1].cpu().numpy())
            bar.update(len(px))
    return np.concatenate(out) if out else np.zeros(0)


def calibrate(model_dir: Path, data_dir: Path, kept: float = IN_DISTRIBUTION_KEPT, write: bool = True,
              progress: bool = True) -> ModelMeta:
    """Set ``ood_threshold`` of an existing model directory from its validation split."""
    model_dir = Path(model_dir)
    paths = validation_paths(model_dir, data_dir)
    scores = score_files(model_dir, paths, progress=progress)
    meta = ModelMeta.read(model_dir / METADATA_FILE)
    meta.ood_threshold = threshold(scores, kept)
    meta.extra = {**meta.extra, "ood": summary(scores, meta.ood_threshold, kept)}
    if write:
        meta.write(model_dir / METADATA_FILE)
    return meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=Path("models/default"),
                   help="model directory (with validation_split.csv)")
    p.add_argument("--data", type=Path, default=Path("../shared/data/ham10000"), help="HAM10000 folder")
    p.add_argument("--kept", type=float, default=IN_DISTRIBUTION_KEPT,
                   help="share of validation images left unflagged (default 0.95)")
    p.add_argument("--dry-run", action="store_true", help="print the threshold, do not write metadata.json")


def run(args: argparse.Namespace) -> int:
    if not (args.model / VALIDATION_SPLIT).is_file() or not (args.model / METADATA_FILE).is_file():
        sys.stderr.write(f"{args.model} needs {METADATA_FILE} and {VALIDATION_SPLIT} (written by dermscore train)\n")
        return 2
    meta = calibrate(args.model, args.data, args.kept, write=not args.dry_run)
    o = meta.extra["ood"]
    print(f"{args.model}: ood_threshold = {meta.ood_threshold:.4f} (energy; {o['validation_images']} validation "
          f"images, {o['validation_flagged']:.1%} flagged){' [dry run, not written]' if args.dry_run else ''}")
    return 0
