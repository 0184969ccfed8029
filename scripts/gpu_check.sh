#!/usr/bin/env bash
# One short GPU check (has NOT been run: no GPU was available when it was written).
#
# On a GPU host with this repository checked out, it installs what it needs (the project venv
# with the CUDA build of torch 2.13.0, the serve venv with TorchServe 0.12.0 + the SageMaker
# PyTorch inference toolkit 2.0.25, Java), then
#   1. starts the real serving stack on model.tar.gz with DERMSCORE_DEVICE=cuda and scores a
#      manifest through it (the same runner as `dermscore demo`);
#   2. runs `dermscore bench --device cuda --quick` (transform through the serving stack included);
# and prints every figure. Results go under $OUT when it is set (else ./gpu-check-out).
#
#   bash scripts/gpu_check.sh            # CUDA_INDEX defaults to the cu128 wheel index of torch 2.13
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
CUDA_INDEX="${CUDA_INDEX:-https://download.pytorch.org/whl/cu128}"
log() { echo "== $*" | tee -a "$OUT/gpu_check.log"; }

nvidia-smi | tee "$OUT/nvidia-smi.txt" || { echo "no nvidia-smi: not a GPU host"; exit 2; }
command -v java >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless; }

log "project venv (.venv) with the CUDA build of torch 2.13.0"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0 --index-url "$CUDA_INDEX" || .venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e '.[dev]'
log "serve venv (.venv-serve) with the CUDA build of torch 2.13.0"
[ -x .venv-serve/bin/python ] || python3 -m venv .venv-serve
.venv-serve/bin/pip install --quiet --upgrade pip
.venv-serve/bin/pip install --quiet torch==2.13.0 --index-url "$CUDA_INDEX" || .venv-serve/bin/pip install --quiet torch==2.13.0
.venv-serve/bin/pip install --quiet $(python3 -m infra.container --serve-requirements)
touch .venv/.installed .venv-serve/.installed
.venv/bin/python -m infra.package --fetch-wheels > /dev/null
.venv-serve/bin/python -c "import torch; print('serve venv torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  | tee -a "$OUT/gpu_check.log"

log "1. the serving stack on CUDA: dermscore demo (model.tar.gz through TorchServe, DERMSCORE_DEVICE=cuda)"
DERMSCORE_DEVICE=cuda DERMSCORE_TRANSFORM=serving .venv/bin/dermscore demo --out "$OUT/demo-output" \
  2>"$OUT/demo.stderr" | tee "$OUT/demo.txt"

log "2. dermscore bench --device cuda --quick"
.venv/bin/dermscore bench --device cuda --quick --model models/default --out "$OUT/bench-cuda-quick.json" \
  --quiet 2>"$OUT/bench.stderr" | tee "$OUT/bench-cuda-quick.txt"
.venv/bin/python - "$OUT/bench-cuda-quick.json" <<'PY' | tee "$OUT/figures.txt"
import json, sys
for k, v in sorted(json.load(open(sys.argv[1]))["figures"].items()):
    print(f"{k:40s} {v}")
PY
log "done: files in $OUT"
