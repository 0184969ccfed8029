"""The real serving stack (infra.serving): the SageMaker PyTorch inference toolkit + TorchServe on
model.tar.gz, driven by the local transform runner as Batch Transform drives it.

Tiny random models (plumbing only). The servers of one artifact and environment are started once
and reused by the tests of this module (infra.serving.ServerPool).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLES, preserved_environ, sample_images, transform_mode, unique_name

from dermscore import layout
from dermscore.messages import ManifestLine
from dermscore.scoring import score_line
from infra.runner import MB, split_payload
from infra.serving import RESPONSE_FACTOR, ServeEnv, ServingUnavailable, descendants

SMALL_SAMPLES = SAMPLES.parent / "images_200x150"


# --------------------------------------------------------------------------- sizes (no server)

def test_output_lines_are_small_and_a_response_stays_under_its_limit() -> None:
    """Measured line sizes (printed with -s), and the worst case: the shortest manifest line
    enqueue can write (shortest stack bucket and key, one-digit size) answered by the longest
    output line (heatmap + thumbnail keys, the shipped model's name, long float reprs). A
    MaxPayloadInMB request of such lines gives a response RESPONSE_FACTOR (16x) must cover
    with a margin of 1.5 or more (TorchServe answers 413 past TS_MAX_RESPONSE_SIZE)."""
    meta = json.loads((ROOT / "models" / "default" / "metadata.json").read_text())
    model = {"name": meta["name"], "version": meta["version"], "weights_sha256": meta["weights_sha256"]}
    probs = [0.12345678901234567, 1.2345678901234567e-05, 0.2345678901234567, 0.3456789012345678,
             0.4567890123456789, 0.05678901234567891, 0.006789012345678912]

    def sizes(bucket: str, key: str, size: int) -> dict[str, int]:
        manifest = ManifestLine(bucket, key, "4f4ec51257c5b56c1318137dfe1ae6d7", size).to_json()
        line = score_line(ManifestLine.from_json(manifest), probs, model, 0.05, 60000, 45000,
                          image_sha256="e" * 64, processing_ms=123456.789, ood_score=-12.345678901234567,
                          orientation=8, ood_threshold=-1.0)
        heat = dataclasses.replace(line, heatmap_class="mel",
                                   heatmap_key=layout.image_artifact_key(key, line.etag, layout.HEATMAP_SUFFIX,
                                                                       meta["weights_sha256"]),
                                   thumbnail_key=layout.image_artifact_key(key, line.etag, layout.THUMBNAIL_SUFFIX,
                                                                         meta["weights_sha256"]))
        return {"manifest": len(manifest) + 1, "output": len(line.to_json()) + 1,
                "with_heatmap": len(heat.to_json()) + 1}

    typical = sizes("dermscore-123456789012-us-east-1", "incoming/batch/ISIC_0024306.jpg", 262144)
    worst = sizes("a-123456789012-us-east-1", "incoming/a.jpg", 1)
    longest = sizes("dermscore-123456789012-us-east-1", "incoming/" + "k" * 1011 + ".jpg", 262144)
    ratio = max(s["with_heatmap"] / s["manifest"] for s in (typical, worst, longest))
    print(f"\nbytes per line: typical {typical}, shortest {worst}, 1024-byte key {longest}; worst ratio {ratio:.2f}")
    assert typical["with_heatmap"] < 1100 and typical["output"] < 1000
    assert ratio * 1.5 <= RESPONSE_FACTOR


# --------------------------------------------------------------------------- through the server

@pytest.fixture(scope="module")
def stack(serving_mode, moto_endpoint: str, tiny_model: Path):
    """A stack with MaxPayloadInMB=1 (TS_MAX_REQUEST_SIZE 1 MiB, TS_MAX_RESPONSE_SIZE 16 MiB)."""
    from infra.runner import TransformRunner
    from infra.stack import LocalStack, use_endpoint

    with preserved_environ():
        use_endpoint(moto_endpoint)
        name = unique_name()
        s = LocalStack.create(bucket=f"{name}-images", stack_name=name, endpoint=moto_endpoint,
                              overrides={"ModelName": f"{name}-model", "MaxPayloadInMB": 1})
        s.register_model(tiny_model)
        runner = TransformRunner(s, mode="serving")
        yield s, runner
        runner.close()


def create_job(stack, manifests: dict[str, bytes], **request) -> str:
    """A transform job over ``manifests`` (file name -> lines), named outside the collect rule's
    prefix so no state-change event is delivered: these tests look at the transform alone."""
    s3, sm = stack.client("s3"), stack.client("sagemaker")
    name = f"manual-{uuid.uuid4().hex[:10]}"
    for file, body in manifests.items():
        s3.put_object(Bucket=stack.bucket, Key=f"{layout.MANIFESTS}{name}/{file}", Body=body)
    sm.create_transform_job(
        TransformJobName=name, ModelName=stack.model_name,
        MaxConcurrentTransforms=request.pop("MaxConcurrentTransforms", 1), MaxPayloadInMB=1,
        BatchStrategy="MultiRecord",
        ModelClientConfig=request.pop("ModelClientConfig", {"InvocationsTimeoutInSeconds": 600,
                                                            "InvocationsMaxRetries": 1}),
        TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix",
                                                        "S3Uri": f"s3://{stack.bucket}/{layout.MANIFESTS}{name}/"}},
                        "ContentType": request.pop("ContentType", "application/jsonlines"), "SplitType": "Line"},
        TransformOutput={"S3OutputPath": f"s3://{stack.bucket}/{layout.TRANSFORM_OUTPUT}{name}/",
                         "AssembleWith": "Line", "Accept": "application/jsonlines"},
        TransformResources={"InstanceType": "ml.g4dn.xlarge", "InstanceCount": request.pop("InstanceCount", 1)},
        **request)
    return name


def upload_images(stack, n: int) -> list[ManifestLine]:
    files = sorted(SMALL_SAMPLES.glob("*.jpg"))[:n] if SMALL_SAMPLES.is_dir() else sample_images(n)
    s3 = stack.client("s3")
    lines = []
    for f in files:
        key = f"incoming/serving/{f.name}"
        etag = s3.put_object(Bucket=stack.bucket, Key=key, Body=f.read_bytes())["ETag"].strip('"')
        lines.append(ManifestLine(stack.bucket, key, etag, f.stat().st_size))
    return lines


def outputs(stack, job: str) -> dict[str, list[dict]]:
    s3 = stack.client("s3")
    prefix = f"{layout.TRANSFORM_OUTPUT}{job}/"
    def lines(key: str) -> list[dict]:
        return [json.loads(x) for x in s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read().splitlines()]

    return {k[len(prefix):]: lines(k) for k in stack.list_keys(prefix)}


def test_a_max_payload_request_succeeds_through_the_real_server(stack) -> None:
    """One request of MaxPayloadInMB (1 MiB) of manifest lines, pointing at a few real images,
    through TorchServe with the template's limits for MaxPayloadInMB=1; one output line each."""
    s, runner = stack
    assert s.spec.model_env["TS_MAX_REQUEST_SIZE"] == str(MB)
    assert s.spec.model_env["TS_MAX_RESPONSE_SIZE"] == str(RESPONSE_FACTOR * MB)
    images = upload_images(s, 4)
    lines, size = [], 0
    while True:
        line = images[len(lines) % len(images)].to_json().encode() + b"\n"
        if size + len(line) > MB:
            break
        lines.append(line)
        size += len(line)
    bodies = split_payload(lines, 1)
    assert len(bodies) == 1 and len(bodies[0]) > MB - 200    # one request, 1 MiB less than a line
    job = create_job(s, {"part-00000.jsonl": b"".join(lines)})
    result = runner.run_job(job)
    assert result["status"] == "Completed", result["failure_reason"]
    out = outputs(s, job)["part-00000.jsonl.out"]
    assert len(out) == len(lines) and all(o["status"] == "ok" for o in out)
    assert [o["key"] for o in out[:4]] == [i.key for i in images]
    response = s.client("s3").get_object(Bucket=s.bucket, Key=f"{layout.TRANSFORM_OUTPUT}{job}/part-00000.jsonl.out")
    print(f"\n{len(lines)} lines: request {len(bodies[0])} bytes, response {response['ContentLength']} bytes "
          f"({response['ContentLength'] / len(bodies[0]):.1f}x)")


def test_a_request_that_keeps_failing_fails_the_job_after_its_retries(stack) -> None:
    """input_fn refuses text/csv: the toolkit answers 500, the runner retries
    InvocationsMaxRetries (1) times, then the job fails with the reason, as on AWS."""
    s, runner = stack
    images = upload_images(s, 1)
    job = create_job(s, {"part-00000.jsonl": images[0].to_json().encode() + b"\n"}, ContentType="text/csv")
    result = runner.run_job(job)
    assert result["status"] == "Failed"
    assert "after 1 retries" in result["failure_reason"] and "HTTP 500" in result["failure_reason"]
    assert outputs(s, job) == {}
    def answered_500() -> int:
        # TorchServe writes its access log asynchronously; the pool may hold other tests' servers
        return max(server.log_tail(400).count('"POST /invocations HTTP/1.1" 500') for server in runner.pool.running())

    deadline = time.monotonic() + 30
    while answered_500() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert answered_500() >= 2   # the server saw the first try + 1 retry


def test_instances_of_a_job_are_separate_server_processes(stack) -> None:
    """InstanceCount=2 and two manifest files: each file goes to its own TorchServe process tree."""
    s, runner = stack
    images = upload_images(s, 4)
    files = {f"part-0000{i}.jsonl": b"".join(x.to_json().encode() + b"\n" for x in images[i::2]) for i in range(2)}
    job = create_job(s, files, InstanceCount=2)
    result = runner.run_job(job)
    assert result["status"] == "Completed", result["failure_reason"]
    pids = runner.instance_pids[job]
    assert len(pids) == 2
    trees = [set(descendants(pid)) for pid in pids]
    assert not trees[0] & trees[1] and all(len(t) >= 3 for t in trees)  # launcher, java, worker(s): disjoint
    assert sorted(outputs(s, job)) == ["part-00000.jsonl.out", "part-00001.jsonl.out"]


def test_missing_serving_stack_names_make_setup(tmp_path: Path, monkeypatch, capsys) -> None:
    with pytest.raises(ServingUnavailable, match="make setup"):
        ServeEnv.locate(tmp_path / "no-venv")
    venv = Path(os.environ.get("DERMSCORE_SERVE_VENV") or ROOT / ".venv-serve")
    if (venv / "bin" / "torchserve").exists():  # a serve venv, but no Java on PATH
        monkeypatch.delenv("JAVA_HOME", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))   # no java on it
        with pytest.raises(ServingUnavailable, match="Java 11"):
            ServeEnv.locate(venv)
        monkeypatch.undo()
    from dermscore.cli import main

    monkeypatch.setenv("DERMSCORE_SERVE_VENV", str(tmp_path / "no-venv"))
    with transform_mode("serving"):
        assert main(["demo", "--model", str(ROOT / "models" / "default"), "--out", str(tmp_path / "o")]) == 2
    assert "make setup" in capsys.readouterr().err


