#!/usr/bin/env bash
# Mask -> image with the pixel DDPM (the mask concatenated to the noisy image, or --cond-mode spade), from ddpm/.
#
#   bash scripts/mask2image.sh train DATA [extra train.py flags]      # DATA/images/*, DATA/masks/* (same stems)
#   bash scripts/mask2image.sh sample MASKS OUT [extra inference.py flags]
#
# train: all GPUs of this machine (or one CPU process); binary masks (any non-zero = foreground) unless
# --num-mask-classes K; 20% mask ablation so incomplete masks still work; run in models/DDPM_mask2image/.
# sample: 4 images per mask with DDIM (50 steps), mask | image comparisons and the Dice report (dice.csv).
set -euo pipefail
MODE="${1:?usage: bash scripts/mask2image.sh train DATA [flags] | sample MASKS OUT [flags]}"; shift
cd "$(dirname "$0")/.."
NGPU=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
case "$MODE" in
  train)
    DATA="${1:?usage: bash scripts/mask2image.sh train DATA [flags]}"; shift
    torchrun --nnodes=1 --nproc_per_node="$NGPU" train.py \
        --task mask2image \
        --data-root "$DATA" \
        --cond-mode concat \
        --mask-ablation 0.2 \
        --cond-dropout 0.1 \
        --image-size 64 \
        --batch-size 8 \
        --num-epochs 300 \
        --ckpt-every-steps 1000 \
        --sample-every-epochs 10 \
        "$@" ;;
  sample)
    MASKS="${1:?usage: bash scripts/mask2image.sh sample MASKS OUT [flags]}"
    OUT="${2:?usage: bash scripts/mask2image.sh sample MASKS OUT [flags]}"; shift 2
    torchrun --nnodes=1 --nproc_per_node="$NGPU" inference.py \
        --ckpt models/DDPM_mask2image/ckpt.pt \
        --use-ema \
        --condition "$MASKS" \
        --samples-per-condition 4 \
        --sampler ddim \
        --sampling-steps 50 \
        --seed 0 \
        --output-dir "$OUT" \
        --save-comparison \
        --report-dice \
        "$@" ;;
  *) echo "error: unknown mode '$MODE' (use train or sample)" >&2; exit 2 ;;
esac
