#!/usr/bin/env bash
# Train DiT-B/2 on an 8-class image folder with 4 GPUs; --resume continues the latest run (a new run if none).
#   bash scripts/train.sh /path/to/data
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:?usage: bash scripts/train.sh /path/to/data [extra train.py flags]}"
shift
torchrun --nnodes=1 --nproc_per_node="${NPROC:-4}" train.py \
    --model DiT-B/2 \
    --data_root "$DATA" \
    --results_dir ./results \
    --image_size 256 \
    --num_classes 8 \
    --global_batch_size 256 \
    --num_epochs 1400 \
    --vae ema \
    --ckpt_every_steps 50000 \
    --mixed_precision auto \
    --cache_latents \
    --resume \
    "$@"