# --------------------------------------------------------------------------- no network at all

NO_NETWORK = r'''
import json, os, socket, sys
from pathlib import Path
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
# 1. nothing but loopback: an outbound connection cannot even be routed
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("151.101.0.223", 443))   # a PyPI front end
    sys.exit("outbound connection succeeded: not isolated")
except OSError as exc:
    isolated = str(exc)
# 2. the whole local pipeline in this namespace: moto, enqueue, the serving stack, collect
from infra.local import LocalPipeline
from infra.serving import SERVERS
model, images, out = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
with LocalPipeline(model, bucket="offline-images", stack_name="offline", batching_window_s=0.5,
                   visibility_timeout=2, overrides={"ModelName": "offline-model", "HeatmapMode": "all"}) as p:
    assert p.runner.mode == "serving"
    keys = p.upload(sorted(images.glob("*.jpg")), "incoming/offline/")
    p.drain(timeout_s=300)
    counts = p.export(out)
    s3 = p.s3
    servers = SERVERS.running()
    stored = [k for k in p.stack.list_keys("results/images/") if k.endswith((".heatmap.png", ".thumb.jpg"))]
    logs = "\n".join(srv.log_path.read_text(errors="replace") for srv in servers)
    requirements = [str(f) for srv in servers for f in srv.model_dir.rglob("requirements*.txt")]
    print(json.dumps({"isolated": isolated, "keys": keys, "counts": counts, "jobs": p.runner.results,
                      "pictures": stored, "servers": len(servers), "requirements": requirements,
                      "pip_in_log": [ln for ln in logs.splitlines() if "pip" in ln.lower() and "install" in ln.lower()],
                      "runtime_in_log": [ln for ln in logs.splitlines() if "runtime onnx (onnxruntime" in ln],
                      "log_lines": len(logs.splitlines())}, default=str))
'''


