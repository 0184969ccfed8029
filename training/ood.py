"""Out-of-distribution / low-quality flag: the OOD score, its parameters and its threshold.

    dermscore calibrate-ood --model models/default [--data ../shared/data/ham10000]
    dermscore calibrate-ood --model models/default --method mahalanobis [--fit-images 1500]

Every scored image gets ``ood_score`` (:mod:`batch.ood`), higher = less like the training data:

* ``energy`` (default, and what metadata without ``ood_method`` means): ``-logsumexp(logits)``
  (Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020; T = 1 on the raw
  logits, before temperature calibration).
* ``mahalanobis``: squared Mahalanobis distance of the pooled penultimate features to the nearest
  class mean, shared covariance (Lee et al., NeurIPS 2018). ``--method mahalanobis`` fits the
  class means and a Ledoit-Wolf shrunk covariance on a seeded, class-stratified subsample of the
  *training* images (every metadata image not in ``validation_split.csv``), writes them to
  ``ood.npz`` and records ``ood_method`` and ``ood_sha256`` in ``metadata.json``.

``ood_flag`` is ``ood_score >= ModelMeta.ood_threshold``. How well each score separates
non-dermoscopic and degraded inputs is measured by ``dermscore evaluate-ood``
(:mod:`training.ood_eval`), not assumed.

The threshold is set on the model's validation split (never trained on) so that
:data:`IN_DISTRIBUTION_KEPT` (95 %) of validation images pass: by construction the flag fires on
about 5 % of ordinary HAM10000-like images; what share of other images it catches is what
``dermscore evaluate-ood`` measures. ``training.train`` sets an energy threshold at the end of
training; this command sets it for an existing model directory from its ``validation_split.csv``
without retraining (``metadata.json`` and, for Mahalanobis, ``ood.npz`` change; the weights and
their sha256 stay the same).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from batch.bundle import METADATA_FILE, OOD_FILE, ModelMeta, sha256_file
from dermscore import options

log = logging.getLogger("dermscore.ood")

IN_DISTRIBUTION_KEPT = 0.95
VALIDATION_SPLIT = "validation_split.csv"
FIT_IMAGES = 1500        # training images the Mahalanobis parameters are fitted on (subsample)
MIN_FIT_PER_CLASS = 60   # ... at least this many of each class (all of a class that has fewer)
FIT_SEED = 20261201
SCORE_DESCRIPTIONS = {
    "energy": "-logsumexp(logits), T=1",
    "mahalanobis": "min over classes of the squared Mahalanobis distance of the pooled penultimate features, "
                   "class means + Ledoit-Wolf shared covariance fitted on training images",
    "msp": "-max softmax(logits / T)",
}


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


def msp(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negated maximum softmax probability (Hendrycks & Gimpel 2017): higher = less confident."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    x = x - x.max(axis=1, keepdims=True)
    return -1.0 / np.exp(x).sum(axis=1)  # max softmax = exp(0) / sum(exp(x - max))


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the precision of the shared (within-class) covariance, Ledoit-Wolf shrunk.

    With ~1.5k images in 1280 dimensions the sample covariance is close to singular; shrinkage
    towards a scaled identity keeps its inverse stable.
    """
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    means = np.stack([x[labels == c].mean(axis=0) if (labels == c).any() else x.mean(axis=0)
                      for c in range(n_classes)])
    lw = LedoitWolf(assume_centered=True).fit(x - means[labels])
    return means, lw.precision_


def training_subsample(meta_df, validation_ids, n: int = FIT_IMAGES, seed: int = FIT_SEED,
                       min_per_class: int = MIN_FIT_PER_CLASS):
    """A seeded subsample of the training split (images not in the validation split), stratified
    by diagnosis with at least ``min_per_class`` images per class (all of a smaller class)."""
    import pandas as pd

    train = meta_df[~meta_df.image_id.isin(set(validation_ids))]
    if n <= 0 or n >= len(train):
        return train.reset_index(drop=True)
    share = train.dx.value_counts(normalize=True)
    parts = []
    for dx, g in sorted(train.groupby("dx"), key=lambda kv: kv[0]):
        k = min(len(g), max(round(n * share[dx]), min_per_class))
        parts.append(g.sample(n=k, random_state=seed))
    return pd.concat(parts).sort_values("image_id").reset_index(drop=True)


