"""From calibrated probabilities to the fields every result carries: one definition.

Top class, malignant probability, melanoma flag, risk level and the out-of-distribution flag
are computed here, once, in the transform container (where the model's thresholds are at
hand); collect, the reports and SQL only read them. Pure Python: the container imports it
without pyarrow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dermscore.labels import CLASSES, MALIGNANT
from dermscore.messages import ManifestLine, OutputLine

# Risk levels: "high" = melanoma flag raised (threshold chosen on validation for
# sensitivity >= 0.85) or malignant probability >= 0.5; "moderate" =
# malignant probability >= 0.2; otherwise "low".
HIGH_MALIGNANT = 0.5
MODERATE_MALIGNANT = 0.2


def top_class(probs: Sequence[float], class_offsets: Sequence[float] | None = None) -> int:
    """The index of the class the model names: argmax of log p + the class's offset.

    Balanced accuracy rewards recall on the rare classes, which the argmax of calibrated
    probabilities does not: per-class offsets, fitted on the validation split
    (``training.metrics.fit_class_offsets``) and stored in ``metadata.json``, move the decision
    without touching the probabilities (so ``prob_*`` and the melanoma threshold keep their
    meaning). No offsets: the plain argmax.
    """
    if not class_offsets:
        return max(range(len(probs)), key=lambda i: probs[i])
    return max(range(len(probs)), key=lambda i: math.log(max(probs[i], 1e-12)) + class_offsets[i])


def risk_level(malignant_prob: float, melanoma_flag: bool, top_is_malignant: bool = False) -> str:
    """high: the melanoma flag or a malignant probability >= 0.5; moderate: a malignant
    probability >= 0.2, or a malignant top class (the decision rule named mel, bcc or akiec);
    low otherwise."""
    if melanoma_flag or malignant_prob >= HIGH_MALIGNANT:
        return "high"
    return "moderate" if malignant_prob >= MODERATE_MALIGNANT or top_is_malignant else "low"


def ood_flag(ood_score: float | None, ood_threshold: float | None) -> bool | None:
    """Out-of-distribution / low-quality flag; None when the model or the score is missing."""
    if ood_score is None or ood_threshold is None:
        return None
    return bool(ood_score >= ood_threshold)


def score_line(line: ManifestLine, probs: list[float], model: dict[str, str], melanoma_threshold: float,
               width: int, height: int, image_sha256: str = "", processing_ms: float | None = None,
               ood_score: float | None = None, ood_threshold: float | None = None,
               orientation: int = 1, class_offsets: Sequence[float] | None = None) -> OutputLine:
    """The transform output line for one scored image."""
    p = {c: float(v) for c, v in zip(CLASSES, probs, strict=True)}
    top = CLASSES[top_class(list(p.values()), class_offsets)]
    malignant = sum(p[c] for c in MALIGNANT)
    flag = p["mel"] >= melanoma_threshold
    return OutputLine(
        *line.upload, status="ok", probabilities=p, top_class=top, confidence=p[top], malignant_prob=malignant,
        melanoma_flag=flag, risk_level=risk_level(malignant, flag, top in MALIGNANT), width=width, height=height,
        orientation=orientation, model=dict(model),
        image_sha256=image_sha256 or None,
        processing_ms=None if processing_ms is None else round(float(processing_ms), 3),
        ood_score=None if ood_score is None else float(ood_score), ood_flag=ood_flag(ood_score, ood_threshold))
