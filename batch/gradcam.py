"""Grad-CAM heatmaps for flagged images (MONAI ``monai.visualize.GradCAM``).

Which images: ``DERMSCORE_GRADCAM`` in the model's environment (read by
``batch.inference.model_fn``): ``high`` (default) = images whose ``risk_level`` is high,
``all`` = every scored image, ``off`` = none. Low-risk images never pay for it in the default
mode: the heatmaps are computed after a batch's ordinary forward pass, only for the selected
images, on a separate copy of the network (the hooks Grad-CAM installs never touch the
scoring model).

Which class: melanoma when the melanoma flag is raised, otherwise the most probable of the
malignant classes (the reason the image is high risk); in ``all`` mode a low-risk image gets
the map of its top class. The class is written as ``heatmap_class``.

Which layer (the last convolutional feature map before global pooling):

* EfficientNet-Lite0 (``efficientnet_lite_pytorch``): ``_bn1``, the head's 1x1 conv (1280
  channels) after batch norm, at 1/32 of the input (5x6 at 144x192). The activation after it
  is the module ``_swish``, which the network also calls on the stem, so a hook on it would
  not be unambiguous.
* MONAI DenseNet121: ``class_layers.relu``, norm5 + ReLU of the last dense block (MONAI's
  own Grad-CAM example uses this layer).

The ``Normalize`` module sits in front of both (``nn.Sequential``), hence the ``1.`` prefix.

What is stored: a PNG of the heatmap blended over the model-input-size image and a small JPEG
of the image itself, both encoded from decoded pixels, so no EXIF or other metadata of the
upload survives and the original bytes are never stored. The container writes them itself
(:class:`batch.scorer.Scorer`) to the image's bucket, next to its per-image JSON
(``layout.image_artifact_key``: the transform role may put exactly those keys), and the output
line carries only their keys (``heatmap_key``, ``thumbnail_key``), which collect copies to the
row and the JSON.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import torch

from dermscore.labels import CLASSES, MALIGNANT
from dermscore.messages import OutputLine

TARGET_LAYERS = {"efficientnet_lite0": "1._bn1", "efficientnet_lite1": "1._bn1", "densenet121": "1.class_layers.relu"}
MODES = ("off", "high", "all")
DEFAULT_MODE = "high"
OVERLAY_ALPHA = 0.45


def wants_heatmap(line: OutputLine, mode: str) -> bool:
    return line.ok and (mode == "all" or (mode == "high" and line.risk_level == "high"))


def target_class(line: OutputLine) -> str:
    """The class whose evidence the heatmap shows (see the module docstring)."""
    p = line.probabilities or {}
    if line.melanoma_flag:
        return "mel"
    if line.risk_level == "high":
        return max(MALIGNANT, key=lambda c: p[c])
    return str(line.top_class)


class HeatmapMaker:
    """Grad-CAM on a private copy of the network; ``maps`` takes uint8 NHWC pixels."""

    def __init__(self, model: torch.nn.Module, arch: str, device: torch.device | str = "cpu") -> None:
        from monai.visualize import GradCAM

        if arch not in TARGET_LAYERS:
            raise ValueError(f"no Grad-CAM target layer known for {arch!r}")
        self.device = torch.device(device)
        self.model = copy.deepcopy(model).float().eval().to(self.device)
        for p in self.model.parameters():  # gradients flow to the activations only
            p.requires_grad_(False)
        # MONAI's default postprocessing maps (min, max) to (1, 0), i.e. flips the map; keep the
        # raw (ReLU'd, upsampled) map and scale it here so that 1 = most evidence for the class.
        self.cam = GradCAM(nn_module=self.model, target_layers=TARGET_LAYERS[arch], postprocessing=lambda x: x)

    def maps(self, pixels: np.ndarray, classes: list[int]) -> np.ndarray:
        """(n, H, W, 3) uint8 + one class index per image -> (n, H, W) float32 in [0, 1]."""
        out = np.zeros(pixels.shape[:3], dtype=np.float32)
        for c in sorted(set(classes)):
            idx = [i for i, k in enumerate(classes) if k == c]
            x = torch.from_numpy(np.ascontiguousarray(pixels[idx])).permute(0, 3, 1, 2).float().to(self.device)
            x.requires_grad_(True)  # with frozen weights, the input is what makes the graph
            with torch.inference_mode(False), torch.enable_grad():
                m = self.cam(x, class_idx=c)
            out[idx] = normalize(m[:, 0].detach().float().cpu().numpy())
        return out


def normalize(maps: np.ndarray) -> np.ndarray:
    """Per map: (min, max) -> (0, 1); a flat map (no evidence anywhere) stays all zeros."""
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0).astype(np.float32)


def jet(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 with the classic 'jet' colour map (no matplotlib in the container)."""
    v = np.clip(values, 0, 1)[..., None]
    rgb = np.clip(np.concatenate([1.5 - np.abs(4 * v - 3), 1.5 - np.abs(4 * v - 2), 1.5 - np.abs(4 * v - 1)],
                                 axis=-1), 0, 1)
    return (rgb * 255).astype(np.uint8)


def overlay(pixels: np.ndarray, cam: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    return (pixels.astype(np.float32) * (1 - alpha) + jet(cam).astype(np.float32) * alpha).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    """Encode an RGB array; a fresh image from pixels carries no EXIF/ICC/XMP of any upload."""
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=85)
    else:
        im.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def render(maker: HeatmapMaker, pairs: list[tuple[OutputLine, np.ndarray]]) -> list[tuple[str, bytes, bytes]]:
    """For each (line, pixels): (the class explained, the Grad-CAM overlay PNG, the thumbnail JPEG)."""
    if not pairs:
        return []
    pixels = np.stack([px for _, px in pairs])
    classes = [target_class(line) for line, _ in pairs]
    cams = maker.maps(pixels, [CLASSES.index(c) for c in classes])
    return [(c, encode(overlay(px, cam), "PNG"), encode(px, "JPEG"))
            for (_, px), cam, c in zip(pairs, cams, classes, strict=True)]
