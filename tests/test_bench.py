"""``dermscore bench --quick`` end to end: every figure is there and positive.

Only that the benchmark works is checked (CI machines differ): no time or ratio is asserted.
The model is a tiny random network made here; its figures mean nothing and are never published.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import SAMPLES, random_model

FIGURES = ("forward_rate", "e2e_rate", "e2e_vs_forward", "seed_rate", "e2e_vs_seed",
           "decode_with_draft_per_core", "decode_without_draft_per_core", "peak_rss_mb",
           "usd_per_million_e2e", "usd_per_million_forward",
           "transform.rate", "transform.vs_forward", "decode.cpu_ms_per_image",
           # by runtime, by heatmap mode, serving CPU against forward + decode, the moto server's share
           "forward.torch.rate", "forward.torch.cpu_ms_per_image", "forward.onnx.rate", "forward.onnx_vs_torch",
           "transform.rate.off", "transform.rate.high", "transform.high_vs_off",
           "transform.serving_cpu_ms_per_image", "transform.serving_cpu_ms_per_image.high",
           "transform.forward_decode_cpu_ms_per_image", "transform.serving_vs_forward_decode",
           "transform.images_per_vcpu_s", "moto.cpu_ms_per_image", "moto.cpu_share",
           # one job alone per heatmap mode
           "transform_one_job.rate.off", "transform_one_job.rate.high", "transform_one_job.high_vs_off",
           "transform_one_job.serving_cpu_ms_per_image.off", "transform_one_job.serving_vs_forward_decode")
# CPU per image of the serving processes minus the forward pass: a difference of two measurements,
# only required to be there (and finite)
PRESENT = ("transform.cpu_ms_outside_forward",)


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model(tmp_path_factory.mktemp("bench-model"))


def test_quick_bench_prints_every_figure(bench_model: Path, tmp_path: Path, capsys, serving_mode) -> None:
    """The transform phase goes through the real serving stack (the bench's default)."""
    import math

    from dermscore.cli import main

    if len(list(SAMPLES.glob("*.jpg"))) < 40:
        pytest.skip(f"needs 40 sample images in {SAMPLES}")
    def aws_env() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "DERMSCORE_"))}

    env_before = aws_env()
    out_json = tmp_path / "bench.json"
    rc = main(["bench", "--quick", "--model", str(bench_model), "--out", str(out_json), "--quiet"])
    assert rc == 0
    assert aws_env() == env_before  # the bench's AWS_* endpoint settings do not leak

    result = json.loads(out_json.read_text())
    figures = result["figures"]
    for name in FIGURES:
        assert figures.get(name) is not None and figures[name] > 0, name
    for name in PRESENT:
        assert figures.get(name) is not None and math.isfinite(figures[name]), name
    assert result["e2e"]["transform_mode"] == "serving" and "TorchServe 0.12.0" in result["e2e"]["transform_stack"]
    assert result["e2e"]["parquet_rows"] == result["images"] == 40
    assert result["e2e"]["failed"] == 0
    per_image = result["e2e"]["api_calls_per_image"]        # the pipeline's calls, uploads excluded
    assert isinstance(per_image, (int, float)) and per_image > 0
    by_op = result["e2e"]["api_calls_per_image_by_operation"]
    assert by_op and all(v > 0 for v in by_op.values())
    assert abs(sum(by_op.values()) - per_image) < 0.01
    assert set(result["memory"]["phases"]) >= {"decode", "forward", "seed", "e2e", "e2e-heatmaps-high",
                                               "transform-heatmaps-off", "transform-heatmaps-high"}
    assert result["machine"]["device"].startswith("cpu")
    # the pipeline's forward figure is the chosen runtime's (auto on the CPU: ONNX Runtime)
    assert result["forward"] == result["forward_by_runtime"]["onnx"] and "onnxruntime" in result["machine"]["runtime"]
    assert set(result["e2e_by_heatmaps"]) == {"off", "high"} and result["e2e"] == result["e2e_by_heatmaps"]["off"]
    assert result["e2e_by_heatmaps"]["high"]["parquet_rows"] == 40 and result["e2e_by_heatmaps"]["high"]["failed"] == 0
    one = result["transform_by_heatmaps"]
    assert set(one) == {"off", "high"} and all(t["jobs"] == 1 and t["images"] == 40 for t in one.values())
    assert one["off"]["heatmaps_stored"] == 0 and one["high"]["transform_mode"] == "serving"

    table = capsys.readouterr().out
    for label in ("1. model forward", "2. end to end", "3. seed style", "4. decode", "5. peak RSS",
                  "ml.g4dn.xlarge", "AWS API calls per image", "GetObject", "forward on onnx",
                  "ratio transform high / off", "serving CPU / (forward + decode)", "moto server's share",
                  "one transform job alone, heatmaps high", "ratio one job high / off"):
        assert label in table


def test_cuda_without_a_gpu_is_a_clean_error(bench_model: Path, capsys) -> None:
    import torch

    from dermscore.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA path runs for real")
    assert main(["bench", "--quick", "--device", "cuda", "--model", str(bench_model)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
