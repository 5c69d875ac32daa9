#!/usr/bin/env bash
# Super-resolution with the pixel DDPM: the low-res input (made on the fly: x4, antialiased bicubic) upsampled
# and concatenated to the noisy high-res image, from ddpm/.
#
#   bash scripts/superres.sh train DATA [extra train.py flags]   # DATA/images/* high-res images
#   bash scripts/superres.sh eval HIGHRES OUT [flags]             # degrade held-out high-res images, super-resolve,
#                                                                 # PSNR / SSIM vs bicubic in OUT/sr_metrics.csv
#   bash scripts/superres.sh sample LOWRES OUT [flags]            # super-resolve your own low-res images
set -euo pipefail
MODE="${1:?usage: bash scripts/superres.sh train DATA | eval HIGHRES OUT | sample LOWRES OUT [flags]}"; shift
cd "$(dirname "$0")/.."
NGPU=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
SAMPLE=(--ckpt models/DDPM_superres/ckpt.pt --use-ema --sampler ddim --sampling-steps 50 --seed 0 --save-comparison)
case "$MODE" in
  train)
    DATA="${1:?usage: bash scripts/superres.sh train DATA [flags]}"; shift
    torchrun --nnodes=1 --nproc_per_node="$NGPU" train.py \
        --task superres \
        --data-root "$DATA" \
        --sr-factor 4 \
        --sr-filter bicubic \
        --image-size 128 \
        --batch-size 8 \
        --num-epochs 300 \
        --ckpt-every-steps 1000 \
        --sample-every-epochs 10 \
        "$@" ;;
  eval)
    HIGHRES="${1:?usage: bash scripts/superres.sh eval HIGHRES OUT [flags]}"
    OUT="${2:?usage: bash scripts/superres.sh eval HIGHRES OUT [flags]}"; shift 2
    torchrun --nnodes=1 --nproc_per_node="$NGPU" inference.py "${SAMPLE[@]}" \
        --ground-truth "$HIGHRES" --output-dir "$OUT" "$@" ;;
  sample)
    LOWRES="${1:?usage: bash scripts/superres.sh sample LOWRES OUT [flags]}"
    OUT="${2:?usage: bash scripts/superres.sh sample LOWRES OUT [flags]}"; shift 2
    torchrun --nnodes=1 --nproc_per_node="$NGPU" inference.py "${SAMPLE[@]}" \
        --condition "$LOWRES" --output-dir "$OUT" "$@" ;;
  *) echo "error: unknown mode '$MODE' (use train, eval or sample)" >&2; exit 2 ;;
esac
