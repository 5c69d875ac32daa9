#!/usr/bin/env bash
# Train DiT-B/2 on an 8-class image folder with 4 GPUs (add --resume auto to continue the latest run).
#   bash scripts/train.sh /path/to/data
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:?usage: bash scripts/train.sh /path/to/data [extra train.py flags]}"
shift
torchrun --nnodes=1 --nproc_per_node="${NPROC:-4}" train.py \
    --model DiT-B/2 \
    --data-path "$DATA" \
    --results-dir ./results \
    --image-size 256 \
    --num-classes 8 \
    --global-batch-size 256 \
    --epochs 1400 \
    --vae ema \
    --ckpt-every 50000 \
    --mixed-precision auto \
    --cache-latents \
    --resume auto \
    "$@"
