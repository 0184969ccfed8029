"""Logits and pooled penultimate features of a set of images, computed once and cached.

Cross-fitting the calibration and measuring the OOD scores refit scalars many times on the same
forward passes; the forward pass is the only expensive step, so it runs once per (weights,
input size, images) and the arrays go to an ``.npz`` in a cache folder. The key is a hash of the
weights' sha256, the input size and the image names, so a changed model or image list never
reads a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from batch.model import forward_with_features

log = logging.getLogger("dermscore.features")

DEFAULT_CACHE = Path("reports/cache")


@torch.inference_mode()
def logits_and_features(model: torch.nn.Module, arch: str, pixels: np.ndarray, device: torch.device,
                        batch_size: int = 64, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, H, W) uint8 -> (logits (N, classes), features (N, d)), float32.

    The same network, input and autocast as ``training.train.predict_logits`` (eval mode,
    channels_last, AMP on CUDA), with the head's input caught on the way.
    """
    from tqdm import tqdm

    model.eval()
    logits, feats = [], []
    for i in tqdm(range(0, len(pixels), batch_size), desc="forward", unit="batch", disable=not progress,
                  mininterval=5.0):
        x = torch.from_numpy(np.ascontiguousarray(pixels[i:i + batch_size])).to(
            device, memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            lg, ft = forward_with_features(model, x, arch)
        logits.append(lg.float().cpu())
        feats.append(ft.float().cpu())
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()


def cache_key(weights_sha256: str, input_size: tuple[int, int], names: list[str], extra: str = "") -> str:
    blob = json.dumps({"weights": weights_sha256, "size": list(input_size), "names": names, "extra": extra})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached(cache_dir: Path | None, label: str, key: str,
           compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``compute()`` once; later calls with the same ``key`` read ``<cache_dir>/<label>-<key>.npz``.
    ``cache_dir`` None: no cache."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{label}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            log.info("cached %s: %s", label, path)
            return {k: z[k] for k in z.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)
    return arrays


def of_images(model: torch.nn.Module, meta, paths: list[str], names: list[str], device: torch.device,
              cache_dir: Path | None, label: str, progress: bool = False) -> dict[str, np.ndarray]:
    """Logits + features of image files (decoded by ``dermscore.imaging.decode``, as everywhere)."""
    from training import data as ham

    def compute() -> dict[str, np.ndarray]:
        pixels = ham.load_pixels(paths, meta.input_size, progress=progress)
        logits, feats = logits_and_features(model, meta.arch, pixels, device, progress=progress)
        return {"names": np.array(names), "logits": logits, "features": feats}

    key = cache_key(meta.weights_sha256, tuple(meta.input_size), names)
    return cached(cache_dir, label, key, compute)
