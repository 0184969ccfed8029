"""Training code: lesion-grouped split and a tiny end-to-end training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from batch.model import load
from dermscore.cli import main
from dermscore.labels import CLASSES
from training import data as ham
from training.metrics import fit_temperature, melanoma_threshold, softmax

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


def test_lesion_folds_are_grouped_stratified_and_seeded() -> None:
    from training.calibrate import lesion_folds

    split = pd.read_csv(Path(__file__).resolve().parents[1] / "models" / "default" / "validation_split.csv")
    folds = lesion_folds(split.lesion_id.to_numpy(), split.dx.to_numpy(), 5, seed=3)
    assert set(folds) == set(range(5))
    assert (split.assign(fold=folds).groupby("lesion_id").fold.nunique() == 1).all()  # a lesion in one fold
    lesions = split.assign(fold=folds).drop_duplicates("lesion_id")
    per_class = lesions.groupby(["dx", "fold"]).size().unstack(fill_value=0)
    assert (per_class.max(axis=1) - per_class.min(axis=1) <= 1).all()  # every class dealt evenly
    assert (folds == lesion_folds(split.lesion_id.to_numpy(), split.dx.to_numpy(), 5, seed=3)).all()
    assert not (folds == lesion_folds(split.lesion_id.to_numpy(), split.dx.to_numpy(), 5, seed=4)).all()


def test_cross_fit_predicts_each_image_once_with_scalars_fitted_elsewhere() -> None:
    from training.calibrate import cross_fit, crossfit_report, lesion_folds
    from training.ood import energy

    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 7, n)
    labels[:60] = 4  # enough melanomas in every fold
    logits = rng.normal(size=(n, 7)) + 3.0 * np.eye(7)[labels]
    lesions = np.array([f"L{i // 2}" for i in range(n)])
    dx = np.array(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])[labels]
    dx = pd.Series(dx).groupby(lesions).transform("first").to_numpy()  # one diagnosis per lesion
    folds = lesion_folds(lesions, dx, 4)
    scores = {"energy": energy(logits)}
    cf = cross_fit(logits, labels, folds, scores, kept=0.95)
    assert sum(p["held_out_images"] for p in cf["per_fold"]) == n
    assert all(p["fit_images"] + p["held_out_images"] == n for p in cf["per_fold"])
    temps = {round(p["scalars"]["temperature"], 9) for p in cf["per_fold"]}
    assert len(temps) == 4  # each fold has its own fit
    assert 0.8 < cf["pooled"]["ood_kept"]["energy"] <= 1.0
    stored = {"temperature": 1.0, "melanoma_threshold": 0.5, "ood_threshold": {"energy": float(np.quantile(
        scores["energy"], 0.95))}}
    rep = crossfit_report(logits, labels, lesions, dx, scores, stored, 4, bootstrap=50)
    assert rep["protocol"]["ece_bins"] == 15
    for key, (lo, hi) in rep["cross_fitted"]["pooled_95ci"].items():
        assert lo <= hi, key
    for part in ("in_sample_stored_scalars", "in_sample_refitted_whole_split"):
        assert set(rep[part]) >= {"balanced_accuracy", "macro_auc", "melanoma_sensitivity_at_threshold",
                                  "melanoma_specificity_at_threshold", "ece", "per_class_recall", "scalars"}
    # the argmax does not depend on the temperature: balanced accuracy is the same in and out of sample
    assert rep["cross_fitted"]["pooled"]["balanced_accuracy"] == pytest.approx(
        rep["in_sample_stored_scalars"]["balanced_accuracy"])


def make_data_folder(root: Path, files: list[Path], dx: list[str]) -> Path:
    """A HAM10000-style folder: images (any resolution) + metadata.csv (the original header)."""
    (root / "images").mkdir(parents=True)
    rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    for i, (f, d) in enumerate(zip(files, dx, strict=True)):
        (root / "images" / f.name).write_bytes(f.read_bytes())
        rows.append(f"HAM_9{i:06d},{f.stem},{d},histo,50.0,male,back")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_calibrate_command_on_a_tiny_model(tiny_model: Path, tmp_path: Path) -> None:
    from conftest import sample_images

    files = sample_images(16)
    dx = ["mel", "nv", "bkl", "mel"] * 4
    data = make_data_folder(tmp_path / "data", files, dx)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in tiny_model.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    meta_df = pd.read_csv(data / "metadata.csv")
    meta_df[["image_id", "lesion_id", "dx"]].to_csv(model_dir / "validation_split.csv", index=False)
    before = (model_dir / "metadata.json").read_text()
    out = tmp_path / "eval"
    args = ["calibrate", "--model", str(model_dir), "--data", str(data), "--cross-fit", "2", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--bootstrap", "20", "--quiet"]
    main(args)
    rep = json.loads((out / "crossfit.json").read_text())
    assert rep["cross_fitted"]["pooled"]["n_images"] == 16 and len(rep["cross_fitted"]["per_fold"]) == 2
    assert (out / "crossfit.md").read_text().startswith("| metric |")
    assert (model_dir / "metadata.json").read_text() == before  # no --write: the model is untouched
    assert list((tmp_path / "cache").glob("validation-*.npz"))  # the forward pass is cached
    main([*args, "--write"])  # from the cache; stores the whole-split scalars
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["temperature"] == rep["in_sample_refitted_whole_split"]["scalars"]["temperature"]
    assert meta["ood_threshold"] is not None and meta["weights_sha256"] == json.loads(before)["weights_sha256"]


def test_evaluate_subset_all_on_any_folder_and_resolution(tiny_model: Path, tmp_path: Path) -> None:
    """`dermscore evaluate --subset all` on a folder of full-resolution images and a metadata CSV
    that the model has no validation split for: the same report keys as on the shipped split."""
    from conftest import sample_images

    files = sample_images(8)
    data = make_data_folder(tmp_path / "data", files, ["mel", "nv", "bkl", "bcc"] * 2)
    (data / "metadata.csv").rename(data / "ISIC_style_labels.csv")  # any name: the one CSV with the columns
    out = tmp_path / "eval"
    main(["evaluate", "--data", str(data), "--model", str(tiny_model), "--out", str(out), "--subset", "all",
          "--device", "cpu", "--threads", "1"])
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 8 and report["subset"] == "all"
    assert set(report) >= {"accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece", "per_class",
                           "confusion_matrix", "melanoma_sensitivity_at_specificity_0.80", "baselines", "model",
                           "melanoma_threshold", "melanoma_sensitivity_at_threshold",
                           "melanoma_specificity_at_threshold", "tta"}
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "confusion_matrix.png", "roc_curves.png"}


def test_cuda_training_path_amp_and_channels_last_run_on_the_cpu() -> None:
    """No GPU here: the policy is checked for both CUDA cases, and the step that CUDA runs
    (autocast, channels_last, the GradScaler) runs on the CPU with bf16 autocast."""
    from batch.model import build_network
    from training.train import amp_policy, train_step

    assert amp_policy(torch.device("cpu")) == (False, torch.bfloat16, False)
    assert amp_policy(torch.device("cuda"), bf16_supported=True) == (True, torch.bfloat16, False)
    assert amp_policy(torch.device("cuda"), bf16_supported=False) == (True, torch.float16, True)
    torch.manual_seed(0)
    model = build_network("efficientnet_lite0").to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model[1]._fc.weight.detach().clone()
    x, y = torch.randint(0, 256, (4, 3, 48, 64), dtype=torch.uint8).float(), torch.tensor([0, 1, 4, 5])
    for amp in ((True, torch.bfloat16, False), (False, torch.bfloat16, False)):
        loss = train_step(model, opt, torch.amp.GradScaler("cpu", enabled=amp[2]), torch.nn.CrossEntropyLoss(),
                          x, y, torch.device("cpu"), amp)
        assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert not torch.equal(before, model[1]._fc.weight)


def test_each_dataloader_worker_gets_its_own_augmentation_stream() -> None:
    from monai.data import Dataset
    from monai.data.utils import set_rnd

    from training.train import Augmented, augmentations

    ds = Dataset([{"x": np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8), "y": 1}],
                 transform=Augmented(augmentations()))
    views = []
    for seed in (1, 2, 1):
        set_rnd(ds, seed)  # what MONAI's worker_init_fn does in each worker
        views.append(ds[0][0])
    assert torch.equal(views[0], views[2]) and not torch.equal(views[0], views[1])


def test_the_decision_rule_has_one_definition() -> None:
    """The container (dermscore.scoring, through score_line), evaluate and calibrate
    (training.metrics.decisions) name the same top class; the probabilities are left as they are."""
    from dermscore import scoring
    from dermscore.messages import ManifestLine
    from training.metrics import decisions

    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(7) * 0.7, size=300)
    offsets = [0.45, 0.03, -0.5, 1.24, -0.52, -1.84, 1.14]
    vectorised = decisions(probs, offsets)
    assert (vectorised != probs.argmax(1)).any()
    for p, top in zip(probs, vectorised, strict=True):
        line = scoring.score_line(ManifestLine("b", "incoming/x.jpg", "e"), p.tolist(), {}, 0.5, 600, 450,
                                  class_offsets=offsets)
        assert scoring.top_class(p.tolist(), offsets) == top and line.top_class == CLASSES[top]
        assert line.probabilities == dict(zip(CLASSES, p.tolist(), strict=True)) and line.confidence == p[top]
    assert (decisions(probs, None) == probs.argmax(1)).all()
    assert scoring.top_class(probs[0].tolist()) == probs[0].argmax()


def test_class_offsets_correct_for_the_prior_and_only_when_it_pays() -> None:
    from training.metrics import balanced_accuracy_score, decisions, fit_class_offsets

    rng = np.random.default_rng(4)
    labels = rng.choice(7, size=2000, p=[0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    noisy = np.log(np.bincount(labels, minlength=7) / 2000)[None, :] + 2.5 * np.eye(7)[labels]
    probs = softmax(noisy + rng.normal(0, 1.6, noisy.shape))      # a prior-dominated classifier
    offsets = fit_class_offsets(probs, labels)
    assert offsets[3] > offsets[0] > offsets[5] and abs(sum(offsets)) < 1e-3    # rarer: larger offset
    assert balanced_accuracy_score(labels, decisions(probs, offsets)) > balanced_accuracy_score(labels,
                                                                                               probs.argmax(1))
    perfect = np.eye(7)[labels] * 0.9 + 0.1 / 7
    assert fit_class_offsets(perfect, labels) == [0.0] * 7                        # nothing to gain: no offsets


def test_shades_of_gray_removes_a_colour_cast_inside_the_network() -> None:
    from batch.model import build_network, shades_of_gray

    rng = torch.Generator().manual_seed(0)
    scene = torch.rand((1, 1, 32, 32), generator=rng) * 150 + 50
    cast = torch.cat([scene * 1.3, scene, scene * 0.6], dim=1)         # a warm illuminant
    balanced = shades_of_gray(cast, 6.0)
    means = balanced.mean(dim=(2, 3))[0]
    assert (means.max() - means.min()) / means.mean() < 0.05 < (cast.mean(dim=(2, 3))[0].std() / cast.mean())
    plain, constant = build_network("efficientnet_lite0"), build_network("efficientnet_lite0", color_constancy=6)
    assert plain.state_dict().keys() == constant.state_dict().keys()   # no weights: older models load as before
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(plain[0](x), x.float().div(127.5).sub(1.0))


def test_train_smoke_with_the_v3_recipe(tmp_path: Path) -> None:
    """EMA, label smoothing, two learning rates, colour constancy and the acquisition augmentation
    run, and the model folder records the recipe and loads with its colour constancy."""
    out = tmp_path / "v3"
    main(["train", "--data", str(DATA), "--out", str(out), "--limit", "120", "--epochs", "1", "--max-batches", "2",
          "--batch-size", "8", "--input-size", "64", "64", "--workers", "0", "--threads", "1", "--quiet",
          "--ema-decay", "0.9", "--label-smoothing", "0.1", "--backbone-lr-scale", "0.5", "--color-constancy", "6",
          "--acquisition-augment"])
    model, meta = load(out)
    assert meta.color_constancy == 6 and model[0].minkowski_p == 6
    assert meta.extra["recipe"]["ema_decay"] == 0.9 and meta.extra["recipe"]["acquisition_augment"] is True
