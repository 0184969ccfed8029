"""Scoring runtimes (batch.runtime): ONNX Runtime gives PyTorch's outputs on the shipped model and
real images, from one graph that also holds the features and the class activation maps; the
choice of runtime; the exported graph's provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from batch import runtime
from batch.bundle import ONNX_FILE, ModelMeta
from batch.model import forward_with_features, load
from batch.scorer import Scorer
from dermscore.imaging import decode

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "default"
HAM = ROOT.parent / "shared" / "data" / "ham10000" / "fullres_sample"

# The stated tolerances of ONNX Runtime against PyTorch eager (both float32 on the CPU; the graph
# runs fused kernels in another order, so the last bits differ): measured differences on the
# shipped model are ~2e-5 on logits of magnitude ~10, ~1e-5 on features, ~1e-4 on maps of ~60.
LOGITS_ATOL = 1e-4
PROBS_ATOL = 1e-5
FEATURES_ATOL = 1e-4
CAMS_ATOL = 1e-3

pytestmark = pytest.mark.skipif(not runtime.onnxruntime_available(), reason="onnxruntime is not installed")


def real_pixels(size: tuple[int, int], n: int = 24) -> np.ndarray:
    """The demo samples plus HAM10000 full-resolution images (when the shared data is there)."""
    files = sorted((ROOT / "samples").glob("*.jpg")) + sorted(HAM.glob("*.jpg"))[: max(0, n - 8)]
    return np.stack([decode(f.read_bytes(), size).pixels for f in files[:n]])


@pytest.fixture(scope="module")
def shipped() -> tuple[torch.nn.Module, ModelMeta, np.ndarray]:
    model, meta = load(SHIPPED)
    return model, meta, real_pixels(tuple(meta.input_size))


def test_onnx_equals_pytorch_on_the_shipped_model(shipped) -> None:
    model, meta, px = shipped
    eager = runtime.make_engine(model, meta, torch.device("cpu"), runtime="torch")
    onnx = runtime.make_engine(model, meta, torch.device("cpu"), runtime="onnx")
    assert isinstance(onnx, runtime.OnnxEngine) and isinstance(eager, runtime.TorchEngine)
    batch = torch.from_numpy(px)
    a, b = eager(batch), onnx(batch)
    assert a.logits.abs().max() > 1                       # real logits, not a degenerate network
    assert (a.logits - b.logits).abs().max() <= LOGITS_ATOL
    pa, pb = (torch.softmax(o.logits / meta.temperature, 1) for o in (a, b))
    assert (pa - pb).abs().max() <= PROBS_ATOL
    assert (a.features - b.features).abs().max() <= FEATURES_ATOL
    assert a.cams.shape == b.cams.shape == (len(px), len(meta.classes), *[s // 32 + (s % 32 > 0)
                                                                           for s in meta.input_size])
    assert (a.cams - b.cams).abs().max() <= CAMS_ATOL
    # ... and the eager engine's outputs are the plain network's (one forward, hooks and all).
    with torch.inference_mode():
        logits, feats = forward_with_features(model, batch.permute(0, 3, 1, 2).float(), meta.arch)
    assert torch.allclose(a.logits, logits, atol=1e-5) and torch.allclose(a.features, feats, atol=1e-5)


def test_a_batch_of_one_and_a_batch_of_many_agree(shipped) -> None:
    """The graph's batch dimension is dynamic: any batch size, the same numbers per image."""
    model, meta, px = shipped
    onnx = runtime.make_engine(model, meta, torch.device("cpu"), runtime="onnx")
    many = onnx(torch.from_numpy(px[:5])).logits
    one = torch.cat([onnx(torch.from_numpy(px[i:i + 1])).logits for i in range(5)])
    assert (many - one).abs().max() <= LOGITS_ATOL


def test_the_scorer_gives_the_same_rows_on_either_runtime(tmp_path: Path) -> None:
    """Probabilities, OOD score (Mahalanobis, from the features) and decisions agree."""
    files = sorted((ROOT / "samples").glob("*.jpg"))
    rows = {name: list(Scorer.from_model_dir(SHIPPED, "cpu", runtime=name, batch_size=4).score_files(files))
            for name in ("torch", "onnx")}
    for t, o in zip(rows["torch"], rows["onnx"], strict=True):
        assert t.ok and o.ok and t.top_class == o.top_class and t.risk_level == o.risk_level
        assert max(abs(t.probabilities[c] - o.probabilities[c]) for c in t.probabilities) <= PROBS_ATOL
        assert o.ood_score == pytest.approx(t.ood_score, rel=1e-4)


def test_auto_is_onnx_on_the_cpu_and_the_environment_can_choose(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv(runtime.RUNTIME_ENV, raising=False)
    assert runtime.resolve(None, cpu) == "onnx"
    assert runtime.resolve("auto", torch.device("cuda")) == "torch"
    monkeypatch.setenv(runtime.RUNTIME_ENV, "torch")
    assert runtime.resolve(None, cpu) == "torch"
    assert runtime.resolve("onnx", cpu) == "onnx"           # an explicit choice wins over the environment
    with pytest.raises(ValueError, match="CPU only"):
        runtime.resolve("onnx", torch.device("cuda"))
    monkeypatch.setenv(runtime.RUNTIME_ENV, "tensorrt")
    with pytest.raises(ValueError, match="runtime must be one of"):
        runtime.resolve(None, cpu)
    monkeypatch.setattr(runtime, "onnxruntime_available", lambda: False)
    assert runtime.resolve("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="onnxruntime package"):
        runtime.resolve("onnx", cpu)


def test_a_shipped_graph_is_used_only_for_the_weights_it_came_from(tiny_model: Path, tmp_path: Path) -> None:
    model, meta = load(tiny_model)
    graph = runtime.export_bytes(model, meta)
    assert graph == runtime.export_bytes(model, meta)      # deterministic: model.tar.gz stays reproducible
    (tmp_path / ONNX_FILE).write_bytes(graph)
    engine = runtime.make_engine(model, meta, torch.device("cpu"), tmp_path, runtime="onnx")
    assert engine.metadata_matches(meta)
    other = ModelMeta(**{**meta.__dict__, "weights_sha256": "0" * 64})
    assert not engine.metadata_matches(other)
    # A stale model.onnx (other weights) is not used: the graph is exported again from these.
    (tmp_path / ONNX_FILE).write_bytes(runtime.export_bytes(model, other))
    again = runtime.make_engine(model, meta, torch.device("cpu"), tmp_path, runtime="onnx")
    assert again.metadata_matches(meta)
