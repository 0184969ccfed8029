"""Calibration scalars and their out-of-sample figures (cross-fitting by lesion).

    dermscore calibrate --model models/default --data ../shared/data/ham10000 --cross-fit 5 \\
        [--out models/default/evaluation] [--write]

A model has three scalars fitted on its validation split: the softmax temperature, the melanoma
threshold (highest p(mel) threshold with sensitivity >= 0.85) and the OOD threshold (95 % of
validation images kept). Figures measured on the data that fitted them are optimistic. This
command cross-fits them: the validation split's *lesions* are dealt into K folds, stratified by
diagnosis with a fixed seed (:func:`lesion_folds`; all images of a lesion in one fold); for each
fold the three scalars are fitted on the other K-1 folds and applied to the held-out fold. Every
validation image is then predicted exactly once by scalars that did not see it, and the pooled
held-out predictions give the out-of-sample figures: balanced accuracy, macro AUC, per-class
recall, melanoma sensitivity / specificity at the fitted threshold, ECE (15 equal-width bins of
the top-class probability), and the share of held-out images the OOD flag keeps. The in-sample
figures (the model's stored scalars on the whole split, and the same procedure refitted on the
whole split) are reported beside them.

What ships (``--write``): the scalars fitted on the *whole* validation split (more data than any
fold), as ``dermscore train`` does; the cross-fitted figures are the honest estimate of how they
perform. Without ``--write`` the model directory is not changed. The forward pass runs once
(logits and features cached, :mod:`training.features`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from dermscore import options
from dermscore.labels import CLASSES, MELANOMA_INDEX

log = logging.getLogger("dermscore.calibrate")

CROSSFIT_REPORT = "crossfit.json"
ECE_BINS = 15
FOLD_SEED = 20261123
BOOTSTRAP = 1000  # lesion-level resamples for the 95 % intervals of the pooled figures


def lesion_folds(lesion_ids: np.ndarray, dx: np.ndarray, k: int, seed: int = FOLD_SEED) -> np.ndarray:
    """Fold index (0..k-1) per image: lesions dealt round-robin into k folds per diagnosis after a
    seeded shuffle (one generator, classes in the fixed ``CLASSES`` order), so each fold holds
    ~1/k of every class's lesions and all images of a lesion share a fold."""
    if k < 2:
        raise ValueError("cross-fitting needs at least 2 folds")
    lesion_ids, dx = np.asarray(lesion_ids), np.asarray(dx)
    first_dx: dict[str, str] = {}
    for les, d in zip(lesion_ids.tolist(), dx.tolist(), strict=True):
        first_dx.setdefault(les, d)
    rng = random.Random(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    for c in [*CLASSES, *sorted(set(first_dx.values()) - set(CLASSES))]:
        lesions = sorted(les for les, d in first_dx.items() if d == c)
        rng.shuffle(lesions)
        for i, les in enumerate(lesions):
            fold_of[les] = (offset + i) % k
        offset += len(lesions)  # the next class starts where this one stopped: folds stay even in size
    return np.array([fold_of[les] for les in lesion_ids.tolist()], dtype=np.int64)


def fit_scalars(logits: np.ndarray, labels: np.ndarray, ood_scores: dict[str, np.ndarray], kept: float) -> dict:
    """The scalars, by the same procedure as ``dermscore train`` (+ an OOD threshold per score, and
    the decision rule's class offsets, fitted on the calibrated probabilities)."""
    from training import ood
    from training.metrics import fit_class_offsets, fit_temperature, melanoma_threshold, softmax

    t = fit_temperature(logits, labels)
    probs = softmax(logits, t)
    return {"temperature": t,
            "melanoma_threshold": melanoma_threshold(probs[:, MELANOMA_INDEX], labels == MELANOMA_INDEX),
            "ood_threshold": {name: ood.threshold(s, kept) for name, s in ood_scores.items()},
            "class_offsets": fit_class_offsets(probs, labels)}


def figures(probs: np.ndarray, labels: np.ndarray, mel_flag: np.ndarray, ood_flag: dict[str, np.ndarray],
            bins: int = ECE_BINS, pred: np.ndarray | None = None) -> dict:
    """The reported figures for one set of predictions; thresholds and the decision rule enter only
    through the flags and ``pred`` (the top classes; None: argmax), so each image can carry those
    of the fold that predicted it."""
    from training.metrics import classification_report, expected_calibration_error

    rep = classification_report(probs, labels, pred=pred)
    is_mel = labels == MELANOMA_INDEX
    nll = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {
        "n_images": rep["n_images"],
        "balanced_accuracy": rep["balanced_accuracy"],
        "macro_auc": rep["macro_auc"],
        "accuracy": rep["accuracy"],
        "macro_f1": rep["macro_f1"],
        "melanoma_sensitivity_at_threshold": float(mel_flag[is_mel].mean()) if is_mel.any() else None,
        "melanoma_specificity_at_threshold": float((~mel_flag[~is_mel]).mean()) if (~is_mel).any() else None,
        "melanoma_sensitivity_at_specificity_0.80": rep["melanoma_sensitivity_at_specificity_0.80"],
        "ece": expected_calibration_error(probs, labels, bins),
        "nll": nll,
        "ood_kept": {name: float((~f).mean()) for name, f in ood_flag.items()},
        "per_class_recall": {c: rep["per_class"][c]["recall"] for c in CLASSES},
        "per_class_auc": {c: rep["per_class"][c]["auc"] for c in CLASSES},
        "per_class_support": {c: rep["per_class"][c]["support"] for c in CLASSES},
    }


def bootstrap_intervals(probs: np.ndarray, labels: np.ndarray, mel_flag: np.ndarray, lesion_ids: np.ndarray,
                        n: int = BOOTSTRAP, seed: int = 0, bins: int = ECE_BINS,
                        pred: np.ndarray | None = None) -> dict:
    """95 % percentile intervals of the pooled figures, resampling *lesions* with replacement
    (images of a lesion are not independent). The fitted scalars are held fixed: this is the
    sampling uncertainty of the evaluation set, not of the fit."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from training.metrics import expected_calibration_error

    _, group = np.unique(lesion_ids, return_inverse=True)
    members = [np.flatnonzero(group == g) for g in range(group.max() + 1)]
    rng = np.random.default_rng(seed)
    pred = probs.argmax(1) if pred is None else pred
    keys = ("balanced_accuracy", "macro_auc", "melanoma_sensitivity_at_threshold",
            "melanoma_specificity_at_threshold", "ece")
    draws: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        p, y, f = probs[idx], labels[idx], mel_flag[idx]
        is_mel = y == MELANOMA_INDEX
        draws["balanced_accuracy"].append(balanced_accuracy_score(y, pred[idx]))
        draws["macro_auc"].append(np.mean([roc_auc_score(y == c, p[:, c]) for c in range(p.shape[1])
                                           if 0 < (y == c).sum() < len(y)]))
        draws["melanoma_sensitivity_at_threshold"].append(f[is_mel].mean() if is_mel.any() else np.nan)
        draws["melanoma_specificity_at_threshold"].append((~f[~is_mel]).mean() if (~is_mel).any() else np.nan)
        draws["ece"].append(expected_calibration_error(p, y, bins))
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in draws.items()}


def cross_fit(logits: np.ndarray, labels: np.ndarray, folds: np.ndarray, ood_scores: dict[str, np.ndarray],
              kept: float, bins: int = ECE_BINS, lesion_ids: np.ndarray | None = None,
              bootstrap: int = 0) -> dict:
    """Fit on K-1 folds, apply to the held-out one; figures of the pooled held-out predictions
    (``pooled``: with the decision rule of each fold; ``pooled_argmax``: the plain argmax)."""
    from training.metrics import decisions, softmax

    n = len(labels)
    probs = np.zeros((n, len(CLASSES)))
    pred = np.zeros(n, dtype=np.int64)
    mel_flag = np.zeros(n, dtype=bool)
    ood_flag = {name: np.zeros(n, dtype=bool) for name in ood_scores}
    per_fold = []
    for f in np.unique(folds):
        fit, held = folds != f, folds == f
        s = fit_scalars(logits[fit], labels[fit], {k: v[fit] for k, v in ood_scores.items()}, kept)
        probs[held] = softmax(logits[held], s["temperature"])
        pred[held] = decisions(probs[held], s["class_offsets"])
        mel_flag[held] = probs[held, MELANOMA_INDEX] >= s["melanoma_threshold"]
        for name, v in ood_scores.items():
            ood_flag[name][held] = v[held] >= s["ood_threshold"][name]
        fig = figures(probs[held], labels[held], mel_flag[held], {k: v[held] for k, v in ood_flag.items()}, bins,
                      pred[held])
        per_fold.append({"fold": int(f), "fit_images": int(fit.sum()), "held_out_images": int(held.sum()),
                         "held_out_lesions_by_class": {}, "scalars": s, "held_out": fig})
    pooled = figures(probs, labels, mel_flag, ood_flag, bins, pred)
    keys = ("balanced_accuracy", "macro_auc", "melanoma_sensitivity_at_threshold",
            "melanoma_specificity_at_threshold", "ece")
    spread = {k: {"mean": float(np.mean([p["held_out"][k] for p in per_fold if p["held_out"][k] is not None])),
                  "min": float(np.min([p["held_out"][k] for p in per_fold if p["held_out"][k] is not None])),
                  "max": float(np.max([p["held_out"][k] for p in per_fold if p["held_out"][k] is not None]))}
              for k in keys}
    out = {"pooled": pooled, "pooled_argmax": figures(probs, labels, mel_flag, ood_flag, bins),
           "per_fold_spread": spread, "per_fold": per_fold}
    if bootstrap and lesion_ids is not None:
        out["pooled_95ci"] = bootstrap_intervals(probs, labels, mel_flag, lesion_ids, bootstrap, bins=bins, pred=pred)
        out["pooled_95ci_method"] = f"{bootstrap} lesion-level bootstrap resamples, percentile interval"
    return out


def crossfit_report(logits: np.ndarray, labels: np.ndarray, lesion_ids: np.ndarray, dx: np.ndarray,
                    ood_scores: dict[str, np.ndarray], stored: dict, k: int, seed: int = FOLD_SEED,
                    kept: float = 0.95, bins: int = ECE_BINS, bootstrap: int = BOOTSTRAP) -> dict:
    """Everything ``crossfit.json`` holds (see the module docstring)."""
    from training.metrics import softmax

    folds = lesion_folds(lesion_ids, dx, k, seed)
    cf = cross_fit(logits, labels, folds, ood_scores, kept, bins, lesion_ids, bootstrap)
    for p in cf["per_fold"]:
        held = folds == p["fold"]
        p["held_out_lesions_by_class"] = {c: int(len(set(lesion_ids[held & (dx == c)]))) for c in CLASSES}
    whole = fit_scalars(logits, labels, ood_scores, kept)

    def in_sample(s: dict) -> dict:
        from training.metrics import decisions

        probs = softmax(logits, s["temperature"])
        flags = {name: v >= s["ood_threshold"][name] for name, v in ood_scores.items()
                 if s["ood_threshold"].get(name) is not None}
        return {"scalars": s, **figures(probs, labels, probs[:, MELANOMA_INDEX] >= s["melanoma_threshold"], flags,
                                        bins, decisions(probs, s.get("class_offsets")))}

    return {
        "protocol": {
            "data": "the model's validation split (validation_split.csv; lesion-grouped, never trained on)",
            "folds": k, "fold_seed": seed, "grouping": "lesion_id (all images of a lesion in one fold)",
            "stratification": "dx (lesions dealt round-robin per class after a seeded shuffle)",
            "fitted_per_fold": ["temperature (NLL, LBFGS)", "melanoma_threshold (highest p(mel) threshold with "
                                "sensitivity >= 0.85 on the fitting folds)",
                                f"ood_threshold per score ({kept:.0%} of the fitting folds kept)"],
            "ece_bins": bins, "ece": f"{bins} equal-width bins of the top-class probability, weighted by count",
            "decision_rule": "top class = argmax of log p + per-class offsets, the offsets fitted on the fitting "
                             "folds for balanced accuracy (coordinate ascent, training.metrics.fit_class_offsets); "
                             "pooled_argmax: the same probabilities with the plain argmax",
            "pooled": "each validation image predicted once, by the scalars of the fold that held it out",
        },
        "cross_fitted": cf,
        "in_sample_stored_scalars": in_sample(stored),
        "in_sample_refitted_whole_split": in_sample(whole),
        "ships": "scalars fitted on the whole validation split (in_sample_stored_scalars.scalars); the "
                 "cross_fitted figures estimate how they perform on data that fixed none of them",
    }


def markdown(report: dict) -> str:
    """The card's table: in-sample vs cross-fitted figures."""
    ins, cf = report["in_sample_stored_scalars"], report["cross_fitted"]["pooled"]
    spread = report["cross_fitted"]["per_fold_spread"]

    def f(x: float | None, d: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{d}f}"

    ci = report["cross_fitted"].get("pooled_95ci", {})

    def rng(key: str) -> str:
        return f"{spread[key]['min']:.3f}–{spread[key]['max']:.3f}" if key in spread else ""

    def interval(key: str) -> str:
        return f"{ci[key][0]:.3f}–{ci[key][1]:.3f}" if key in ci else ""

    rows = [("balanced accuracy", "balanced_accuracy"), ("macro AUC", "macro_auc"),
            ("melanoma sensitivity at the stored threshold", "melanoma_sensitivity_at_threshold"),
            ("melanoma specificity at the stored threshold", "melanoma_specificity_at_threshold"),
            ("melanoma sensitivity at specificity 0.80 (ROC)", "melanoma_sensitivity_at_specificity_0.80"),
            (f"ECE ({report['protocol']['ece_bins']} bins)", "ece"), ("NLL", "nll"), ("accuracy", "accuracy")]
    k = report["protocol"]["folds"]
    lines = [f"| metric | in-sample (stored scalars) | cross-fitted ({k} lesion folds, pooled) | 95 % CI "
             "(lesion bootstrap) | range over folds |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {f(ins[key])} | **{f(cf[key])}** | {interval(key)} | {rng(key)} |" for label, key in rows]
    for name in cf["ood_kept"]:
        lines.append(f"| validation images kept by the OOD flag ({name}) | {f(ins['ood_kept'].get(name))} "
                     f"| **{f(cf['ood_kept'][name])}** | | |")
    lines += ["", "| class | recall | AUC in-sample | AUC cross-fitted | support |", "|---|---|---|---|---|"]
    for c in CLASSES:
        lines.append(f"| {c} | {f(cf['per_class_recall'][c])} | {f(ins['per_class_auc'][c])} "
                     f"| {f(cf['per_class_auc'][c])} | {cf['per_class_support'][c]} |")
    return "\n".join(lines) + "\n"


def validation_features(args: argparse.Namespace) -> tuple[Any, Any, Path, Any, dict, Any]:
    """(model, meta, model dir, validation rows, their cached logits + features, device) for the
    model's own validation split: what both the cross-fit and the OOD evaluation start from."""
    import pandas as pd
    import torch

    from batch.model import load, pick_device
    from training import data as ham
    from training import features, ood

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model_dir = Path(args.model)
    model, meta = load(model_dir, device)
    split = pd.read_csv(model_dir / ood.VALIDATION_SPLIT)
    md = ham.read_metadata(args.data)
    val = split[["image_id", "lesion_id", "dx"]].merge(md[["image_id", "path", "label"]], on="image_id")
    if len(val) < len(split):
        log.warning("%d of %d validation images not found under %s", len(split) - len(val), len(split), args.data)
    v = features.of_images(model, meta, val.path.tolist(), val.image_id.tolist(), device, args.cache_dir,
                           "validation", progress=not args.quiet)
    return model, meta, model_dir, val, v, device


def calibrate(args: argparse.Namespace) -> dict:
    from batch.bundle import METADATA_FILE, OOD_FILE
    from batch.ood import Mahalanobis
    from training import ood

    model, meta, model_dir, val, v, device = validation_features(args)
    scores = {"energy": ood.energy(v["logits"])}
    if meta.ood_method == "mahalanobis":
        scores["mahalanobis"] = Mahalanobis.load(model_dir / OOD_FILE).score_numpy(v["features"])
    stored = {"temperature": meta.temperature, "melanoma_threshold": meta.melanoma_threshold,
              "ood_threshold": {name: (meta.ood_threshold if name == meta.ood_method else None) for name in scores},
              "class_offsets": list(meta.class_offsets) if meta.class_offsets else None}
    report = crossfit_report(v["logits"], val.label.to_numpy(), val.lesion_id.to_numpy(), val.dx.to_numpy(), scores,
                             stored, args.cross_fit, args.fold_seed, args.kept, args.ece_bins, args.bootstrap)
    report["model"] = {"name": meta.name, "version": meta.version, "weights_sha256": meta.weights_sha256,
                       "ood_method": meta.ood_method}
    out = Path(args.out) if args.out else model_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    (out / CROSSFIT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    (out / "crossfit.md").write_text(markdown(report))
    if args.write:
        whole = report["in_sample_refitted_whole_split"]["scalars"]
        meta.temperature, meta.melanoma_threshold = whole["temperature"], whole["melanoma_threshold"]
        meta.class_offsets = tuple(whole["class_offsets"])
        meta.ood_threshold = whole["ood_threshold"][meta.ood_method]
        meta.extra = {**meta.extra, "ood": ood.summary(scores[meta.ood_method], meta.ood_threshold, args.kept,
                                                       meta.ood_method)}
        meta.write(model_dir / METADATA_FILE)
        log.info("wrote the whole-split scalars to %s", model_dir / METADATA_FILE)
    log.info("wrote %s", out / CROSSFIT_REPORT)
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    from training.ood import IN_DISTRIBUTION_KEPT

    options.add_model(p)
    options.add_data(p)
    p.add_argument("--cross-fit", type=int, default=5, metavar="K", help="lesion folds")
    p.add_argument("--fold-seed", type=int, default=FOLD_SEED, help="seed of the lesion folds")
    p.add_argument("--kept", type=float, default=IN_DISTRIBUTION_KEPT, help="OOD: share of validation kept")
    p.add_argument("--ece-bins", type=int, default=ECE_BINS, help="bins of the expected calibration error")
    p.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help="lesion-level resamples for 95 %% intervals")
    p.add_argument("--out", type=Path, default=None, help="folder for crossfit.json (default: MODEL/evaluation)")
    p.add_argument("--write", action="store_true",
                   help="store the scalars refitted on the whole validation split in metadata.json")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("DERMSCORE_CACHE", "reports/cache")),
                   help="features cache (DERMSCORE_CACHE)")
    options.add_device(p)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    options.add_quiet(p)


def run(args: argparse.Namespace) -> None:
    report = calibrate(args)
    print(markdown(report))
