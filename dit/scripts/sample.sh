#!/usr/bin/env bash
# Sample from a trained DiT: a few images per class, then a 50k FID set with several GPUs.
#   bash scripts/sample.sh ./results/000-DiT-B-2/checkpoints/0050000.pt
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT="${1:?usage: bash scripts/sample.sh CHECKPOINT}"
python sample.py \
    --ckpt "$CKPT" \
    --num-samples 64 \
    --batch-size 16 \
    --cfg-scale 4.0 \
    --num-sampling-steps 250 \
    --output-dir ./samples
torchrun --nnodes=1 --nproc_per_node="${NPROC:-1}" sample_ddp.py \
    --ckpt "$CKPT" \
    --num-fid-samples "${NUM_FID_SAMPLES:-50000}" \
    --cfg-scale 1.5 \
    --num-sampling-steps 250 \
    --sample-dir ./samples \
    --class-subfolders
