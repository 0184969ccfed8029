"""The seven HAM10000 diagnoses, in the order the model's outputs use."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

CLASS_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}

# Malignant or pre-malignant classes: their summed probability is the
# "malignant probability" reported per image.
MALIGNANT: tuple[str, ...] = ("akiec", "bcc", "mel")

MELANOMA_INDEX = CLASSES.index("mel")
