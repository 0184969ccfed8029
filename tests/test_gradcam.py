"""Grad-CAM heatmaps (batch.gradcam): target layers, selection, no EXIF, the scoring model untouched."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sample_images
from PIL import Image

from batch import gradcam
from batch.model import build_network
from dermscore import layout
from dermscore.imaging import decode
from dermscore.messages import OutputLine

torch.set_num_threads(1)


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "densenet121"])
def test_target_layer_gives_a_map_per_image_and_leaves_the_model_alone(arch: str) -> None:
    torch.manual_seed(0)
    net = build_network(arch).eval()
    px = np.stack([decode(f.read_bytes(), (64, 64)).pixels for f in sample_images(2)])
    x = torch.from_numpy(px).permute(0, 3, 1, 2)
    with torch.inference_mode():
        before = net(x)
    maps = gradcam.HeatmapMaker(net, arch).maps(px, [4, 1])
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 and np.isfinite(maps).all()
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())  # hooks live on the copy
    with torch.inference_mode():
        assert torch.equal(before, net(x))
    assert all(p.requires_grad for p in net.parameters())


def exif_jpeg(path: Path) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "SecretCameraMaker"
    exif[0x8825] = {2: (51.0, 30.0, 0.0)}  # GPS latitude
    buf = io.BytesIO()
    with Image.open(path) as im:
        im.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def test_scorer_makes_heatmaps_for_high_risk_only_without_exif(varied_model: Path) -> None:
    from batch.scorer import Scorer

    files = sample_images(8)
    blobs = [(f.name, exif_jpeg(f)) for f in files]
    assert b"SecretCameraMaker" in blobs[0][1]
    plain = Scorer.from_model_dir(varied_model, "cpu").score_bytes(blobs)  # default: off
    assert not any(r.heatmap_key for r in plain)
    scorer = Scorer.from_model_dir(varied_model, "cpu", heatmaps="high", batch_size=4)
    lines = scorer.score_bytes(blobs)
    high = [r for r in lines if r.risk_level == "high"]
    assert 0 < len(high) < len(lines)
    for r, p in zip(lines, plain, strict=False):
        assert bool(r.heatmap_key) == bool(r.thumbnail_key) == (r.risk_level == "high")
        assert r.probabilities == p.probabilities  # heatmaps change no score
        assert len(r.to_json()) < 1500            # keys, never pictures, travel in the line
    assert set(scorer.pictures) == {k for r in high for k in (r.heatmap_key, r.thumbnail_key)}
    for r in high:
        assert r.heatmap_class == "mel" if r.melanoma_flag else r.heatmap_class in ("akiec", "bcc")
        sha = r.model["weights_sha256"]
        assert r.heatmap_key == layout.image_artifact_key(r.key, r.etag, layout.HEATMAP_SUFFIX, sha)
        for key, fmt in ((r.heatmap_key, "PNG"), (r.thumbnail_key, "JPEG")):
            data = scorer.pictures[key]
            assert b"SecretCameraMaker" not in data
            with Image.open(io.BytesIO(data)) as im:
                assert im.format == fmt and im.size == (64, 64) and not im.getexif()
    every = Scorer.from_model_dir(varied_model, "cpu", heatmaps="all").score_bytes(blobs[:2])
    assert all(r.heatmap_key for r in every)
    with pytest.raises(ValueError):
        Scorer.from_model_dir(varied_model, "cpu", heatmaps="sometimes")


def test_target_class_follows_the_reason_for_the_risk() -> None:
    p = {"akiec": 0.3, "bcc": 0.25, "bkl": 0.05, "df": 0.0, "mel": 0.1, "nv": 0.3, "vasc": 0.0}
    def line(**fields) -> OutputLine:
        return OutputLine("b", "k", "e", "ok", probabilities=p, **fields)

    assert gradcam.target_class(line(melanoma_flag=True, risk_level="high")) == "mel"
    assert gradcam.target_class(line(melanoma_flag=False, risk_level="high")) == "akiec"
    assert gradcam.target_class(line(melanoma_flag=False, risk_level="low", top_class="nv")) == "nv"
    assert gradcam.jet(np.array([0.0, 1.0])).tolist() == [[0, 0, 127], [127, 0, 0]]


def test_maps_are_one_where_the_evidence_is_not_flipped_like_monais_default(varied_model: Path) -> None:
    """MONAI's default normaliser maps (min, max) to (1, 0); ours keeps 1 = most evidence."""
    from monai.visualize import GradCAM

    assert gradcam.normalize(np.array([[[0.0, 1.0], [2.0, 4.0]]])).tolist() == [[[0.0, 0.25], [0.5, 1.0]]]
    assert gradcam.normalize(np.zeros((1, 2, 2))).tolist() == [[[0.0, 0.0], [0.0, 0.0]]]
    from batch.model import load

    net, _ = load(varied_model)
    px = np.stack([decode(f.read_bytes(), (64, 64)).pixels for f in sample_images(1)])
    ours = gradcam.HeatmapMaker(net, "efficientnet_lite0").maps(px, [4])[0]
    assert ours.max() == 1 and ours.min() == 0  # a map that varies, so the direction matters
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float().requires_grad_(True)
    monai_default = GradCAM(nn_module=gradcam.grad_cam_copy(net, "efficientnet_lite0"),
                            target_layers=gradcam.TARGET_LAYERS["efficientnet_lite0"])(x, class_idx=4)
    assert np.allclose(ours, 1 - monai_default[0, 0].detach().numpy(), atol=1e-4)


