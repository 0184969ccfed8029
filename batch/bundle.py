"""The model directory format: ``model.pt`` + ``metadata.json``, and the sha256 that ties them.

Torch-free on purpose: packaging, publishing and the demo read a model's description without
importing torch (``batch.model`` loads the weights). The MONAI-bundle idea: a model never travels
without its description (architecture, classes, input size, calibration, thresholds, weights hash).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dermscore.labels import CLASSES

WEIGHTS_FILE = "model.pt"
METADATA_FILE = "metadata.json"
# Optional: the parameters of a feature-space OOD score (batch.ood), present when ood_method needs them.
OOD_FILE = "ood.npz"
OOD_METHODS = ("energy", "mahalanobis")
# Optional, derived: the network exported to ONNX (batch.runtime), recording the weights_sha256 it was
# exported from. `dermscore package-model` writes it into model.tar.gz; elsewhere it is exported in
# memory when the onnx runtime is used.
ONNX_FILE = "model.onnx"


@dataclass
class ModelMeta:
    """What a model is and how to use its outputs (``metadata.json``)."""

    name: str
    version: str
    arch: str
    input_size: tuple[int, int]  # (height, width)
    classes: tuple[str, ...] = CLASSES
    temperature: float = 1.0
    melanoma_threshold: float = 0.5
    weights_sha256: str = ""
    extra: dict = field(default_factory=dict)
    # Out-of-distribution flag: an OOD score at or above this is flagged. Set on the validation
    # split (training.ood); None in older metadata = no flag.
    ood_threshold: float | None = None
    # Which OOD score ``ood_score`` is (batch.ood): "energy" = -logsumexp(logits) (older metadata
    # has no field and means this), "mahalanobis" = the distance of the pooled penultimate features
    # to the nearest class mean, with its parameters in OOD_FILE, whose sha256 is ood_sha256.
    ood_method: str = "energy"
    ood_sha256: str = ""
    # Shades of Gray colour constancy inside the network (batch.model.Normalize): its Minkowski p;
    # 0 (and older metadata, which has no field) = off.
    color_constancy: float = 0.0
    # The decision rule (dermscore.scoring.top_class): per-class offsets added to log p before the
    # argmax, in CLASSES order; None (and older metadata) = the plain argmax.
    class_offsets: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.ood_method not in OOD_METHODS:
            raise ValueError(f"ood_method must be one of {OOD_METHODS}, not {self.ood_method!r}")

    def files(self) -> tuple[str, ...]:
        """The files a model directory with this metadata consists of (what ships)."""
        return (WEIGHTS_FILE, METADATA_FILE) + ((OOD_FILE,) if self.ood_method == "mahalanobis" else ())

    @classmethod
    def read(cls, path: Path) -> ModelMeta:
        raw = json.loads(Path(path).read_text())
        raw["input_size"] = tuple(raw["input_size"])
        raw["classes"] = tuple(raw["classes"])
        if raw.get("class_offsets") is not None:
            raw["class_offsets"] = tuple(raw["class_offsets"])
        return cls(**raw)

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
