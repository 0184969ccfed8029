"""Measure the out-of-distribution flag: does it fire on images that are not dermoscopic lesions?

    dermscore evaluate-ood --model models/default --data ../shared/data/ham10000 \\
        [--out models/default/evaluation/ood.json] [--per-kind 60]

The out-of-distribution set (:func:`generate`) is built from what Python packages ship
(offline) plus generated images, by kind:

* ``photo``: natural photographs (scikit-learn's ``load_sample_images``, matplotlib's sample
  ``grace_hopper.jpg``, and scikit-image's ``skimage.data`` photographs when it is installed),
  whole frames and random 4:3 crops;
* ``texture``: brick, grass and gravel close-ups (scikit-image), whole frames and crops;
* ``medical_other``: non-dermoscopic medical and microscopy images (scikit-image's retina fundus,
  microaneurysms, IHC stain, cell, phantom; matplotlib's MRI slice ``s1045.ima.gz``);
* ``graphic``: logos and rendered charts (matplotlib), colour charts, a chessboard, elevation
  maps drawn with a colour map;
* ``text_page``: rendered text pages (Pillow's default font, several sizes and colours) and
  scikit-image's ``page`` / ``text`` scans;
* ``solid``: all-black, all-white, grey and single-colour frames;
* ``gradient``: linear and radial colour gradients;
* ``noise``: uniform, Gaussian, grey, salt-and-pepper and smooth (blurred) noise;
* ``blurred_lesion``, ``overexposed_lesion``, ``underexposed_lesion``, ``inverted_lesion``:
  validation-split lesions, heavily blurred (Gaussian, radius 3-6 % of the width), brightened
  2-3x (clipped), darkened to 12-30 %, or inverted.

Every image is encoded (PNG) and goes through :func:`dermscore.imaging.decode`, as an upload does.

For each score (``energy``, ``msp`` = negated maximum softmax, ``mahalanobis``) the threshold is
the one the shipped flag uses: the 95 % quantile of the scores of the model's validation split
(:func:`training.ood.threshold`), so 95 % of validation images are kept. Reported per kind:
AUROC (validation vs that kind) and TNR at 95 % kept (the share of that kind flagged). The
Mahalanobis parameters are fitted on a subsample of the *training* split
(:func:`training.ood.fit_mahalanobis_for_model`), or read from the model's ``ood.npz`` when it
ships one; the validation images set only the thresholds. The validation kept-rate is also
cross-fitted by lesion (threshold from the other folds, applied to the held-out fold).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from dermscore import options

log = logging.getLogger("dermscore.ood_eval")

KINDS = ("photo", "texture", "medical_other", "graphic", "text_page", "solid", "gradient", "noise",
         "blurred_lesion", "overexposed_lesion", "underexposed_lesion", "inverted_lesion")
LESION_KINDS = KINDS[-4:]
SCORES = ("energy", "msp", "mahalanobis")
FRAME = (450, 600)  # (H, W) of generated frames: HAM10000's original size
PER_KIND = 60
SEED = 20261202
OOD_REPORT = "ood.json"

# scikit-image sample files (shipped in the wheel, read from its folder, never downloaded), by kind.
SKIMAGE_FILES = {
    "photo": ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png",
              "moon.png", "coins.png", "hubble_deep_field.jpg", "clock_motion.png"),
    "texture": ("brick.png", "grass.png", "gravel.png"),
    "medical_other": ("retina.jpg", "microaneurysms.png", "ihc.png", "cell.png", "phantom.png"),
    "graphic": ("logo.png", "color.png", "chessboard_RGB.png", "horse.png"),
    "text_page": ("page.png", "text.png"),
}
WORDS = ("lesion", "dermoscopy", "report", "patient", "clinic", "sample", "image", "score", "model",
         "result", "batch", "threshold", "probability", "invoice", "table", "summary", "meeting", "agenda",
         "figure", "page", "section", "appendix", "total", "date", "name", "address", "the", "of", "and",
         "to", "in", "is", "for", "on", "with", "as", "by", "at", "from")


@dataclass(frozen=True)
class OodImage:
    kind: str
    name: str
    data: bytes  # encoded (PNG), as uploaded


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    if im.mode in ("I;16", "I;16B", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-9) * 255
        im = Image.fromarray(a.astype(np.uint8))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _fit_side(rgb: np.ndarray, frame: tuple[int, int]) -> np.ndarray:
    """Resize so the image is about the frame's size (keeps aspect, clamps it to 3:1)."""
    h, w = rgb.shape[:2]
    if max(w, h) > 3 * min(w, h):  # keep within decode's aspect limit (4:1)
        rgb = rgb[: 3 * w] if h > w else rgb[:, : 3 * h]
        h, w = rgb.shape[:2]
    scale = max(frame) / max(h, w)
    size = (max(32, round(w * scale)), max(32, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


def _views(rgb: np.ndarray, n: int, rng: np.random.Generator, frame: tuple[int, int]) -> list[np.ndarray]:
    """The whole frame, then random 4:3 crops (35-100 % of the shorter side), some flipped."""
    out = [_fit_side(rgb, frame)]
    h, w = rgb.shape[:2]
    while len(out) < n:
        ch = int(min(h, w * 3 / 4) * rng.uniform(0.35, 1.0))
        cw = min(w, int(ch * 4 / 3))
        ch = max(32, min(ch, h))
        cw = max(32, min(cw, w))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = rgb[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(_fit_side(crop, frame))
    return out[:n]


def package_images() -> dict[str, list[tuple[str, np.ndarray]]]:
    """Sample images that ship with installed packages, by kind (no network)."""
    found: dict[str, list[tuple[str, np.ndarray]]] = {k: [] for k in KINDS}
    try:
        from sklearn.datasets import load_sample_images

        for fn, img in zip(load_sample_images().filenames, load_sample_images().images, strict=True):
            found["photo"].append((f"sklearn:{Path(fn).name}", np.asarray(img, dtype=np.uint8)))
    except Exception as exc:  # an optional source
        log.info("scikit-learn sample images unavailable: %s", exc)
    try:
        import gzip

        import matplotlib

        sample = Path(matplotlib.get_data_path()) / "sample_data"
        with Image.open(sample / "grace_hopper.jpg") as im:
            found["photo"].append(("matplotlib:grace_hopper.jpg", _rgb(im)))
        for name in ("logo2.png", "Minduka_Present_Blue_Pack.png"):
            with Image.open(sample / name) as im:
                found["graphic"].append((f"matplotlib:{name}", _rgb(im)))
        mri = np.frombuffer(gzip.decompress((sample / "s1045.ima.gz").read_bytes()), np.uint16).reshape(256, 256)
        mri = (mri.astype(np.float64) / max(int(mri.max()), 1) * 255).astype(np.uint8)
        found["medical_other"].append(("matplotlib:s1045.ima.gz", np.repeat(mri[:, :, None], 3, axis=2)))
        for name, key in (("jacksboro_fault_dem.npz", "elevation"), ("topobathy.npz", "topo")):
            with np.load(sample / name) as z:
                arr = np.asarray(z[key], dtype=np.float64)
            arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-9)
            cmap = matplotlib.colormaps["terrain" if key == "topo" else "gist_earth"]
            found["graphic"].append((f"matplotlib:{name}", (cmap(arr)[:, :, :3] * 255).astype(np.uint8)))
    except Exception as exc:
        log.info("matplotlib sample data unavailable: %s", exc)
    try:
        import skimage.data

        folder = Path(skimage.data.__file__).parent
        for kind, names in SKIMAGE_FILES.items():
            for name in names:
                if (folder / name).is_file():
                    with Image.open(folder / name) as im:
                        found[kind].append((f"skimage:{name}", _rgb(im)))
    except ImportError:
        log.info("scikit-image not installed: its sample images are left out")
    return found


def _chart(rng: np.random.Generator, frame: tuple[int, int], i: int) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = frame
    fig, ax = plt.subplots(figsize=(w / 100, h / 100), dpi=100)
    x = np.arange(30)
    kind = i % 4
    if kind == 0:
        for _ in range(3):
            ax.plot(x, np.cumsum(rng.normal(size=30)))
    elif kind == 1:
        ax.bar(list("abcdefg"), rng.uniform(1, 10, 7), color=rng.uniform(0, 1, (7, 3)))
    elif kind == 2:
        ax.scatter(rng.normal(size=200), rng.normal(size=200), c=rng.uniform(size=200), s=12)
    else:
        ax.hist(rng.normal(size=500), bins=25)
    ax.set_title(" ".join(rng.choice(WORDS, 3)))
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()
    plt.close(fig)
    return rgb


def _text_page(rng: np.random.Generator, frame: tuple[int, int]) -> np.ndarray:
    h, w = frame
    palettes = [((255, 255, 255), (0, 0, 0)), ((250, 245, 230), (40, 40, 60)), ((0, 0, 0), (255, 255, 255)),
                ((230, 240, 255), (10, 30, 120))]
    bg, fg = palettes[rng.integers(len(palettes))]
    im = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(im)
    size = int(rng.integers(max(6, h // 40), max(8, h // 12)))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    y = int(rng.integers(2, max(3, h // 10)))
    while y < h - size:
        line = " ".join(rng.choice(WORDS, int(rng.integers(3, 12))))
        draw.text((int(rng.integers(2, max(3, w // 10))), y), line, fill=fg, font=font)
        y += int(size * rng.uniform(1.2, 1.8))
    return np.asarray(im)


def _gradient(rng: np.random.Generator, frame: tuple[int, int], i: int) -> np.ndarray:
    h, w = frame
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if i % 2 == 0:  # linear, random direction
        t = rng.uniform(0, 2 * math.pi)
        s = xx * math.cos(t) + yy * math.sin(t)
    else:  # radial, random centre
        s = np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h))
    s = (s - s.min()) / max(s.max() - s.min(), 1e-9)
    return (a + (b - a) * s[:, :, None]).astype(np.uint8)


def _noise(rng: np.random.Generator, frame: tuple[int, int], i: int) -> np.ndarray:
    h, w = frame
    kind = i % 5
    if kind == 0:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == 1:
        return np.clip(rng.normal(128, 50, (h, w, 3)), 0, 255).astype(np.uint8)
    if kind == 2:
        return np.repeat(rng.integers(0, 256, (h, w, 1), dtype=np.uint8), 3, axis=2)
    if kind == 3:
        sp = np.where(rng.random((h, w, 1)) < 0.5, 0, 255).astype(np.uint8)
        return np.repeat(sp, 3, axis=2)
    small = Image.fromarray(rng.integers(0, 256, (max(4, h // 16), max(4, w // 16), 3), dtype=np.uint8))
    return np.asarray(small.resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(max(1, w // 60))))


def _solid(rng: np.random.Generator, frame: tuple[int, int], i: int) -> np.ndarray:
    h, w = frame
    fixed = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (64, 64, 64), (192, 192, 192), (16, 16, 16),
             (240, 240, 240)]
    colour = fixed[i] if i < len(fixed) else tuple(int(v) for v in rng.integers(0, 256, 3))
    return np.full((h, w, 3), colour, dtype=np.uint8)


def _lesion(kind: str, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "blurred_lesion":
        radius = rgb.shape[1] * rng.uniform(0.03, 0.06)
        return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius)))
    if kind == "overexposed_lesion":
        return np.clip(rgb.astype(np.float64) * rng.uniform(2.0, 3.0), 0, 255).astype(np.uint8)
    if kind == "underexposed_lesion":
        return (rgb.astype(np.float64) * rng.uniform(0.12, 0.30)).astype(np.uint8)
    if kind == "inverted_lesion":
        return 255 - rgb
    raise ValueError(kind)


def generate(lesions: list[tuple[str, np.ndarray]], per_kind: int = PER_KIND, frame: tuple[int, int] = FRAME,
             seed: int = SEED, kinds: tuple[str, ...] = KINDS,
             sources: dict[str, list[tuple[str, np.ndarray]]] | None = None) -> list[OodImage]:
    """The OOD evaluation set: ``per_kind`` images of each kind (fewer only where a kind's sources
    run out), encoded as PNG. ``lesions`` = (name, RGB uint8) of in-distribution images for the
    transformed-lesion kinds (each lesion used at most once per kind)."""
    rng = np.random.default_rng(seed)
    sources = package_images() if sources is None else sources
    out: list[OodImage] = []
    makers: dict[str, Callable[[int], np.ndarray]] = {
        "text_page": lambda i: _text_page(rng, frame),
        "solid": lambda i: _solid(rng, frame, i),
        "gradient": lambda i: _gradient(rng, frame, i),
        "noise": lambda i: _noise(rng, frame, i),
    }
    for kind in kinds:
        images: list[tuple[str, np.ndarray]] = []
        if kind in LESION_KINDS:
            order = rng.permutation(len(lesions))[:per_kind]
            images = [(lesions[j][0], _lesion(kind, lesions[j][1], rng)) for j in order]
        else:
            srcs = list(sources.get(kind, []))
            if kind == "graphic":
                srcs += [(f"chart{i}", _chart(rng, frame, i)) for i in range(max(1, per_kind // 3))]
            # Package images give views (whole frame + crops), spread evenly over the sources; a kind
            # that is also generated (text pages) takes a quarter of its images from packages.
            n_src = (per_kind if kind not in makers else min(per_kind // 4, 4 * len(srcs))) if srcs else 0
            for i, (name, rgb) in enumerate(srcs):
                k = n_src // len(srcs) + (i < n_src % len(srcs))
                images += [(f"{name}#{v}", img) for v, img in enumerate(_views(rgb, k, rng, frame))] if k else []
            if kind in makers:
                images += [(f"{kind}{i}", makers[kind](i)) for i in range(per_kind - n_src)]
        out += [OodImage(kind, name, _png(rgb)) for name, rgb in images[:per_kind]]
    return out


# ---- measurement ---------------------------------------------------------------------------

def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


def measure(in_scores: dict[str, np.ndarray], ood_scores: dict[str, np.ndarray], kinds: np.ndarray,
            kept: float, folds: np.ndarray | None = None) -> dict:
    """Per score and kind: AUROC and TNR at ``kept`` of in-distribution images; plus the
    cross-fitted kept rate (fold thresholds on held-out folds) when ``folds`` is given."""
    from training.ood import threshold

    result: dict = {}
    for score, ind in in_scores.items():
        out = ood_scores[score]
        thr = threshold(ind, kept)
        per_kind = {}
        for kind in dict.fromkeys(kinds.tolist()):
            m = kinds == kind
            per_kind[kind] = {"n": int(m.sum()), "auroc": auroc(ind, out[m]),
                              "tnr_at_95_kept": float((out[m] >= thr).mean())}
        entry = {
            "threshold": thr, "validation_flagged": float((ind >= thr).mean()),
            "all": {"n": int(len(out)), "auroc": auroc(ind, out), "tnr_at_95_kept": float((out >= thr).mean())},
            "mean_over_kinds": {"auroc": float(np.mean([v["auroc"] for v in per_kind.values()])),
                                "tnr_at_95_kept": float(np.mean([v["tnr_at_95_kept"] for v in per_kind.values()]))},
            "min_over_kinds_tnr_at_95_kept": float(min(v["tnr_at_95_kept"] for v in per_kind.values())),
            "per_kind": per_kind,
        }
        if folds is not None:
            kept_out, tnr_fold = [], []
            for f in np.unique(folds):
                t = threshold(ind[folds != f], kept)
                kept_out.append(float((ind[folds == f] < t).mean()))
                tnr_fold.append(float((out >= t).mean()))
            entry["cross_fitted"] = {
                "held_out_validation_kept": float(np.average(kept_out, weights=np.bincount(folds)[np.unique(folds)])),
                "held_out_validation_kept_per_fold": kept_out,
                "all_tnr_per_fold_threshold": tnr_fold,
            }
        result[score] = entry
    return result


def evaluate_ood(args: argparse.Namespace) -> dict:

    from batch.bundle import OOD_FILE, sha256_file
    from batch.ood import Mahalanobis
    from dermscore.imaging import decode
    from training import data as ham
    from training import features, ood
    from training.calibrate import lesion_folds, validation_features

    model, meta, model_dir, val, v, device = validation_features(args)
    md = ham.read_metadata(args.data)

    # Mahalanobis: the model's shipped parameters, else fitted here on training images.
    if meta.ood_method == "mahalanobis" and (model_dir / OOD_FILE).is_file():
        maha = Mahalanobis.load(model_dir / OOD_FILE)
        maha_info = {"source": f"{OOD_FILE} shipped with the model", "ood_sha256": sha256_file(model_dir / OOD_FILE),
                     **meta.extra.get("ood_fit", {})}
    else:
        means, precision, maha_info = ood.fit_mahalanobis_for_model(model_dir, args.data, args.fit_images,
                                                                    args.fit_seed, args.cache_dir, str(device),
                                                                    progress=not args.quiet)
        maha = Mahalanobis.from_precision(means, precision)
        maha_info = {"source": "fitted by this command (same procedure as calibrate-ood --method mahalanobis)",
                     **maha_info}
    fit_n, fit_seed = maha_info.get("fit_images_requested", args.fit_images), maha_info.get("fit_seed", args.fit_seed)
    fit_ids = set(ood.training_subsample(md, val.image_id, fit_n, fit_seed).image_id)
    assert not fit_ids & set(val.image_id), "a validation image was used to fit the Mahalanobis parameters"

    rng = np.random.default_rng(args.seed)
    lesion_rows = val.iloc[rng.permutation(len(val))[: args.per_kind * len(LESION_KINDS)]]
    lesions = []
    for r in lesion_rows.itertuples():
        with Image.open(r.path) as im:
            lesions.append((r.image_id, _rgb(im)))
    images = generate(lesions, args.per_kind, FRAME, args.seed)
    kinds = np.array([im.kind for im in images])
    names = [f"{im.kind}/{im.name}" for im in images]

    def compute_ood() -> dict[str, np.ndarray]:
        px = np.stack([decode(im.data, meta.input_size).pixels.transpose(2, 0, 1) for im in images])
        lg, ft = features.logits_and_features(model, meta.arch, px, device, progress=not args.quiet)
        return {"names": np.array(names), "logits": lg, "features": ft}

    digest = hashlib.sha256(b"".join(im.data for im in images)).hexdigest()
    o = features.cached(args.cache_dir, "ood-set", features.cache_key(meta.weights_sha256, meta.input_size, names,
                                                                       digest), compute_ood)

    def scores_of(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"energy": ood.energy(f["logits"]), "msp": ood.msp(f["logits"], meta.temperature),
                "mahalanobis": maha.score_numpy(f["features"])}

    folds = lesion_folds(val.lesion_id.to_numpy(), val.dx.to_numpy(), args.folds, args.fold_seed)
    result = measure(scores_of(v), scores_of(o), kinds, args.kept, folds)

    # In-distribution check at upload resolution: the 600x450 originals in fullres_sample against their
    # 200x150 copies (what the thresholds were set on), leaving out the images of the Mahalanobis fit.
    checks = {}
    full = [p for p in sorted((Path(args.data) / "fullres_sample").glob("*.jpg")) if p.stem not in fit_ids]
    copies = md.set_index("image_id").path
    full = [p for p in full if p.stem in copies.index]
    if full:
        def flagged(paths: list[Path]) -> dict[str, np.ndarray]:
            px = np.stack([decode(Path(p).read_bytes(), meta.input_size).pixels.transpose(2, 0, 1) for p in paths])
            lg, ft = features.logits_and_features(model, meta.arch, px, device)
            sc = scores_of({"logits": lg, "features": ft})
            return {s: sc[s] >= result[s]["threshold"] for s in SCORES}

        at_full, at_copy = flagged(full), flagged([copies[p.stem] for p in full])
        in_val = np.array([p.stem in set(val.image_id) for p in full])
        for label, m in (("validation_images", in_val), ("training_images", ~in_val)):
            if m.any():
                checks[f"fullres_sample_{label}"] = {
                    "n": int(m.sum()),
                    "flagged_at_600x450": {s: float(at_full[s][m].mean()) for s in SCORES},
                    "flagged_at_200x150": {s: float(at_copy[s][m].mean()) for s in SCORES}}
        checks["note"] = ("share of genuine HAM10000 images flagged, from the original 600x450 JPEG (what an upload "
                          "is) and from the 200x150 copy (what training, validation and the thresholds used); "
                          "training images were trained on, so their shares are optimistic")

    shipped = meta.ood_method
    best = max(SCORES, key=lambda s: (result[s]["mean_over_kinds"]["tnr_at_95_kept"], result[s]["all"]["auroc"]))
    report = {
        "model": {"name": meta.name, "version": meta.version, "weights_sha256": meta.weights_sha256,
                  "ood_method": shipped, "ood_threshold": meta.ood_threshold},
        "protocol": {
            "in_distribution": f"the model's validation split ({len(val)} images, lesion-grouped; never trained "
                               "on, not used to fit the Mahalanobis parameters)",
            "threshold": f"the {args.kept:.0%} quantile of each score on the validation split: {args.kept:.0%} of "
                         "validation images are kept (TPR95 convention); TNR = share of an OOD kind flagged",
            "kept": args.kept, "cross_fitted_folds": args.folds, "fold_seed": args.fold_seed,
            "scores": {s: ood.SCORE_DESCRIPTIONS[s] for s in SCORES},
            "mahalanobis_fit": maha_info,
            "ood_set": {"seed": args.seed, "per_kind": args.per_kind, "frame_hw": list(FRAME),
                        "kinds": {k: int((kinds == k).sum()) for k in KINDS},
                        "package_sources": sorted({n.split("#")[0] for n in names if ":" in n}),
                        "encoding": "PNG, decoded by dermscore.imaging.decode like an upload"},
            "package_versions": _versions(),
        },
        "scores": result,
        "in_distribution_checks": checks,
        "best_score": best,
    }
    out = Path(args.out) if args.out else model_dir / "evaluation" / OOD_REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s (best: %s)", out, best)
    return report


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "scikit-learn", "matplotlib", "scikit-image", "pillow", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def markdown(report: dict) -> str:
    """The card's table: AUROC / TNR at 95 % kept per kind, one column pair per score."""
    scores = list(report["scores"])
    head = "| kind | n | " + " | ".join(f"{s} AUROC | {s} TNR@95" for s in scores) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(scores)]
    kinds = list(report["scores"][scores[0]]["per_kind"])
    for kind in kinds:
        n = report["scores"][scores[0]]["per_kind"][kind]["n"]
        cells = " | ".join(f"{report['scores'][s]['per_kind'][kind]['auroc']:.3f} | "
                           f"{report['scores'][s]['per_kind'][kind]['tnr_at_95_kept']:.2f}" for s in scores)
        lines.append(f"| {kind} | {n} | {cells} |")
    for label, key in (("all (pooled)", "all"), ("mean over kinds", "mean_over_kinds")):
        n = report["scores"][scores[0]]["all"]["n"] if key == "all" else ""
        cells = " | ".join(f"**{report['scores'][s][key]['auroc']:.3f}** | "
                           f"**{report['scores'][s][key]['tnr_at_95_kept']:.2f}**" for s in scores)
        lines.append(f"| {label} | {n} | {cells} |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from training.ood import FIT_IMAGES, FIT_SEED, IN_DISTRIBUTION_KEPT

    options.add_model(p)
    options.add_data(p)
    p.add_argument("--out", type=Path, default=None, help=f"report JSON (default: MODEL/evaluation/{OOD_REPORT})")
    p.add_argument("--per-kind", type=int, default=PER_KIND, help="OOD images per kind")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the OOD set")
    p.add_argument("--kept", type=float, default=IN_DISTRIBUTION_KEPT, help="share of validation images kept")
    p.add_argument("--fit-images", type=int, default=FIT_IMAGES, help="training images of the Mahalanobis fit")
    p.add_argument("--fit-seed", type=int, default=FIT_SEED, help="seed of the fit images")
    p.add_argument("--folds", type=int, default=5, help="lesion folds for the cross-fitted kept rate")
    p.add_argument("--fold-seed", type=int, default=20261123, help="seed of the lesion folds")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("DERMSCORE_CACHE", "reports/cache")),
                   help="features cache (DERMSCORE_CACHE)")
    options.add_device(p)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    options.add_quiet(p)


def run(args: argparse.Namespace) -> None:
    report = evaluate_ood(args)
    print(markdown(report))
    print(f"best (mean TNR over kinds): {report['best_score']}; the model ships {report['model']['ood_method']}")
