"""The shipped model: integrity against its model card, and quality above chance.

The evaluation runs on a fixed, stratified subset of the model's own
validation split (lesions it never trained on); the full-split figures are in
models/default/MODEL_CARD.md and reproduced by `dermscore evaluate`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from batch.bundle import METADATA_FILE, OOD_FILE, WEIGHTS_FILE, ModelMeta, sha256_file
from training.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default"
DATA = ROOT.parent / "shared" / "data" / "ham10000"


def test_weights_match_metadata_and_model_card() -> None:
    meta = ModelMeta.read(MODEL / METADATA_FILE)
    digest = sha256_file(MODEL / WEIGHTS_FILE)
    assert digest == meta.weights_sha256
    card = (MODEL / "MODEL_CARD.md").read_text()
    assert re.search(rf"\b{digest}\b", card), "MODEL_CARD.md does not state the weights' sha256"
    assert (MODEL / WEIGHTS_FILE).stat().st_size <= 30 * 1024 * 1024
    if meta.ood_method == "mahalanobis":  # the OOD parameters are tied to the metadata and the card too
        ood_digest = sha256_file(MODEL / OOD_FILE)
        assert ood_digest == meta.ood_sha256 and re.search(rf"\b{ood_digest}\b", card)
        assert (MODEL / OOD_FILE).stat().st_size <= 8 * 1024 * 1024


def test_the_evaluation_files_the_card_quotes_exist() -> None:
    import json

    crossfit = json.loads((MODEL / "evaluation" / "crossfit.json").read_text())
    ood = json.loads((MODEL / "evaluation" / "ood.json").read_text())
    meta = ModelMeta.read(MODEL / METADATA_FILE)
    assert crossfit["model"]["weights_sha256"] == ood["model"]["weights_sha256"] == meta.weights_sha256
    assert crossfit["cross_fitted"]["pooled"]["n_images"] == len((MODEL / "validation_split.csv").read_text()
                                                                 .splitlines()) - 1
    assert ood["model"]["ood_method"] == meta.ood_method and ood["model"]["ood_threshold"] == meta.ood_threshold


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def report(out: Path) -> dict:
    args = argparse.Namespace(data=DATA, model=MODEL, out=out, subset="validation",
                              limit=210, tta=False, seed=0, device="cpu", threads=1)
    return evaluate(args)


def test_quality_is_well_above_chance(report: dict) -> None:
    # Chance: balanced accuracy 1/7 = 0.143, AUC 0.5.
    assert report["n_images"] >= 200
    assert report["balanced_accuracy"] > 0.45
    assert report["macro_auc"] > 0.85
    assert report["melanoma_sensitivity_at_specificity_0.80"] > 0.5


def test_report_files_written(report: dict, out: Path) -> None:
    assert sum(m["support"] for m in report["per_class"].values()) == report["n_images"]
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "confusion_matrix.png", "roc_curves.png"}
    assert "balanced accuracy" in (out / "report.md").read_text()
