"""Scoring runtimes: one forward pass -> logits, pooled features and class activation maps.

Why more than one runtime: on a CPU the same network runs several times faster under ONNX
Runtime than under PyTorch eager (graph-level fusion, its own convolution kernels); on a GPU
PyTorch + CUDA (AMP fp16) stays. Both run the same :class:`ScoringNetwork`, so every caller
(the container, ``dermscore predict`` / ``evaluate``, the local stack, the benchmark) gets the
same three outputs from **one** forward pass:

* ``logits`` (n, classes);
* ``features`` (n, d): the pooled penultimate features, the classifier head's input (the
  Mahalanobis OOD score needs them, :mod:`batch.ood`);
* ``cams`` (n, classes, h, w) for the architectures in :data:`CAM_POOLS`: the class activation
  maps ``sum_k w[c, k] * A[k]`` of the final feature map ``A`` (the global pool's input) and the
  head's weights ``w``, before ReLU. For a network that ends in feature map -> global average
  pool -> (dropout) -> linear, Grad-CAM at the pool's input *is* this map up to a positive factor
  (the gradient of the class score with respect to ``A[k]`` is ``w[c, k] / (h * w)`` everywhere),
  so a heatmap costs no second forward and no backward pass (:mod:`batch.gradcam`;
  ``tests/test_gradcam.py`` compares it with MONAI's Grad-CAM).

Which runtime: ``DERMSCORE_RUNTIME`` (or a command's ``--runtime``): ``torch``, ``onnx`` or
``auto`` (the default): PyTorch on CUDA, ONNX Runtime on the CPU when it can be imported
(``model.tar.gz`` vendors it: :mod:`infra.container`), PyTorch otherwise.

Where the ONNX graph comes from: ``model.onnx`` in the model directory when it was exported from
these very weights (``dermscore package-model`` writes it into ``model.tar.gz``, so the container
never exports), else an export in memory at load (a few seconds; needs the ``onnx`` package,
which the project's venv has). The graph records the sha256 of the weights it was exported from
and :data:`EXPORT_VERSION`; a stale file is never used, since every output line names the weights
that produced its numbers.

The graph's input is the scorer's own batch buffer: uint8, NHWC, (n, H, W, 3) at the model's
input size, dynamic n; :class:`batch.model.Normalize` (and its colour constancy) is inside it.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batch.bundle import ONNX_FILE, ModelMeta
from batch.model import HEAD_LAYERS
from dermscore.options import RUNTIMES

log = logging.getLogger("dermscore.runtime")

RUNTIME_ENV = "DERMSCORE_RUNTIME"
OPSET = 17
# Bump when ScoringNetwork's inputs or outputs change: an older model.onnx is then re-exported.
EXPORT_VERSION = "1"
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "features", "cams")
# The global average pool of each architecture for which the class activation map equals Grad-CAM
# at the pool's input: feature map -> this pool -> dropout (identity in eval) -> HEAD_LAYERS' linear.
# efficientnet_lite_pytorch: _swish(_bn1(_conv_head(x))) (ReLU6 for the Lite variants) is the pool's
# input. DenseNet121 is left to MONAI's Grad-CAM (batch.gradcam.HeatmapMaker).
CAM_POOLS = {"efficientnet_lite0": "1._avg_pooling", "efficientnet_lite1": "1._avg_pooling"}


@dataclass(frozen=True)
class Outputs:
    """What one forward pass gives (float32 tensors; on the engine's device)."""

    logits: torch.Tensor
    features: torch.Tensor
    cams: torch.Tensor | None  # (n, classes, h, w) before ReLU; None where CAM_POOLS has no entry


class ScoringNetwork(nn.Module):
    """``model`` as the scorer runs it: (n, H, W, 3) uint8 NHWC -> logits, features[, cams].

    The features and the final feature map are caught by hooks on the head and on the pool
    that live only for one call (the wrapped model stays hook-free, so Grad-CAM's copy of it and
    torch.onnx's tracer see the plain network)."""

    def __init__(self, model: nn.Module, arch: str) -> None:
        super().__init__()
        self.model = model
        self.head = model.get_submodule(HEAD_LAYERS[arch])
        self.pool = model.get_submodule(CAM_POOLS[arch]) if arch in CAM_POOLS else None

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = pixels.permute(0, 3, 1, 2)  # an NCHW view of NHWC memory = channels_last
        caught: dict[str, torch.Tensor] = {}
        handles = [self.head.register_forward_pre_hook(lambda _m, a: caught.__setitem__("features", a[0]))]
        if self.pool is not None:
            handles.append(self.pool.register_forward_pre_hook(lambda _m, a: caught.__setitem__("fmap", a[0])))
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        features = caught["features"].flatten(1)
        if self.pool is None:
            return logits, features
        # A 1x1 convolution with the head's weights: sum_k w[c, k] A[k] (no bias: it shifts every
        # position of a map alike, which the heatmap's normalisation removes anyway).
        cams = nn.functional.conv2d(caught["fmap"], self.head.weight[:, :, None, None].to(caught["fmap"].dtype))
        return logits, features, cams


# --------------------------------------------------------------------------- engines

class TorchEngine:
    """PyTorch eager (AMP fp16 on CUDA)."""

    name = "torch"

    def __init__(self, model: nn.Module, arch: str, device: torch.device) -> None:
        self.net = ScoringNetwork(model, arch)
        self.device = device
        self.cuda = device.type == "cuda"

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> Outputs:
        x = batch if batch.device == self.device else batch.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.cuda):
            out = self.net(x)
        return Outputs(out[0].float(), out[1].float(), out[2].float() if len(out) > 2 else None)


