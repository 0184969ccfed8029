"""Out-of-distribution score and threshold (training.ood), and the fields the scorer writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from batch.bundle import METADATA_FILE, ModelMeta
from training import ood

torch.set_num_threads(1)


def test_energy_is_minus_logsumexp_and_threshold_keeps_the_quantile() -> None:
    logits = np.array([[10.0, 0.0, 0.0], [0.1, 0.0, 0.2], [1000.0, 999.0, 0.0]])
    e = ood.energy(logits)
    assert e == pytest.approx(-torch.logsumexp(torch.tensor(logits), 1).numpy())
    assert e[0] < e[1]  # a confident image is less "out of distribution" than a flat one
    scores = np.arange(100, dtype=float)
    thr = ood.threshold(scores, 0.95)
    assert (scores >= thr).mean() == pytest.approx(0.05, abs=0.011)


def test_calibrate_an_existing_model_dir_from_its_validation_split(tiny_model: Path, tmp_path: Path) -> None:
    from conftest import sample_images

    files = sample_images(4)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in tiny_model.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = ["image_id,lesion_id,dx"]
    for i, f in enumerate(files):
        (data / "images" / f.name).write_bytes(f.read_bytes())
        rows.append(f"{f.stem},HAM_{i},nv")
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    (model_dir / ood.VALIDATION_SPLIT).write_text("\n".join(rows[:4]) + "\n")  # 3 of the 4 are validation
    weights_before = ModelMeta.read(model_dir / METADATA_FILE).weights_sha256
    meta = ood.calibrate(model_dir, data, progress=False)
    saved = ModelMeta.read(model_dir / METADATA_FILE)
    assert saved.ood_threshold == meta.ood_threshold and np.isfinite(saved.ood_threshold)
    assert saved.extra["ood"]["validation_images"] == 3 and saved.weights_sha256 == weights_before
    # the scorer now writes a flag, the image's sha256 and its processing time
    from batch.scorer import Scorer

    scorer = Scorer.from_model_dir(model_dir, device="cpu", batch_size=2)
    recs = list(scorer.score_files(files[:3]))
    for f, r in zip(files, recs, strict=False):
        assert r.image_sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
        assert r.processing_ms > 0 and isinstance(r.ood_flag, bool)
        assert r.ood_flag == (r.ood_score >= saved.ood_threshold)
    assert all(json.loads(r.to_json())["ood_flag"] == r.ood_flag for r in recs)


def test_metadata_without_ood_threshold_still_loads(tiny_model: Path) -> None:
    raw = json.loads((tiny_model / METADATA_FILE).read_text())
    raw.pop("ood_threshold", None)
    meta = ModelMeta(**{**raw, "input_size": tuple(raw["input_size"]), "classes": tuple(raw["classes"])})
    assert meta.ood_threshold is None