def fit_mahalanobis_for_model(model_dir: Path, data_dir: Path, n: int = FIT_IMAGES, seed: int = FIT_SEED,
                              cache_dir: Path | None = None, device: str = "cpu",
                              progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit the Mahalanobis parameters of a model directory on its training images' features."""
    import pandas as pd
    import torch

    from batch.model import load
    from training import data as ham
    from training import features

    model, meta = load(model_dir, device)
    split = pd.read_csv(Path(model_dir) / VALIDATION_SPLIT)
    fit = training_subsample(ham.read_metadata(data_dir), split.image_id, n, seed)
    f = features.of_images(model, meta, fit.path.tolist(), fit.image_id.tolist(), torch.device(device),
                           cache_dir, "train-fit", progress=progress)
    means, precision = fit_mahalanobis(f["features"], fit.label.to_numpy(), len(meta.classes))
    info = {"fit_images": int(len(fit)), "fit_images_requested": n, "fit_seed": seed,
            "fit_split": "training (not in validation_split.csv)",
            "fit_class_counts": {c: int((fit.dx == c).sum()) for c in meta.classes},
            "feature_dim": int(means.shape[1]), "covariance": "shared, Ledoit-Wolf shrinkage"}
    return means, precision, info


def write_mahalanobis(model_dir: Path, means: np.ndarray, precision: np.ndarray, info: dict) -> ModelMeta:
    """Write ``ood.npz`` and switch the model's metadata to it (the threshold must be set after)."""
    from batch.ood import save_mahalanobis

    model_dir = Path(model_dir)
    save_mahalanobis(model_dir / OOD_FILE, means, precision)
    meta = ModelMeta.read(model_dir / METADATA_FILE)
    meta.ood_method, meta.ood_sha256 = "mahalanobis", sha256_file(model_dir / OOD_FILE)
    meta.ood_threshold = None
    meta.extra = {**meta.extra, "ood_fit": info}
    meta.write(model_dir / METADATA_FILE)
    return meta


def summary(scores: np.ndarray, thr: float, kept: float, method: str = "energy") -> dict:
    s = np.asarray(scores, dtype=np.float64)
    return {"method": method, "score": SCORE_DESCRIPTIONS[method], "in_distribution_kept": kept,
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
    """OOD scores of ``paths`` through the inference code path (decode, model, forward): the
    model's own score (``ood_method``), as the transform writes it."""
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
    meta.extra = {**meta.extra, "ood": summary(scores, meta.ood_threshold, kept, meta.ood_method)}
    if write:
        meta.write(model_dir / METADATA_FILE)
    return meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model(p, "model folder (with validation_split.csv)")
    options.add_data(p)
    p.add_argument("--kept", type=float, default=IN_DISTRIBUTION_KEPT,
                   help="share of validation images left unflagged")
    p.add_argument("--dry-run", action="store_true", help="print the threshold, do not write metadata.json")
    p.add_argument("--method", choices=("keep", "energy", "mahalanobis"), default="keep",
                   help="OOD score: keep the model's (default), energy, or mahalanobis (fits and writes ood.npz "
                        "from training images first)")
    p.add_argument("--fit-images", type=int, default=FIT_IMAGES,
                   help="training images the Mahalanobis parameters are fitted on (0: all)")
    p.add_argument("--fit-seed", type=int, default=FIT_SEED, help="seed of the fit images")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache the training features here")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")


def run(args: argparse.Namespace) -> int:
    if not (args.model / VALIDATION_SPLIT).is_file() or not (args.model / METADATA_FILE).is_file():
        sys.stderr.write(f"{args.model} needs {METADATA_FILE} and {VALIDATION_SPLIT} (written by dermscore train)\n")
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.method != "keep" and args.dry_run:
        sys.stderr.write("--method changes the model directory; it cannot be a --dry-run\n")
        return 2
    if args.method == "mahalanobis":
        means, precision, info = fit_mahalanobis_for_model(args.model, args.data, args.fit_images, args.fit_seed,
                                                           args.cache_dir)
        write_mahalanobis(args.model, means, precision, info)
    elif args.method == "energy":
        meta = ModelMeta.read(args.model / METADATA_FILE)
        meta.ood_method, meta.ood_sha256 = "energy", ""
        meta.extra = {k: v for k, v in meta.extra.items() if k != "ood_fit"}
        meta.write(args.model / METADATA_FILE)
        (args.model / OOD_FILE).unlink(missing_ok=True)
    meta = calibrate(args.model, args.data, args.kept, write=not args.dry_run)
    o = meta.extra["ood"]
    print(f"{args.model}: ood_threshold = {meta.ood_threshold:.4f} ({o['method']}; {o['validation_images']} validation "
          f"images, {o['validation_flagged']:.1%} flagged){' [dry run, not written]' if args.dry_run else ''}")
    return 0
