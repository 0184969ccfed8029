"""Cross-fitted figures of a combination of models on their shared validation split (the model card's
ensemble and flip-TTA rows).

    .venv/bin/python scripts/crossfit_combo.py --model models/default [--model DIR ...] [--flips] \\
        [--data ../shared/data/ham10000] [--out FILE.json]

Every model must have been trained on the same lesion split (``dermscore train --split-seed``);
their ``validation_split.csv`` files are checked to be equal. The combination's logits are the mean
of the members' logits (each over four flips with ``--flips``), and its temperature, melanoma
threshold and decision rule are cross-fitted by lesion exactly as ``dermscore calibrate`` does
(training.calibrate.cross_fit), so no figure comes from the data that fitted a scalar.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from batch.model import load
from batch.runtime import make_engine
from dermscore import options
from training import data as ham
from training.calibrate import FOLD_SEED, cross_fit, lesion_folds
from training.evaluate import engine_logits, tta_logits

KEYS = ("balanced_accuracy", "macro_auc", "melanoma_sensitivity_at_threshold", "melanoma_specificity_at_threshold",
        "ece")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, action="append", required=True, help="a member (repeat for an ensemble)")
    p.add_argument("--data", type=Path, default=Path(options.DEFAULT_DATA))
    p.add_argument("--flips", action="store_true", help="mean logits over the four flips of each image")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()

    splits = [pd.read_csv(m / "validation_split.csv") for m in args.model]
    if any(not s.image_id.equals(splits[0].image_id) for s in splits[1:]):
        raise SystemExit("the members were not trained on the same lesion split (dermscore train --split-seed)")
    val = splits[0].merge(ham.read_metadata(args.data)[["image_id", "path", "label"]], on="image_id")
    members, cost = [], 0.0
    for model_dir in args.model:
        model, meta = load(model_dir, torch.device("cpu"))
        engine = make_engine(model, meta, torch.device("cpu"), model_dir, None)
        pixels = ham.load_pixels(val.path.tolist(), meta.input_size)
        t0 = time.process_time()
        members.append(tta_logits(engine, pixels) if args.flips else engine_logits(engine, pixels))
        cost += (time.process_time() - t0) * 1000 / len(val)
    logits = np.mean(members, axis=0)
    folds = lesion_folds(val.lesion_id.to_numpy(), val.dx.to_numpy(), args.folds, FOLD_SEED)
    cf = cross_fit(logits, val.label.to_numpy(), folds, {}, 0.95)
    report = {"members": [str(m) for m in args.model], "flips": args.flips, "images": len(val),
              "cpu_ms_per_image_forward": round(cost, 1),
              **{k: cf["pooled"][k] for k in KEYS},
              "balanced_accuracy_argmax": cf["pooled_argmax"]["balanced_accuracy"]}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
