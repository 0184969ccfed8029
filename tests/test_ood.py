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
    model_dir = copy_model(tiny_model, tmp_path / "model")
    data, rows = ham_folder(tmp_path / "data", files, lambda i: "nv")
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


def ham_folder(data: Path, files: list[Path], dx_of) -> tuple[Path, list[str]]:
    """A HAM10000-style folder (images/ + metadata.csv, one lesion per image); returns the CSV rows."""
    (data / "images").mkdir(parents=True)
    rows = ["image_id,lesion_id,dx"]
    for i, f in enumerate(files):
        (data / "images" / f.name).write_bytes(f.read_bytes())
        rows.append(f"{f.stem},HAM_{i},{dx_of(i)}")
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    return data, rows


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_ood_set_generator_makes_and_scores_every_kind(tiny_model: Path) -> None:
    """Every kind of the OOD set is produced (tiny frames), decodes like an upload and gets scores."""
    import importlib.util

    from conftest import sample_images
    from PIL import Image

    from batch.scorer import Scorer
    from dermscore.imaging import decode
    from training import ood_eval

    lesions = []
    for f in sample_images(3):
        with Image.open(f) as im:
            lesions.append((f.stem, np.asarray(im.convert("RGB").resize((64, 48)))))
    images = ood_eval.generate(lesions, per_kind=3, frame=(48, 64), seed=1)
    kinds = np.array([im.kind for im in images])
    expected = set(ood_eval.KINDS) - (set() if importlib.util.find_spec("skimage") else {"texture"})
    assert set(kinds) == expected  # texture close-ups come only from scikit-image's samples
    assert all((kinds == k).sum() == 3 for k in expected)
    assert images == ood_eval.generate(lesions, per_kind=3, frame=(48, 64), seed=1)  # seeded
    scorer = Scorer.from_model_dir(tiny_model, device="cpu", batch_size=8)
    px = np.stack([decode(im.data, scorer.input_size).pixels for im in images])
    scored = torch.cat([scorer.forward_scored(torch.from_numpy(px[i:i + 8])) for i in range(0, len(px), 8)])
    assert scored.shape == (len(images), 8) and torch.isfinite(scored).all()
    inside = {"energy": np.random.default_rng(0).normal(size=40)}
    result = ood_eval.measure(inside, {"energy": scored[:, -1].numpy().astype(float)}, kinds, 0.95,
                              folds=np.arange(40) % 4)
    assert set(result["energy"]["per_kind"]) == expected
    assert all(0 <= v["auroc"] <= 1 and 0 <= v["tnr_at_95_kept"] <= 1 for v in result["energy"]["per_kind"].values())
    assert result["energy"]["validation_flagged"] == pytest.approx(0.05, abs=0.03)
    assert "| text_page | 3 |" in ood_eval.markdown({"scores": result})


def test_mahalanobis_score_is_the_distance_to_the_nearest_class_mean(tmp_path: Path) -> None:
    from batch.ood import Mahalanobis, save_mahalanobis

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 16))
    labels = rng.integers(0, 3, 200)
    feats += 4 * np.eye(16)[labels]
    means, precision = ood.fit_mahalanobis(feats, labels, 3)
    save_mahalanobis(tmp_path / "a.npz", means, precision)
    save_mahalanobis(tmp_path / "b.npz", means, precision)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()  # reproducible sha256
    maha = Mahalanobis.load(tmp_path / "a.npz")
    x = rng.normal(size=(10, 16)) * 3
    d = x[:, None, :] - means[None]
    expected = np.einsum("ncd,de,nce->nc", d, precision, d).min(axis=1)
    assert maha.score_numpy(x) == pytest.approx(expected, rel=1e-4)
    assert maha.score_numpy(means).max() < maha.score_numpy(means + 10).min()  # far from every mean = higher


