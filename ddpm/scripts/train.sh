#!/usr/bin/env bash
# Train the class-conditional DDPM on all GPUs of this machine (or one CPU process), from ddpm/.
#
#   bash scripts/train.sh /path/to/dataset [extra train.py flags, e.g. --resume]
#
# Per-process batch 8 -> global batch 8 x GPUs. Checkpoints: models/DDPM_conditional/{ckpt,ema_ckpt}.pt
set -euo pipefail
DATA="${1:?usage: bash scripts/train.sh /path/to/dataset [flags]}"; shift
cd "$(dirname "$0")/.."
NGPU=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
torchrun --nnodes=1 --nproc_per_node="$NGPU" ddpm_conditional_ddp.py \
    --mode train_ddp \
    --data-root "$DATA" \
    --run-name DDPM_conditional \
    --image-size 64 \
    --batch-size 8 \
    --num-epochs 300 \
    --learning-rate 3e-4 \
    --mixed-precision no \
    --ckpt-every-steps 1000 \
    --sample-every-epochs 10 \
    "$@"
