"""Evaluate a model directory on HAM10000-style data and write a report.

    dermscore evaluate --data ../shared/data/ham10000 --model models/default --out reports/default

By default only the model's own validation split (``validation_split.csv``
beside the weights, written by training) is scored, so a model is never
graded on images it was trained on; pass ``--subset all`` for a separate,
held-out dataset. Outputs: ``report.json``, ``report.md``,
``confusion_matrix.png`` and ``roc_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from batch.model import load, pick_device
from batch.runtime import Engine, RuntimeUnavailable, make_engine
from dermscore import options
from dermscore.labels import CLASSES
from dermscore.options import UserError
from training import data as ham
from training.metrics import classification_report, softmax

log = logging.getLogger("dermscore.evaluate")
VALIDATION_SPLIT_FILE = "validation_split.csv"

# Figures reported by the seed project, for comparison only (not reproduced here,
# and not on this split): XGBoost on tabular features, and MONAI DenseNet121.
SEED_FIGURES = {
    "seed XGBoost (reported)": {"accuracy": 0.74, "macro_f1": 0.35},
    "seed MONAI DenseNet121 (reported)": {"macro_auc": 0.928},
}


def select_images(meta: pd.DataFrame, model_dir: Path, subset: str, limit: int, seed: int) -> pd.DataFrame:
    if subset == "validation":
        split_file = model_dir / VALIDATION_SPLIT_FILE
        if not split_file.exists():
            raise UserError(f"{split_file} is missing: evaluate with --subset all on data the model never saw")
        meta = meta[meta.image_id.isin(pd.read_csv(split_file).image_id)]
    if limit and limit < len(meta):
        # Stratified, deterministic subset: every class keeps its share (at least one image).
        per_class = (meta.dx.value_counts(normalize=True) * limit).clip(lower=1).round().astype(int)
        meta = pd.concat(g.sample(n=min(len(g), per_class[dx]), random_state=seed) for dx, g in meta.groupby("dx"))
    return meta.reset_index(drop=True)


def engine_logits(engine: Engine, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits of (n, 3, H, W) uint8 pixels (``training.data.load_pixels``) from the scoring runtime
    (batch.runtime, which takes NHWC batches): what the container would compute for them, so the
    report describes the runtime that serves."""
    out = [engine(torch.from_numpy(np.ascontiguousarray(pixels[i:i + batch_size].transpose(0, 2, 3, 1))))
           .logits.cpu().numpy() for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


def tta_logits(engine: Engine, pixels: np.ndarray) -> np.ndarray:
    """Mean logits over the four flips (dermoscopy has no canonical orientation)."""
    views = [pixels, pixels[:, :, ::-1], pixels[:, :, :, ::-1], pixels[:, :, ::-1, ::-1]]
    return np.mean([engine_logits(engine, v) for v in views], axis=0)


def baselines(labels: np.ndarray) -> dict:
    majority = np.bincount(labels, minlength=len(CLASSES)).argmax()
    probs = np.zeros((len(labels), len(CLASSES)))
    probs[:, majority] = 1.0
    rep = classification_report(probs, labels)
    return {
        f"majority class ({CLASSES[majority]})": {k: rep[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
        | {"macro_auc": 0.5},
        **SEED_FIGURES,
    }


def plot(report: dict, probs: np.ndarray, labels: np.ndarray, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    cm = np.array(report["confusion_matrix"])
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(len(CLASSES)), yticks=range(len(CLASSES)), xticklabels=CLASSES, yticklabels=CLASSES,
           xlabel="predicted", ylabel="true", title="Confusion matrix (row-normalised, counts shown)")
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(j, i, cm[i, j], ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black",
                    fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    for i, c in enumerate(CLASSES):
        if 0 < (labels == i).sum() < len(labels):
            fpr, tpr, _ = roc_curve(labels == i, probs[:, i])
            ax.plot(fpr, tpr, label=f"{c} (AUC {report['per_class'][c]['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="One-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc_curves.png", dpi=120)
    plt.close(fig)


def markdown(report: dict, meta_model: dict) -> str:
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        f"# Evaluation: {meta_model['name']} {meta_model['version']} ({meta_model['arch']})",
        "",
        f"Images: {report['n_images']} ({report['subset']} subset{', TTA' if report['tta'] else ''}).",
        "",
        "| metric | value |", "|---|---|",
        f"| balanced accuracy (mean per-class recall) | {f(report['balanced_accuracy'])} |",
        f"| macro AUC (one-vs-rest) | {f(report['macro_auc'])} |",
        f"| macro F1 | {f(report['macro_f1'])} |",
        f"| accuracy | {f(report['accuracy'])} |",
        f"| melanoma sensitivity at specificity 0.80 | {f(report['melanoma_sensitivity_at_specificity_0.80'])} |",
        f"| melanoma sensitivity / specificity at the stored threshold {f(report.get('melanoma_threshold'))} "
        f"| {f(report.get('melanoma_sensitivity_at_threshold'))} "
        f"/ {f(report.get('melanoma_specificity_at_threshold'))} |",
        f"| expected calibration error (15 bins) | {f(report['ece'])} |",
        "", "| class | precision | recall | F1 | AUC | support |", "|---|---|---|---|---|---|",
    ]
    for c, m in report["per_class"].items():
        lines.append(f"| {c} | {f(m['precision'])} | {f(m['recall'])} | {f(m['f1'])} | {f(m['auc'])} "
                     f"| {m['support']} |")
    lines += ["", "Baselines (for comparison):", "",
              "| baseline | accuracy | balanced accuracy | macro F1 | macro AUC |", "|---|---|---|---|---|"]
    for name, b in report["baselines"].items():
        lines.append(f"| {name} | {f(b.get('accuracy'))} | {f(b.get('balanced_accuracy'))} | {f(b.get('macro_f1'))} "
                     f"| {f(b.get('macro_auc'))} |")
    lines += ["", "![confusion matrix](confusion_matrix.png) ![ROC curves](roc_curves.png)", ""]
    return "\n".join(lines)


def evaluate(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    model, meta = load(args.model, device)
    try:
        engine = make_engine(model, meta, device, Path(args.model), getattr(args, "runtime", None))
    except RuntimeUnavailable as exc:
        raise UserError(str(exc)) from exc
    images = select_images(ham.read_metadata(args.data), Path(args.model), args.subset, args.limit, args.seed)
    log.info("evaluating %s on %d images (%s subset)", args.model, len(images), args.subset)
    pixels = ham.load_pixels(images.path.tolist(), meta.input_size, progress=True)
    labels = images.label.to_numpy()
    logits = tta_logits(engine, pixels) if args.tta else engine_logits(engine, pixels)
    probs = softmax(logits, meta.temperature)
    report = classification_report(probs, labels, mel_threshold=meta.melanoma_threshold,
                                   class_offsets=meta.class_offsets)
    report.update(subset=args.subset, tta=args.tta, baselines=baselines(labels),
                  model={"name": meta.name, "version": meta.version, "arch": meta.arch,
                         "weights_sha256": meta.weights_sha256, "input_size": list(meta.input_size)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report, report["model"]))
    plot(report, probs, labels, out)
    log.info("balanced accuracy %.3f, macro AUC %.3f -> %s", report["balanced_accuracy"] or float("nan"),
             report["macro_auc"] or float("nan"), out)
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_data(p)
    options.add_model(p)
    p.add_argument("--out", type=Path, default=Path("reports/evaluation"), help="folder for the report files")
    p.add_argument("--subset", choices=("validation", "all"), default="validation",
                   help="validation: the model's own held-out split; all: every image under --data")
    p.add_argument("--limit", type=int, default=0, help="stratified subset of this many images")
    p.add_argument("--tta", action="store_true", help="average over flips (test-time augmentation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    options.add_device(p)
    options.add_runtime(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")


def run(args: argparse.Namespace) -> None:
    report = evaluate(args)
    print(markdown(report, report["model"]))