def test_each_upload_of_a_key_keeps_its_own_pictures(varied_model: Path) -> None:
    """Upload A of a key is scored, then upload B of the same key: A's row still links A's pictures
    (B's are stored under B's ETag and overwrite nothing). In-process S3 (moto's mock_aws)."""
    import boto3
    from moto import mock_aws

    from batch.scorer import Scorer
    from dermscore.messages import ManifestLine

    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="pictures")
        scorer = Scorer.from_model_dir(varied_model, "cpu", heatmaps="all")
        scorer.s3 = s3
        rows = []
        for f in sample_images(2):                       # two different images, one key
            etag = s3.put_object(Bucket="pictures", Key="incoming/same.jpg", Body=f.read_bytes())["ETag"].strip('"')
            (row,) = scorer.score_items([ManifestLine("pictures", "incoming/same.jpg", etag, f.stat().st_size)])
            rows.append((row, s3.get_object(Bucket="pictures", Key=row.heatmap_key)["Body"].read()))
        (first, first_png), (second, _) = rows
        assert first.etag != second.etag and first.heatmap_key != second.heatmap_key
        assert first.thumbnail_key != second.thumbnail_key
        assert s3.get_object(Bucket="pictures", Key=first.heatmap_key)["Body"].read() == first_png   # untouched by B
        tags = s3.get_object_tagging(Bucket="pictures", Key=first.heatmap_key)["TagSet"]
        assert {"Key": "dermscore-derived", "Value": "picture"} in tags                    # its lifecycle rule


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "default"


@pytest.mark.parametrize("engine_name", ["torch", "onnx"])
def test_the_scoring_forwards_class_maps_equal_monais_grad_cam_at_the_pools_input(engine_name: str) -> None:
    """The identity behind heatmaps without a backward pass (batch.gradcam), on the shipped model
    and real images, for every class: CAM from the scoring forward == MONAI Grad-CAM (normalised
    maps in [0, 1], within 1e-4)."""
    from batch import runtime
    from batch.model import load

    if engine_name == "onnx" and not runtime.onnxruntime_available():
        pytest.skip("onnxruntime is not installed")
    model, meta = load(SHIPPED)
    px = np.stack([decode(f.read_bytes(), meta.input_size).pixels for f in sample_images(6)])
    engine = runtime.make_engine(model, meta, torch.device("cpu"), runtime=engine_name)
    cams = engine(torch.from_numpy(px)).cams
    maker = gradcam.HeatmapMaker(model, meta.arch)
    for c in range(len(meta.classes)):
        ours = gradcam.class_maps(cams, [c] * len(px), meta.input_size)
        theirs = maker.maps(px, [c] * len(px))
        assert ours.shape == theirs.shape == (len(px), *meta.input_size)
        assert (ours.max(axis=(1, 2)) == 1).any() and np.ptp(ours) > 0.5   # maps that vary
        assert np.abs(ours - theirs).max() <= 1e-4, (c, np.abs(ours - theirs).max())


def test_the_identity_needs_the_pools_input_not_the_layer_before_its_activation() -> None:
    """Grad-CAM at ``_bn1`` (before the ReLU6) is a different map: the layer choice matters."""
    from monai.visualize import GradCAM

    from batch import runtime
    from batch.model import load

    model, meta = load(SHIPPED)
    px = np.stack([decode(f.read_bytes(), meta.input_size).pixels for f in sample_images(4)])
    cams = runtime.make_engine(model, meta, torch.device("cpu"), runtime="torch")(torch.from_numpy(px)).cams
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float().requires_grad_(True)
    before_act = GradCAM(nn_module=gradcam.grad_cam_copy(model, meta.arch), target_layers="1._bn1",
                         postprocessing=lambda m: m)(x, class_idx=4)
    assert np.abs(gradcam.class_maps(cams, [4] * 4, meta.input_size)
                  - gradcam.normalize(before_act[:, 0].detach().numpy())).max() > 0.05


@pytest.mark.parametrize(("arch", "from_forward"), [("efficientnet_lite0", True), ("densenet121", False)])
def test_the_scorer_takes_heatmaps_from_the_forward_where_the_identity_holds(arch: str, from_forward: bool,
                                                                             tmp_path: Path) -> None:
    """Lite0: the maps come with the scoring forward and no Grad-CAM copy is made; DenseNet121:
    MONAI's Grad-CAM after the forward."""
    from batch.model import ModelMeta, save
    from batch.scorer import Scorer

    torch.manual_seed(0)
    save(build_network(arch), ModelMeta(name="t", version="0", arch=arch, input_size=(64, 64)), tmp_path)
    scorer = Scorer.from_model_dir(tmp_path, "cpu", heatmaps="all", runtime="torch")
    rows = scorer.score_files(sample_images(2))
    rows = list(rows)
    assert all(r.heatmap_key and r.thumbnail_key for r in rows)
    assert (scorer._heatmap_maker is None) == from_forward
    for r in rows:
        with Image.open(io.BytesIO(scorer.pictures[r.heatmap_key])) as im:
            assert im.format == "PNG" and im.size == (64, 64)
