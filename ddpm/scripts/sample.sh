#!/usr/bin/env bash
# Sample 8000 images (spread evenly over the classes and GPUs) with the EMA weights, one folder per class.
#
#   bash scripts/sample.sh [CKPT] [OUTPUT_DIR] [extra flags, e.g. --sampler ddim --sampling-steps 100]
#
# Rerunning the same command completes an interrupted run (existing images are kept, never overwritten).
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT="${1:-./models/DDPM_conditional/ckpt.pt}"
OUT="${2:-./samples/DDPM_conditional_ema}"
shift $(( $# > 2 ? 2 : $# ))
NGPU=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
torchrun --nnodes=1 --nproc_per_node="$NGPU" ddpm_conditional_ddp.py \
    --mode sample_ddp \
    --ckpt "$CKPT" \
    --use-ema \
    --num-samples 8000 \
    --batch-size 8 \
    --cfg-scale 3 \
    --seed 0 \
    --output-dir "$OUT" \
    --class-subfolders \
    "$@"