def test_the_package_starts_and_scores_with_no_network(serve_env, tiny_model: Path, tmp_path: Path) -> None:
    """In a network namespace of its own (``unshare --net``: loopback only), the moto server, the
    handlers and the serving stack score images; the toolkit installs nothing (no requirements
    file in the package, no pip in the server log), and the container stores the heatmaps."""
    from infra.package import fetch_wheels

    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        if os.environ.get("REQUIRE_SERVING") == "1":
            pytest.fail("needs root, unshare and ip (util-linux, iproute2) for a network namespace")
        pytest.skip("needs root, unshare and ip for a network namespace")
    fetch_wheels()  # the archive is built inside, from the wheel cache: nothing to download there
    images = tmp_path / "images"
    images.mkdir()
    for f in sample_images(3):
        shutil.copy(f, images / f.name)
    (tmp_path / "offline.py").write_text(textwrap.dedent(NO_NETWORK))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PYTHONPATH=str(ROOT), DERMSCORE_TRANSFORM="serving", OMP_NUM_THREADS="1", DERMSCORE_WORKERS="2")
    cmd = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
           str(tmp_path / "offline.py"), str(ROOT), str(tiny_model), str(images), str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "unreachable" in result["isolated"].lower() or "errno" in result["isolated"].lower()
    assert result["servers"] == 1 and result["log_lines"] > 10
    assert [j["status"] for j in result["jobs"]] == ["Completed"]
    assert result["counts"]["predictions"] == 1 and result["counts"]["images"] >= 3
    assert result["requirements"] == [] and result["pip_in_log"] == []
    assert result["runtime_in_log"]  # the CPU runtime vendored in the package, not the serve venv's
    assert len(result["pictures"]) == 2 * len(result["keys"])  # HeatmapMode=all: heatmap + thumbnail each
