"""The SageMaker model.tar.gz: layout, reproducibility, and that it serves on its own."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from batch.model import ModelMeta, build_network, save
from infra.container import CONTAINER
from infra.package import (
    PROJECT_PACKAGES,
    ROOT,
    SERVING_ENTRY,
    build_model_tarball,
    code_closure,
    copy_lambda_code,
)

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000" / "fullres_sample"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    save(build_network("efficientnet_lite0"),
         ModelMeta(name="test", version="0", arch="efficientnet_lite0", input_size=(64, 64)), d)
    (d / "checkpoint.pt").write_bytes(b"training state that must not ship")
    return d


@pytest.fixture(scope="module")
def tarball(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_tarball(model_dir, tmp_path_factory.mktemp("build") / "model.tar.gz")


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_layout(tarball: Path) -> None:
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        shim = tar.extractfile("code/inference.py").read().decode()
    assert {"model.pt", "metadata.json", "code/inference.py",
            "code/batch/inference.py", "code/batch/model.py", "code/dermscore/imaging.py",
            "code/dermscore/scoring.py"} <= names
    assert "code/dermscore/results.py" not in names   # pyarrow-free: the container has no pyarrow
    assert "checkpoint.pt" not in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    files = {n for n in names if not n.endswith("/") and "." in n.rsplit("/", 1)[-1]}
    assert all(n.endswith(".py") for n in files if n.startswith(("code/batch/", "code/dermscore/")))
    # Nothing for the toolkit to pip-install at start: what the container lacks is in code/lib/.
    assert not any(n.endswith("requirements.txt") for n in names)
    for wheel in CONTAINER.vendored:
        dist = wheel.name.replace("-", "_")
        assert f"code/lib/{dist}/__init__.py" in names, wheel
        assert f"code/lib/{dist}-{wheel.version}.dist-info/METADATA" in names, wheel
    assert not any(n.startswith(("code/lib/torch", "code/lib/numpy", "code/lib/PIL", "code/lib/boto")) for n in names)
    assert all(fn in shim for fn in ("model_fn", "input_fn", "predict_fn", "output_fn")) and '"lib"' in shim
    # The CPU runtime: the exported graph, and onnxruntime once per CPython, trimmed (infra.container).
    assert "model.onnx" in names and '"cp%d%d"' in shim
    for wheel in CONTAINER.binary:
        assert f"code/lib/{wheel.tag}/onnxruntime/__init__.py" in names, wheel
        assert any(n.startswith(f"code/lib/{wheel.tag}/onnxruntime/capi/onnxruntime_pybind11_state.cpython-"
                                f"{wheel.tag[2:]}") for n in names), wheel
    assert not any("libonnxruntime.so" in n or "/onnxruntime/tools/" in n
                   or n.endswith("onnxruntime-1.32.0.dist-info/RECORD") for n in names)


def test_reproducible(model_dir: Path, tarball: Path, tmp_path: Path) -> None:
    again = build_model_tarball(model_dir, tmp_path / "again.tar.gz")
    assert sha256(again) == sha256(tarball)


def test_refuses_weights_that_do_not_match_metadata(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes((model_dir / "model.pt").read_bytes() + b"x")
    (bad / "metadata.json").write_text((model_dir / "metadata.json").read_text())
    with pytest.raises(ValueError):
        build_model_tarball(bad, tmp_path / "bad.tar.gz")


SERVE = r'''
import json, os, sys
from pathlib import Path
import boto3
from moto import mock_aws
import inference, batch, dermscore, monai, efficientnet_lite_pytorch

code = Path(sys.argv[1]).resolve()
# The shipped copies are what runs, not the repository's, nor this venv's monai.
assert Path(batch.__file__).resolve().is_relative_to(code), batch.__file__
assert Path(dermscore.__file__).resolve().is_relative_to(code), dermscore.__file__
for vendored in (monai, efficientnet_lite_pytorch):
    assert Path(vendored.__file__).resolve().is_relative_to(code / "lib"), vendored.__file__
with mock_aws():
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="dermscore-test")
    s3.put_object(Bucket="dermscore-test", Key="incoming/x.jpg", Body=Path(sys.argv[2]).read_bytes())
    model = inference.model_fn(str(code.parent))
    # On the CPU: ONNX Runtime from code/lib/cp<XY>, on the shipped model.onnx.
    import onnxruntime
    assert model.engine.name == "onnx", model.engine
    assert Path(onnxruntime.__file__).resolve().is_relative_to(code / "lib"), onnxruntime.__file__
    assert model.engine.metadata_matches(model.meta)  # the graph exported from the shipped weights
    body = (b'{"bucket": "dermscore-test", "key": "incoming/x.jpg"}\n'
            b'{"bucket": "dermscore-test", "key": "incoming/gone.jpg"}\n')
    data = inference.input_fn(body, "application/jsonlines")
    print(inference.output_fn(inference.predict_fn(data, model), "application/jsonlines"))
'''


def test_extracted_tarball_serves(tarball: Path, tmp_path: Path) -> None:
    root = tmp_path / "opt_ml_model"
    root.mkdir()
    with tarfile.open(tarball) as tar:
        tar.extractall(root, filter="data")
    (tmp_path / "serve.py").write_text(SERVE)
    image = sorted(SAMPLES.glob("*.jpg"))[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PYTHONPATH=str(root / "code"), AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", OMP_NUM_THREADS="1", DERMSCORE_WORKERS="2")
    proc = subprocess.run([sys.executable, str(tmp_path / "serve.py"), str(root / "code"), str(image)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in proc.stdout.strip().splitlines()]
    assert [ln["status"] for ln in lines] == ["ok", "error"]
    assert lines[1]["reason"] == "read_error"
    assert abs(sum(lines[0]["probabilities"].values()) - 1) < 1e-5
    meta = json.loads((root / "metadata.json").read_text())
    assert lines[0]["model"]["weights_sha256"] == meta["weights_sha256"]


LAMBDA = r'''
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
import dermscore, handlers.collect
from dermscore import report

code = Path(sys.argv[1]).resolve()
assert Path(dermscore.__file__).resolve().is_relative_to(code), dermscore.__file__
assert Path(handlers.collect.__file__).resolve().is_relative_to(code), handlers.collect.__file__
end = datetime(2026, 1, 1, tzinfo=UTC)
job = {"name": "j-<1>", "instance_type": "ml.g4dn.xlarge", "instance_count": 1, "started": end - timedelta(hours=1),
       "ended": end}
print(report.render(report.job_page([], [], job)))
'''


def test_lambda_code_is_the_handlers_closure_plus_its_package_data(tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    copied = copy_lambda_code(out)
    assert {"handlers/collect.py", "handlers/enqueue.py", "dermscore/report.py",
            "dermscore/templates/report.html.j2"} <= set(copied)
    assert not any(rel.startswith(("batch/", "training/", "analytics/", "bench/", "infra/")) for rel in copied)
    assert "dermscore/imaging.py" not in copied        # Pillow-free: images are decoded in the container only
    assert [rel for rel in copied if not rel.endswith(".py")] == ["dermscore/templates/report.html.j2"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(copied)
    # the copied package renders collect's report page on its own (the template travels with it)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PYTHONPATH=str(out), AWS_DEFAULT_REGION="us-east-1")
    (tmp_path / "lambda.py").write_text(LAMBDA)
    proc = subprocess.run([sys.executable, str(tmp_path / "lambda.py"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "job j-&lt;1&gt;" in proc.stdout and "<tr><td>cost</td><td>$0.7360</td></tr>" in proc.stdout


def test_model_tarball_holds_no_report(tarball: Path) -> None:
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert "code/dermscore/report.py" not in names and not any("templates" in n for n in names)


def test_archive_holds_only_the_serving_closure(tarball: Path) -> None:
    """model.tar.gz = weights + the modules batch.inference imports: no training, benchmark,
    CLI, report, handler or local-stack module."""
    with tarfile.open(tarball) as tar:
        modules = {n for n in tar.getnames() if n.endswith(".py") and not n.startswith("code/lib/")}
    expected = {f"code/{rel}" for rel, _ in code_closure([SERVING_ENTRY])} | {"code/inference.py"}
    assert modules == expected
    assert {"code/batch/inference.py", "code/batch/scorer.py", "code/dermscore/imaging.py"} <= modules
    never = ("code/training/", "code/bench/", "code/analytics/", "code/infra/", "code/handlers/",
             "code/dermscore/cli.py", "code/dermscore/report.py", "code/dermscore/template.py")
    assert not [m for m in modules if m.startswith(never)]


def test_archive_bytes_ignore_edits_outside_the_closure(model_dir: Path, tmp_path: Path) -> None:
    """Editing the benchmark or the CLI leaves model.tar.gz byte-identical (no new SageMaker
    Model); editing the scorer does not."""
    root = tmp_path / "repo"
    for pkg in PROJECT_PACKAGES:
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = sha256(build_model_tarball(model_dir, tmp_path / "before.tar.gz", root=root))
    with open(root / "bench" / "throughput.py", "a") as f:
        f.write("\n# an edit to the benchmark\n")
    cli = root / "dermscore" / "cli.py"
    cli.write_text(cli.read_text().replace("Bulk scoring of dermatoscopic images.", "Other help text."))
    assert sha256(build_model_tarball(model_dir, tmp_path / "after.tar.gz", root=root)) == before
    with open(root / "batch" / "scorer.py", "a") as f:
        f.write("\n# an edit to the container code\n")
    assert sha256(build_model_tarball(model_dir, tmp_path / "scorer.tar.gz", root=root)) != before

