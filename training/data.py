"""HAM10000 on disk: metadata, image lookup, lesion-grouped split, in-memory cache.

Accepts the official download (``HAM10000_metadata.csv`` plus one or more
image folders) and this project's ``shared/data/ham10000`` layout
(``metadata.csv`` plus folders at several resolutions).
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from dermscore.imaging import decode
from dermscore.labels import CLASSES
from dermscore.options import UserError

log = logging.getLogger("dermscore.data")

METADATA_NAMES = ("HAM10000_metadata.csv", "metadata.csv", "HAM10000_metadata")
REQUIRED_COLUMNS = ("image_id", "dx")  # lesion_id too, where a split is made
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def find_metadata(data_dir: Path) -> Path | None:
    """The metadata CSV of ``data_dir``: a known name, else the one ``*.csv`` at its top level
    whose header has ``image_id`` and ``dx`` (HAM10000 style under any file name)."""
    known = next((data_dir / n for n in METADATA_NAMES if (data_dir / n).is_file()), None)
    if known is not None:
        return known
    candidates = []
    for f in sorted(data_dir.glob("*.csv")):
        with open(f, encoding="utf-8", errors="replace") as fh:
            header = {c.strip() for c in fh.readline().split(",")}
        if set(REQUIRED_COLUMNS) <= header:
            candidates.append(f)
    if len(candidates) > 1:
        raise UserError(f"several metadata CSVs in {data_dir} ({', '.join(c.name for c in candidates)}): "
                        f"rename the one to use to {METADATA_NAMES[1]}")
    return candidates[0] if candidates else None


def read_metadata(data_dir: Path) -> pd.DataFrame:
    """Metadata rows joined with the path of each image found under ``data_dir``.

    When an image exists in several folders (e.g. 200x150 copies and a few
    originals), the folder holding the most images wins, so one run trains
    on one consistent resolution.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"folder {data_dir} does not exist: pass --data with a HAM10000 folder")
    csv = find_metadata(data_dir)
    if csv is None:
        raise UserError(f"{data_dir} has no HAM10000 metadata CSV ({', '.join(METADATA_NAMES)}, or a .csv with "
                        f"columns {', '.join(REQUIRED_COLUMNS)}): pass --data with the folder that holds it")
    meta = pd.read_csv(csv)
    unknown = set(meta["dx"]) - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown diagnoses in {csv}: {sorted(unknown)}")

    by_folder: dict[str, dict[str, str]] = defaultdict(dict)
    for root, _, files in os.walk(data_dir):
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext.lower() in IMAGE_EXTS:
                by_folder[root][stem] = os.path.join(root, f)
    paths: dict[str, str] = {}
    for folder in sorted(by_folder, key=lambda d: -len(by_folder[d])):
        for stem, p in by_folder[folder].items():
            paths.setdefault(stem, p)
    meta["path"] = meta["image_id"].map(paths)
    missing = meta["path"].isna().sum()
    if missing:
        log.info("%d of %d metadata rows have no image under %s; they are left out", missing, len(meta), data_dir)
        meta = meta[meta["path"].notna()]
    if meta.empty:
        raise UserError(f"none of the images its metadata CSV names were found under {data_dir} "
                        f"(files named <image_id>.jpg or .png)")
    meta["label"] = meta["dx"].map(CLASSES.index)
    return meta.reset_index(drop=True)


def lesion_split(meta: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified by diagnosis, grouped by lesion: no lesion appears on both sides.

    HAM10000 has ~1.3 images per lesion; an image-level split would put views
    of the same lesion in training and validation and inflate every metric.
    """
    rng = random.Random(seed)
    lesion_dx = meta.groupby("lesion_id")["dx"].first()
    val_lesions: set[str] = set()
    for dx in CLASSES:
        lesions = sorted(lesion_dx[lesion_dx == dx].index)
        rng.shuffle(lesions)
        val_lesions.update(lesions[: round(val_fraction * len(lesions))])
    is_val = meta["lesion_id"].isin(val_lesions)
    return meta[~is_val].reset_index(drop=True), meta[is_val].reset_index(drop=True)


def load_pixels(paths: list[str], size: tuple[int, int], workers: int = 4, progress: bool = False) -> np.ndarray:
    """Decode every image once into an (N, 3, H, W) uint8 array.

    HAM10000 at training resolution fits in memory (8.5k x 86 KB), and
    decoding once instead of every epoch frees the CPU for the network.
    """
    def one(p: str) -> np.ndarray:
        with open(p, "rb") as f:
            return decode(f.read(), size).pixels.transpose(2, 0, 1)

    from tqdm import tqdm

    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(tqdm(pool.map(one, paths), total=len(paths), desc="decode", unit="img",
                                  disable=not progress, mininterval=1.0)))


def class_counts(labels: np.ndarray) -> np.ndarray:
    c = Counter(labels.tolist())
    return np.array([c.get(i, 0) for i in range(len(CLASSES))])
