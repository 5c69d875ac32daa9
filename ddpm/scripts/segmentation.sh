#!/usr/bin/env bash
# Segmentation by diffusion (image in, mask out) with the pixel DDPM, from ddpm/.
#
#   bash scripts/segmentation.sh train DATA [extra train.py flags]          # DATA/images/*, DATA/masks/*
#   bash scripts/segmentation.sh sample IMAGES OUT [GROUND_TRUTH_MASKS] [flags]
#
# sample: 8 masks per image; their mean mask (<stem>_mean.png), a per-pixel uncertainty map
# (<stem>_uncertainty.png: how much the 8 samples disagree) and, with ground-truth masks, Dice of the mean mask
# and of the samples (mean and best of 8) in OUT/seg_metrics.csv.
set -euo pipefail
MODE="${1:?usage: bash scripts/segmentation.sh train DATA [flags] | sample IMAGES OUT [GT] [flags]}"; shift
cd "$(dirname "$0")/.."
NGPU=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
case "$MODE" in
  train)
    DATA="${1:?usage: bash scripts/segmentation.sh train DATA [flags]}"; shift
    torchrun --nnodes=1 --nproc_per_node="$NGPU" train.py \
        --task segmentation \
        --data-root "$DATA" \
        --num-mask-classes 2 \
        --image-size 64 \
        --batch-size 8 \
        --num-epochs 300 \
        --ckpt-every-steps 1000 \
        --sample-every-epochs 10 \
        "$@" ;;
  sample)
    IMAGES="${1:?usage: bash scripts/segmentation.sh sample IMAGES OUT [GT] [flags]}"
    OUT="${2:?usage: bash scripts/segmentation.sh sample IMAGES OUT [GT] [flags]}"; shift 2
    GT=()
    if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then GT=(--ground-truth "$1"); shift; fi
    torchrun --nnodes=1 --nproc_per_node="$NGPU" inference.py \
        --ckpt models/DDPM_segmentation/ckpt.pt \
        --use-ema \
        --condition "$IMAGES" \
        ${GT[@]+"${GT[@]}"} \
        --samples-per-condition 8 \
        --sampler ddim \
        --sampling-steps 50 \
        --seed 0 \
        --output-dir "$OUT" \
        "$@" ;;
  *) echo "error: unknown mode '$MODE' (use train or sample)" >&2; exit 2 ;;
esac
