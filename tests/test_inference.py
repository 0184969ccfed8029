"""The SageMaker inference contract and the streaming Scorer behind it.

A tiny randomly initialised network stands in for the trained model (these tests
check plumbing: order, error codes, calibration, streaming; never accuracy), and
moto's in-process S3 stands in for the bucket.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batch.inference import input_fn, model_fn, output_fn, predict_fn
from batch.model import ModelMeta, build_network, save
from batch.runtime import Outputs
from batch.scorer import BadLine, Scorer
from dermscore import imaging, reasons
from dermscore.labels import CLASSES
from dermscore.messages import ManifestLine

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000" / "fullres_sample"
BUCKET = "dermscore-test"
TEMPERATURE = 1.7
MEL_THRESHOLD = 0.1
N_REAL = 6


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny batches gain nothing from threads, and a training run may share the cores.
    Restored afterwards so other modules keep their own setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    meta = ModelMeta(name="test", version="0", arch="efficientnet_lite0", input_size=(64, 64),
                     temperature=TEMPERATURE, melanoma_threshold=MEL_THRESHOLD)
    save(build_network("efficientnet_lite0"), meta, d)
    return d


@pytest.fixture(scope="module")
def scorer(model_dir: Path) -> Scorer:
    return Scorer.from_model_dir(model_dir, device="cpu", batch_size=4, workers=2)


@pytest.fixture(scope="module")
def real_images() -> list[tuple[str, bytes]]:
    paths = sorted(SAMPLES.glob("*.jpg"))[:N_REAL]
    assert len(paths) == N_REAL, f"sample images missing under {SAMPLES}"
    return [(p.name, p.read_bytes()) for p in paths]


@pytest.fixture
def fake_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def s3(fake_aws_env: None, real_images: list[tuple[str, bytes]]):
    import boto3
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for name, data in real_images:
            client.put_object(Bucket=BUCKET, Key=f"incoming/{name}", Body=data)
        client.put_object(Bucket=BUCKET, Key="incoming/corrupt.jpg", Body=real_images[0][1][:4000])
        client.put_object(Bucket=BUCKET, Key="incoming/notes.jpg", Body=b"this is a text file, not a JPEG\n")
        client.put_object(Bucket=BUCKET, Key="incoming/empty.jpg", Body=b"")
        yield client


def item(key: str, client=None) -> ManifestLine:
    if client is None:
        return ManifestLine(BUCKET, key, "")
    head = client.head_object(Bucket=BUCKET, Key=key)
    return ManifestLine(BUCKET, key, head["ETag"], head["ContentLength"])


def wire(lines) -> list[dict]:
    """Output lines as the transform output carries them (JSON), for field-by-field checks."""
    return [json.loads(o.to_json()) for o in lines]


def mixed_items(client, real_images) -> tuple[list[ManifestLine], list[str | None]]:
    """Real images interleaved with every kind of bad input; returns items and expected reasons."""
    items, expected = [], []
    bad = [("incoming/corrupt.jpg", reasons.CORRUPT), ("incoming/notes.jpg", reasons.NOT_AN_IMAGE),
           ("incoming/missing.jpg", reasons.READ_ERROR), ("incoming/empty.jpg", reasons.ZERO_BYTE)]
    for i, (name, _) in enumerate(real_images):
        items.append(item(f"incoming/{name}", client))
        expected.append(None)
        if i < len(bad):
            key, reason = bad[i]
            items.append(item(key, client if reason != reasons.READ_ERROR else None))
            expected.append(reason)
    return items, expected


def reference_logits(model_dir: Path, data: bytes) -> torch.Tensor:
    """Independent computation of the logits: decode -> model, one image."""
    from batch.model import load

    model, meta = load(model_dir)
    px = np.array(imaging.decode(data, meta.input_size).pixels)
    with torch.inference_mode():
        return model(torch.from_numpy(px).permute(2, 0, 1)[None]).float()[0]


def test_s3_items_keep_order_and_reasons(scorer: Scorer, s3, real_images, model_dir: Path) -> None:
    items, expected = mixed_items(s3, real_images)
    out = wire(scorer.score_items(items))
    assert [o["key"] for o in out] == [i.key for i in items]
    stats = scorer.last_stats
    assert (stats.images, stats.errors) == (N_REAL, len(items) - N_REAL) and stats.wall_s > 0
    for o, it, reason in zip(out, items, expected, strict=False):
        assert o["bucket"] == BUCKET and o["etag"] == it.etag
        if reason is None:
            assert o["status"] == "ok", o
            p = np.array([o["probabilities"][c] for c in CLASSES])
            assert abs(p.sum() - 1) < 1e-5 and (p >= 0).all()
            assert (o["width"], o["height"]) == (600, 450)
            assert o["melanoma_flag"] == (o["probabilities"]["mel"] >= MEL_THRESHOLD)
            assert o["model"] == {"name": "test", "version": "0", "weights_sha256": scorer.meta.weights_sha256}
        else:
            assert o["status"] == "error" and o["reason"] == reason, o
            assert o["detail"]
    # Calibrated: equals an independent softmax(logits / T) for the first image.
    logits = reference_logits(model_dir, real_images[0][1])
    got = np.array([out[0]["probabilities"][c] for c in CLASSES])
    np.testing.assert_allclose(got, torch.softmax(logits / TEMPERATURE, 0).numpy(), atol=1e-5)
    assert not np.allclose(got, torch.softmax(logits, 0).numpy(), atol=1e-4)  # T really applied


def test_streamed_equals_one_shot(model_dir: Path, s3, real_images) -> None:
    items, _ = mixed_items(s3, real_images)
    big = Scorer.from_model_dir(model_dir, batch_size=64, workers=4)
    small = Scorer.from_model_dir(model_dir, batch_size=2, workers=1, read_ahead_batches=1)
    one_shot, streamed = wire(big.score_items(items)), wire(small.score_items(iter(items)))
    assert [(o["key"], o["status"], o.get("reason")) for o in one_shot] == \
           [(o["key"], o["status"], o.get("reason")) for o in streamed]
    for a, b in zip(one_shot, streamed, strict=False):
        if a["status"] == "ok":
            np.testing.assert_allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-5)


def test_read_ahead_is_bounded(scorer: Scorer, real_images) -> None:
    """The scorer pulls at most a few batches ahead of what it has emitted: memory is
    bounded by the window, not by the request size."""
    consumed = 0
    pairs = real_images * 5  # 30 images

    def source():
        nonlocal consumed
        for name, data in pairs:
            consumed += 1
            yield name, data

    out = []
    gen = scorer._pipeline(((ManifestLine("", n, ""), d) for n, d in source()), lambda _line, d: scorer.decode(d))
    for rec in gen:
        out.append(rec)
        assert consumed - len(out) <= scorer.read_ahead + 2 * scorer.batch_size
    assert len(out) == len(pairs) and all(r.ok for r in out)


def test_score_bytes_matches_and_rejects(scorer: Scorer, real_images) -> None:
    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, "PNG")
    pairs = real_images[:2] + [("tiny.png", png.getvalue()), ("blank", b"")]
    out = scorer.score_bytes(pairs)
    assert [o.key for o in out] == [p[0] for p in pairs]
    assert [o.reason for o in out] == [None, None, reasons.TOO_SMALL, reasons.ZERO_BYTE]


class _Body:
    def __init__(self) -> None:
        self.closed = False

    def read(self) -> bytes:
        raise AssertionError("body of an oversized object must not be read")

    def close(self) -> None:
        self.closed = True


class _FakeS3:
    def __init__(self, length: int) -> None:
        self.length, self.calls, self.body = length, 0, _Body()

    def get_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803 (boto3 names)
        self.calls += 1
        return {"ContentLength": self.length, "Body": self.body}


def test_too_large_is_refused_from_headers(model_dir: Path) -> None:
    fake = _FakeS3(reasons.MAX_BYTES + 1)
    s = Scorer.from_model_dir(model_dir, s3=fake, batch_size=2, workers=1)
    out = list(s.score_items([ManifestLine("b", "incoming/huge.jpg", ""),
                              ManifestLine("b", "incoming/huge2.jpg", "", reasons.MAX_BYTES + 5)]))
    assert [o.reason for o in out] == [reasons.TOO_LARGE, reasons.TOO_LARGE]
    assert fake.calls == 1 and fake.body.closed  # the manifest size alone refused the second


def test_manifest_parsing_keeps_one_record_per_line() -> None:
    body = b'{"bucket": "b", "key": "incoming/a.jpg"}\nnot json\n\n[1, 2]\n{"bucket": "b"}\n{"bucket":"b","key":"k"}\n'
    items = input_fn(body, "application/jsonlines")
    assert len(items) == 6
    assert [isinstance(i, BadLine) for i in items] == [False, True, True, True, True, False]
    assert input_fn('[{"bucket": "b", "key": "x"}]', "application/json")[0].key == "x"
    with pytest.raises(ValueError):
        input_fn(body, "image/jpeg")


def test_sagemaker_contract_round_trip(model_dir: Path, s3, real_images, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMSCORE_BATCH_SIZE", "3")
    model = model_fn(str(model_dir))
    assert model.batch_size == 3
    items, expected = mixed_items(s3, real_images)
    lines = [i.to_json() for i in items]
    lines.insert(2, "{broken")
    expected.insert(2, reasons.BAD_MANIFEST_LINE)
    body = ("\n".join(lines) + "\n").encode()
    response = output_fn(predict_fn(input_fn(body, "application/jsonlines"), model), "application/jsonlines")
    assert isinstance(response, str) and not response.endswith("\n")
    out = [json.loads(ln) for ln in response.split("\n")]
    assert len(out) == len(lines)
    assert [o.get("reason") for o in out] == expected
    ok = [o for o in out if o["status"] == "ok"]
    assert len(ok) == N_REAL
    assert all(abs(sum(o["probabilities"].values()) - 1) < 1e-5 for o in ok)


def test_mismatched_weights_are_refused(model_dir: Path, tmp_path: Path) -> None:
    meta = ModelMeta.read(model_dir / "metadata.json")
    meta.weights_sha256 = "0" * 64
    (tmp_path / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
    meta.write(tmp_path / "metadata.json")
    with pytest.raises(ValueError, match="sha256"):
        Scorer.from_model_dir(tmp_path)


def test_predict_command_prints_a_row_per_image(model_dir: Path, capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    from dermscore.cli import main

    images = sorted(SAMPLES.glob("*.jpg"))[:3]
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert main(["predict", "--model", str(model_dir), *map(str, images), str(text)]) == 1   # one not scored
    out = capsys.readouterr().out.splitlines()
    rows = [ln for ln in out if ln.startswith(str(SAMPLES)) or ln.startswith(str(text))]
    assert len(rows) == 4
    assert "not_an_image" in rows[-1] and all(r.split()[1] in CLASSES for r in rows[:3])
    assert main(["predict", "--json", "--model", str(model_dir), str(images[0])]) == 0
    rec = json.loads(capsys.readouterr().out.strip())
    assert rec["status"] == "ok" and rec["key"] == str(images[0])


def test_non_finite_output_becomes_an_error_line(scorer: Scorer, real_images) -> None:
    broken = Scorer(scorer.model, scorer.meta, "cpu", batch_size=4, workers=1, runtime="torch")
    engine = broken.engine

    def nan_engine(x: torch.Tensor) -> Outputs:  # e.g. an fp16 overflow in the first image's logits
        out = engine(x)
        logits = out.logits.clone()
        logits[0] = float("nan")
        return dataclasses.replace(out, logits=logits)

    broken.engine = nan_engine
    out = broken.score_bytes(real_images[:2])
    assert [o.reason for o in out] == [reasons.NON_FINITE_OUTPUT, None]
    assert len(output_fn(out).split("\n")) == 2  # strict JSON (allow_nan=False) still serialises


def test_consumer_can_stop_early(scorer: Scorer, real_images) -> None:
    """Closing the stream cancels queued work instead of decoding the rest of the request."""
    decoded = 0

    def load(_line: ManifestLine, data: bytes) -> imaging.Decoded:
        nonlocal decoded
        decoded += 1
        return scorer.decode(data)

    stream = scorer._pipeline(((ManifestLine("", n, ""), d) for n, d in real_images * 20), load)
    assert next(stream).ok
    stream.close()
    assert decoded <= scorer.read_ahead + 2 * scorer.batch_size < len(real_images) * 20


def test_model_fn_uses_aws_endpoint_url(model_dir: Path, real_images, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local stack only sets AWS_ENDPOINT_URL: GETs must go over HTTP to that server."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="incoming/a.jpg", Body=real_images[0][1])
        scorer = model_fn(str(model_dir))
        body = json.dumps({"bucket": BUCKET, "key": "incoming/a.jpg"}) + "\n"
        out = json.loads(output_fn(predict_fn(input_fn(body, "application/jsonlines"), scorer)))
        assert out["status"] == "ok" and scorer.s3.meta.endpoint_url == f"http://127.0.0.1:{port}"
    finally:
        server.stop()
