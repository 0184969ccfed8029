"""Out-of-distribution scores computed in the container: energy, and Mahalanobis distance.

* ``energy``: ``-logsumexp(logits)`` on the raw logits (Liu et al., NeurIPS 2020). Needs nothing
  but the logits; every model directory has it.
* ``mahalanobis``: the squared Mahalanobis distance of the pooled penultimate features (the input
  of the classifier head) to the nearest class mean, with one covariance shared by the classes
  (Lee et al., NeurIPS 2018, without input perturbation). The class means and the precision
  matrix are fitted on training images (``training.ood.fit_mahalanobis``) and stored in
  ``ood.npz`` beside the weights (``batch.bundle.OOD_FILE``); ``metadata.json`` names the method
  (``ood_method``) and the file's sha256 (``ood_sha256``).

Higher means less like the training data for both, so the flag is ``score >= ood_threshold``
(``dermscore.scoring.ood_flag``) whichever the model uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def energy(logits: torch.Tensor) -> torch.Tensor:
    """(n, classes) -> (n,) energy score ``-logsumexp``."""
    return -torch.logsumexp(logits.float(), dim=1)


class Mahalanobis:
    """min over classes of ``(f - mu_c)^T P (f - mu_c)`` for pooled features ``f``.

    With ``P = L L^T`` (``L`` the lower Cholesky factor, which ``ood.npz`` stores) the quadratic
    form is ``||(f - mu_c) L||^2``, so scoring a batch is one (n, d) x (d, d) product plus a
    distance to the projected class means.
    """

    def __init__(self, means: np.ndarray, factor: np.ndarray, device: torch.device | str = "cpu") -> None:
        means, factor = np.asarray(means, dtype=np.float64), np.asarray(factor, dtype=np.float64)
        if means.ndim != 2 or factor.shape != (means.shape[1], means.shape[1]):
            raise ValueError(f"means {means.shape} and precision factor {factor.shape} do not match")
        self.dim = means.shape[1]
        self.factor = torch.as_tensor(factor, dtype=torch.float32, device=device)
        self.centres = torch.as_tensor(means @ factor, dtype=torch.float32, device=device)

    @classmethod
    def from_precision(cls, means: np.ndarray, precision: np.ndarray, device: torch.device | str = "cpu"
                       ) -> Mahalanobis:
        return cls(means, precision_factor(precision), device)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(n, d) features -> (n,) squared distance to the nearest class mean (float32)."""
        z = features.float().to(self.factor.device) @ self.factor
        return torch.cdist(z, self.centres).square().min(dim=1).values

    def score_numpy(self, features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.score(torch.as_tensor(np.asarray(features, dtype=np.float32))).numpy().astype(np.float64)

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu") -> Mahalanobis:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["means"], z["precision_cholesky"], device)


def precision_factor(precision: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor ``L`` of a precision matrix (``P = L L^T``)."""
    p = np.asarray(precision, dtype=np.float64)
    return np.linalg.cholesky((p + p.T) / 2)


def save_mahalanobis(path: Path | str, means: np.ndarray, precision: np.ndarray) -> None:
    """Write ``ood.npz``: ``means`` (classes, d) and ``precision_cholesky`` (d, d, lower triangular),
    float32. The precision is ``L @ L.T``. Compressed (half of ``L`` is zeros) and reproducible
    (fixed zip timestamps), so the same parameters always give the same sha256."""
    import io
    import zipfile

    arrays = {"means": np.asarray(means, dtype=np.float32),
              "precision_cholesky": np.tril(precision_factor(precision)).astype(np.float32)}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())
