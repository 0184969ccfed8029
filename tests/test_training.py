"""Training code: lesion-grouped split and a tiny end-to-end training run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from batch.model import load
from dermscore.cli import main
from training import data as ham
from training.metrics import fit_temperature, melanoma_threshold

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"


@pytest.fixture(scope="module")
def metadata() -> pd.DataFrame:
    return ham.read_metadata(DATA)


def test_official_and_shared_layouts_resolve_one_folder(metadata: pd.DataFrame) -> None:
    assert len(metadata) == 8520
    # The complete 200x150 folder wins over the partial full-resolution ones.
    assert metadata.path.str.contains("images_200x150").all()


def test_split_is_grouped_by_lesion_and_stratified(metadata: pd.DataFrame) -> None:
    train, val = ham.lesion_split(metadata, 0.15, seed=1)
    assert not set(train.lesion_id) & set(val.lesion_id)
    assert len(train) + len(val) == len(metadata)
    share = val.dx.value_counts() / metadata.dx.value_counts()
    assert share.between(0.10, 0.20).all(), share  # every class represented in proportion


def test_temperature_and_threshold() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 7, (500,))
    wrong = torch.rand(500) < 0.3
    predicted = torch.where(wrong, torch.randint(0, 7, (500,)), labels)
    logits = torch.randn(500, 7) + 8.0 * torch.nn.functional.one_hot(predicted, 7)  # ~75% right, ~100% sure
    t = fit_temperature(logits.numpy(), labels.numpy())
    assert t > 1.0  # over-confident logits are softened
    p = torch.rand(100).numpy()
    is_mel = (torch.arange(100) % 2 == 0).numpy()
    thr = melanoma_threshold(p, is_mel, 0.85)
    assert (p[is_mel] >= thr).mean() >= 0.85


def test_train_smoke(tmp_path: Path) -> None:
    out = tmp_path / "model"
    main(["train", "--data", str(DATA), "--out", str(out), "--limit", "120", "--epochs", "1",
          "--max-batches", "2", "--batch-size", "8", "--input-size", "64", "64", "--workers", "0",
          "--threads", "1", "--quiet"])
    report = json.loads((out / "train_report.json").read_text())
    assert report["validation"]["n_images"] > 0 and len(report["history"]) == 1
    model, meta = load(out)
    assert meta.input_size == (64, 64) and meta.temperature > 0
    assert meta.ood_threshold is not None and meta.extra["ood"]["validation_images"] > 0
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 7)
    split = pd.read_csv(out / "validation_split.csv")
    assert not set(split.image_id) - set(ham.read_metadata(DATA).image_id)
