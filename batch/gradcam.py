"""Heatmaps for flagged images: class activation maps from the scoring forward, or MONAI Grad-CAM.

Which images: ``DERMSCORE_GRADCAM`` in the model's environment (read by
``batch.inference.model_fn``): ``high`` (default) = images whose ``risk_level`` is high,
``all`` = every scored image, ``off`` = none.

How, by architecture:

* EfficientNet-Lite0/1 (``batch.runtime.CAM_POOLS``): the network ends in its final feature map
  ``A`` (``_swish(_bn1(_conv_head(x)))``, ReLU6, 1280 channels at 1/32 of the input: 5x6 at
  144x192) -> global average pool -> dropout -> the linear head. Grad-CAM at the pool's input
  then *is* the class activation map ``sum_k w[c, k] A[k]``: the gradient of the class score with
  respect to ``A[k]`` is ``w[c, k] / (h w)`` at every position, so Grad-CAM's channel weights are
  the head's weights up to a positive factor, which the normalisation below removes. The scoring
  forward already outputs these maps (``batch.runtime.ScoringNetwork``, in the ONNX graph too), so
  a heatmap costs no second forward and no backward pass: :func:`class_maps` only picks the
  class, applies ReLU, upsamples and normalises. ``tests/test_gradcam.py`` checks the identity
  against MONAI's Grad-CAM at that layer.
* MONAI DenseNet121 (and any architecture not in ``CAM_POOLS``): MONAI's
  ``monai.visualize.GradCAM`` at ``class_layers.relu`` (MONAI's own Grad-CAM example uses this
  layer), on a separate copy of the network (the hooks Grad-CAM installs never touch the scoring
  model), after the batch's ordinary forward pass, only for the selected images
  (:class:`HeatmapMaker`). For the Lite networks :class:`HeatmapMaker` takes Grad-CAM at the pool's
  input too (an identity module is put in front of the pool of its private copy, because the
  activation module ``_swish`` is also called on the stem, so a hook on it would be ambiguous).

Both paths: ReLU at feature resolution, bilinear upsampling to the input size (MONAI's default
upsampler), then per-map (min, max) -> (0, 1).

Which class: melanoma when the melanoma flag is raised, otherwise the most probable of the
malignant classes (the reason the image is high risk); in ``all`` mode a low-risk image gets
the map of its top class. The class is written as ``heatmap_class``.

The ``Normalize`` module sits in front of both networks (``nn.Sequential``), hence the ``1.`` prefix.

What is stored: a PNG of the heatmap blended over the model-input-size image and a small JPEG
of the image itself, both encoded from the pixels the scorer already decoded, so no EXIF or other
metadata of the upload survives and the original bytes are never stored. The PNG is written with
zlib level 1 and without ``optimize`` (an overlay is photographic: higher levels and Pillow's
optimize pass made it ~1 % smaller for ~10 % more encoder time). The container writes them itself
(:class:`batch.scorer.Scorer`) to the image's bucket, next to its per-image JSON
(``layout.image_artifact_key``: the transform role may put exactly those keys), and the output
line carries only their keys (``heatmap_key``, ``thumbnail_key``), which collect copies to the
row and the JSON.
"""

from __future__ import annotations

import copy
import io
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from batch.runtime import CAM_POOLS
from dermscore.labels import CLASSES, MALIGNANT
from dermscore.messages import OutputLine

# The identity module HeatmapMaker puts in front of a CAM_POOLS pool: its output is the pool's input.
POOL_INPUT = "input"
TARGET_LAYERS = {**{arch: f"{pool}.{POOL_INPUT}" for arch, pool in CAM_POOLS.items()},
                 "densenet121": "1.class_layers.relu"}
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


def grad_cam_copy(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """A float32 eval copy of ``model`` in which :data:`TARGET_LAYERS` names a module: for a
    :data:`CAM_POOLS` architecture an identity module in front of the global pool (same outputs,
    same state dict), whose output is the pool's input and which runs once per forward."""
    net = copy.deepcopy(model).float().eval()
    if arch in CAM_POOLS:
        parent, _, name = CAM_POOLS[arch].rpartition(".")
        pool = net.get_submodule(CAM_POOLS[arch])
        setattr(net.get_submodule(parent), name, nn.Sequential(OrderedDict([(POOL_INPUT, nn.Identity()),
                                                                           ("pool", pool)])))
    return net


class HeatmapMaker:
    """MONAI Grad-CAM on a private copy of the network; ``maps`` takes uint8 NHWC pixels. The
    scorer uses it only where the scoring forward gives no class activation maps (DenseNet121)."""

    def __init__(self, model: torch.nn.Module, arch: str, device: torch.device | str = "cpu") -> None:
        from monai.visualize import GradCAM

        if arch not in TARGET_LAYERS:
            raise ValueError(f"no Grad-CAM target layer known for {arch!r}")
        self.device = torch.device(device)
        self.model = grad_cam_copy(model, arch).to(self.device)
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


def class_maps(cams: torch.Tensor, classes: list[int], size: tuple[int, int]) -> np.ndarray:
    """The scoring forward's class activation maps (n, C, h, w), one class per image -> (n, H, W)
    float32 in [0, 1]: ReLU, bilinear upsampling to ``size`` and normalisation, as Grad-CAM's
    map gets them (module docstring)."""
    rows = torch.arange(len(classes))
    m = cams[rows, torch.as_tensor(classes, dtype=torch.long)][:, None].float().cpu()
    m = nn.functional.interpolate(torch.relu(m), size=tuple(size), mode="bilinear", align_corners=False)
    return normalize(m[:, 0].numpy())


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
        im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def render(pairs: list[tuple[OutputLine, np.ndarray]], cams: torch.Tensor | None = None,
           maker: HeatmapMaker | None = None) -> list[tuple[str, bytes, bytes]]:
    """For each (line, pixels): (the class explained, the heatmap overlay PNG, the thumbnail JPEG).
    The maps come from ``cams`` (the scoring forward's class activation maps of these images, in
    this order) when given, else from ``maker`` (Grad-CAM)."""
    if not pairs:
        return []
    pixels = np.stack([px for _, px in pairs])
    classes = [target_class(line) for line, _ in pairs]
    idx = [CLASSES.index(c) for c in classes]
    if cams is not None:
        maps = class_maps(cams, idx, pixels.shape[1:3])
    elif maker is not None:
        maps = maker.maps(pixels, idx)
    else:
        raise ValueError("render needs the class activation maps or a HeatmapMaker")
    return [(c, encode(overlay(px, cam), "PNG"), encode(px, "JPEG"))
            for (_, px), cam, c in zip(pairs, maps, classes, strict=True)]
