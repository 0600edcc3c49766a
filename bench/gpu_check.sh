#!/usr/bin/env bash
# The checks that need a GPU, in one go (under 8 minutes on one H100-class GPU; each step has its own time limit).
#
#   bash bench/gpu_check.sh [DINOV2_CHECKOUT]     # from the repository root, with the project's venv active
#
# 1. pytest -m gpu                                   (FSDP bf16 on the GPU through Lightning, with a resume)
# 2. the pretrain CLI: bf16 FSDP, 20 steps of the demo recipe, stopped at 10 and resumed
# 3. the tiny pipeline (`lvd run configs/tiny.yaml`): dedup and embed on the GPU, FAISS on the GPU (faiss-gpu)
# 4. bench/train_step.py, ViT-S/14, B/14, L/14 in bf16 (+ the official code in fp32 when a checkout is given)
# Output: stdout, and everything under ${OUT:-/tmp/lvd_gpu_check}.
set -euo pipefail
OFFICIAL=${1:-}
OUT=${OUT:-/tmp/lvd_gpu_check}
PY=${PYTHON:-python}
rm -rf "$OUT" && mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { echo; echo "=== $1 ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, faiss; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'bf16', torch.cuda.is_bf16_supported(), 'faiss GPUs', faiss.get_num_gpus())"

step "1. pytest -m gpu"
timeout 120 $PY -m pytest -q -m gpu tests/

step "2. pretrain CLI: bf16 FSDP on one GPU, 10 steps, then resumed to 20"
$PY -c "from pathlib import Path; from training.demo_check import mnist_split, write_folder; \
write_folder(mnist_split()['pretrain'][0][:512], Path('$OUT/digits'))"
TRAIN="train.accelerator=gpu train.devices=1 train.strategy=fsdp train.precision=bf16 train.max_steps=20"
timeout 90 $PY -m training.pretrain --config configs/demo.yaml --interrupt-at 10 --out "$OUT/fsdp_run" \
  --data "$OUT/digits" -- $TRAIN
timeout 90 $PY -m training.pretrain --config configs/demo.yaml --out "$OUT/fsdp_run" --data "$OUT/digits" -- $TRAIN
$PY - "$OUT/fsdp_run" <<'EOF'
import sys
from pathlib import Path
from training.metrics import read_csv
rows = read_csv(Path(sys.argv[1]) / "metrics.csv")
steps = [r["step"] for r in rows]
assert steps == list(range(20)), steps
print(f"resumed run: steps 0-19 logged once each; total_loss {rows[0]['total_loss']:.3f} -> {rows[-1]['total_loss']:.3f}")
EOF

step "3. tiny pipeline: dedup and embed on the GPU"
timeout 240 lvd run configs/tiny.yaml run.root="$OUT/runs"
grep -rhoE '"(device|gpu|use_gpu)": *[^,}]+' "$OUT/runs" | sort | uniq -c || true

step "4. training step: ViT-S/14, B/14, L/14 in bf16"
ARGS="--models vits,vitb,vitl --dtypes bf16 --batch 16 --steps 3 --rounds 3 --warmup 2"
if [ -n "$OFFICIAL" ]; then ARGS="$ARGS --official $OFFICIAL"; fi
timeout 240 $PY bench/train_step.py $ARGS

step "done"