def test_a_model_dir_with_mahalanobis_parameters_scores_and_ships_them(tiny_model: Path, tmp_path: Path) -> None:
    """calibrate-ood --method mahalanobis fits ood.npz on training images, sets the threshold on the
    validation split; the scorer, and the model archive, use the file its sha256 names."""
    import tarfile

    from conftest import sample_images

    from batch.bundle import OOD_FILE, sha256_file
    from batch.model import forward_with_features
    from batch.ood import Mahalanobis
    from batch.scorer import Scorer
    from dermscore.cli import main
    from dermscore.imaging import decode
    from infra.package import build_model_tarball

    files = sample_images(8)
    model_dir = copy_model(tiny_model, tmp_path / "model")
    data, rows = ham_folder(tmp_path / "data", files, lambda i: "nv" if i % 2 else "mel")
    (model_dir / ood.VALIDATION_SPLIT).write_text("\n".join(rows[:5]) + "\n")  # 4 validation, 4 training
    main(["calibrate-ood", "--model", str(model_dir), "--data", str(data), "--method", "mahalanobis",
          "--threads", "1"])
    meta = ModelMeta.read(model_dir / METADATA_FILE)
    assert meta.ood_method == "mahalanobis" and meta.ood_sha256 == sha256_file(model_dir / OOD_FILE)
    assert meta.extra["ood_fit"]["fit_images"] == 4 and meta.extra["ood"]["method"] == "mahalanobis"
    assert np.isfinite(meta.ood_threshold)

    scorer = Scorer.from_model_dir(model_dir, device="cpu", batch_size=4)
    recs = list(scorer.score_files(files[:4]))
    px = torch.from_numpy(np.stack([decode(f.read_bytes(), (64, 64)).pixels for f in files[:4]])).permute(0, 3, 1, 2)
    with torch.inference_mode():
        _, feats = forward_with_features(scorer.model, px, meta.arch)
    expected = Mahalanobis.load(model_dir / OOD_FILE).score_numpy(feats.numpy())
    assert [r.ood_score for r in recs] == pytest.approx(expected.tolist(), rel=1e-4)
    assert all(r.ood_flag == (r.ood_score >= meta.ood_threshold) for r in recs)

    with tarfile.open(build_model_tarball(model_dir, tmp_path / "model.tar.gz")) as tar:
        assert tar.extractfile(OOD_FILE).read() == (model_dir / OOD_FILE).read_bytes()
    (model_dir / OOD_FILE).write_bytes((model_dir / OOD_FILE).read_bytes() + b"x")
    with pytest.raises(ValueError, match="ood_sha256"):
        Scorer.from_model_dir(model_dir, device="cpu")
    (model_dir / OOD_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        Scorer.from_model_dir(model_dir, device="cpu")

    main(["calibrate-ood", "--model", str(model_dir), "--data", str(data), "--method", "energy", "--threads", "1"])
    back = ModelMeta.read(model_dir / METADATA_FILE)
    assert back.ood_method == "energy" and not back.ood_sha256 and "ood_fit" not in back.extra
    assert Scorer.from_model_dir(model_dir, device="cpu").mahalanobis is None


def test_old_metadata_means_the_energy_score(tiny_model: Path, tmp_path: Path) -> None:
    from batch.scorer import Scorer

    model_dir = copy_model(tiny_model, tmp_path / "old")
    raw = json.loads((model_dir / METADATA_FILE).read_text())
    for key in ("ood_method", "ood_sha256"):
        raw.pop(key, None)
    (model_dir / METADATA_FILE).write_text(json.dumps({**raw, "ood_threshold": -1.0}))
    scorer = Scorer.from_model_dir(model_dir, device="cpu")
    assert scorer.meta.ood_method == "energy" and scorer.meta.files() == ("model.pt", "metadata.json")
    x = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    with torch.inference_mode():
        energy = -torch.logsumexp(scorer._logits(x), 1)
    assert scorer.forward_scored(x)[:, -1].numpy() == pytest.approx(energy.numpy())