class OnnxEngine:
    """ONNX Runtime, CPU execution provider, on the scorer's uint8 buffers as they are."""

    name = "onnx"

    def __init__(self, graph: bytes, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # As many compute threads as torch uses (respects torch.set_num_threads / --threads), and
        # idle ones sleep, as OMP_WAIT_POLICY=PASSIVE makes torch's do: the forward pass shares
        # the cores with the fetch/decode threads (batch.scorer).
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        spin = os.environ.get("OMP_WAIT_POLICY", "PASSIVE").upper() == "ACTIVE"
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.version = ort.__version__

    def metadata_matches(self, meta: ModelMeta) -> bool:
        """Whether this graph was exported from ``meta``'s weights by this export version."""
        props = self.session.get_modelmeta().custom_metadata_map
        want = graph_metadata(meta)
        return {k: props.get(k) for k in want} == want

    def __call__(self, batch: torch.Tensor) -> Outputs:
        arr = np.ascontiguousarray(batch.numpy())
        got = dict(zip(self.outputs, self.session.run(self.outputs, {INPUT_NAME: arr}), strict=True))
        cams = got.get("cams")
        return Outputs(torch.from_numpy(got["logits"]), torch.from_numpy(got["features"]),
                       None if cams is None else torch.from_numpy(cams))


Engine = TorchEngine | OnnxEngine


class RuntimeUnavailable(ValueError):
    """The runtime asked for cannot run here (a user's choice: commands print it in one line)."""


# --------------------------------------------------------------------------- choosing one

def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(runtime: str | None, device: torch.device) -> str:
    """``torch`` or ``onnx`` for ``runtime`` (``auto``/None: ``$DERMSCORE_RUNTIME``, else by device)."""
    name = (runtime or os.environ.get(RUNTIME_ENV) or "auto").strip().lower()
    if name not in RUNTIMES:
        raise RuntimeUnavailable(f"runtime must be one of {RUNTIMES}, not {name!r} (set by --runtime or "
                                 f"{RUNTIME_ENV})")
    if name == "auto":
        return "onnx" if device.type == "cpu" and onnxruntime_available() else "torch"
    if name == "onnx" and device.type != "cpu":
        raise RuntimeUnavailable(f"the onnx runtime runs on the CPU only; on {device.type} use the torch runtime")
    if name == "onnx" and not onnxruntime_available():
        raise RuntimeUnavailable("the onnx runtime needs the onnxruntime package (`make setup` installs it); "
                                 "or use --runtime torch")
    return name


def make_engine(model: nn.Module, meta: ModelMeta, device: torch.device, model_dir: Path | None = None,
                runtime: str | None = None) -> Engine:
    """The engine ``runtime`` asks for (see :func:`resolve`) for ``model`` with ``meta``: for ONNX,
    ``model_dir/model.onnx`` when it was exported from these weights, else an export in memory."""
    name = resolve(runtime, device)
    if name == "torch":
        return TorchEngine(model, meta.arch, device)
    path = Path(model_dir) / ONNX_FILE if model_dir is not None else None
    if path is not None and path.is_file():
        engine = OnnxEngine(path.read_bytes())
        if engine.metadata_matches(meta):
            return engine
        log.warning("%s was not exported from these weights (or by another export version): exporting again",
                    path)
    try:
        graph = export_bytes(model, meta)
    except ImportError as exc:  # no onnx package to export with (a container never needs it: the archive has one)
        if (runtime or os.environ.get(RUNTIME_ENV) or "auto").strip().lower() == "onnx":
            raise RuntimeUnavailable(f"no current {ONNX_FILE} and no onnx package to export one ({exc}); "
                                     "use --runtime torch") from exc
        log.warning("no current %s and no onnx package to export one: scoring with torch", ONNX_FILE)
        return TorchEngine(model, meta.arch, device)
    return OnnxEngine(graph)


# --------------------------------------------------------------------------- the ONNX graph

def graph_metadata(meta: ModelMeta) -> dict[str, str]:
    """What a graph records about its origin (ONNX ``metadata_props``)."""
    return {"dermscore_weights_sha256": meta.weights_sha256, "dermscore_export_version": EXPORT_VERSION,
            "dermscore_arch": meta.arch, "dermscore_input_size": "x".join(map(str, meta.input_size))}


def export_bytes(model: nn.Module, meta: ModelMeta) -> bytes:
    """``model`` (eval, on any device) as an ONNX graph with :data:`OUTPUT_NAMES` and its origin
    in ``metadata_props``; deterministic for the same weights, code and torch version."""
    import copy

    import onnx

    net = ScoringNetwork(copy.deepcopy(model).float().cpu().eval(), meta.arch).eval()
    outputs = OUTPUT_NAMES if net.pool is not None else OUTPUT_NAMES[:2]
    example = torch.zeros((2, *meta.input_size, 3), dtype=torch.uint8)
    buf = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        # The TF "same" padding is computed from the (fixed) input size in Python: the tracer warns
        # that it becomes a constant, which is what a fixed input size wants.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False: the TorchScript exporter, on purpose
        torch.onnx.export(net, (example,), buf, opset_version=OPSET, dynamo=False, input_names=[INPUT_NAME],
                          output_names=list(outputs), dynamic_axes={n: {0: "n"} for n in (INPUT_NAME, *outputs)})
    graph = onnx.load_from_string(buf.getvalue())
    for key, value in graph_metadata(meta).items():
        graph.metadata_props.add(key=key, value=value)
    return graph.SerializeToString()


def describe(engine: Any) -> str:
    """A short label for logs and the benchmark: ``onnx (onnxruntime 1.32.0)`` or ``torch (cpu)``."""
    if isinstance(engine, OnnxEngine):
        return f"onnx (onnxruntime {engine.version})"
    return f"torch ({engine.device})"
