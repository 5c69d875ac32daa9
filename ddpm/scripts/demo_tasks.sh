#!/usr/bin/env bash
# Demo stage: pixel DDPM super-resolution (x4) and segmentation on the digit pairs, judged on the held-out digits.
#
#   bash ddpm/scripts/demo_tasks.sh DATA OUT       # DATA = folder written by scripts/make_demo_data.py
#
# superres: trains on DATA/pairs/images for DDPM_TASKS_MINUTES (default 2), then degrades every held-out image
#   (x4, antialiased bicubic: 8x8 inputs), super-resolves it and writes PSNR / SSIM of each sample and of bicubic
#   upsampling of the same input to OUT/superres/sr_metrics.csv (means printed).
# segmentation: trains on DATA/pairs (image in, mask out) for the same time, then samples 4 masks per held-out
#   image: mean mask, uncertainty map (how much the 4 disagree) and Dice of the mean mask and of the samples
#   against the true masks in OUT/segmentation/seg_metrics.csv (means printed).
# A rerun into the same OUT continues the runs and fills in missing outputs.
set -euo pipefail
if [ $# -ne 2 ]; then echo "usage: bash ddpm/scripts/demo_tasks.sh DATA OUT" >&2; exit 2; fi
DATA="$(cd "$1" && pwd)"; mkdir -p "$2"; OUT="$(cd "$2" && pwd)"
MINUTES="${DDPM_TASKS_MINUTES:-2}"
cd "$(dirname "$0")/.."
SMALL=(--image-size 32 --base-channels 16 --time-dim 128 --schedule cosine --batch-size 32 --learning-rate 1e-3
       --warmup-steps 50 --ema-decay 0.99 --ema-start 200 --num-epochs 1000 --max-minutes "$MINUTES"
       --sample-every-epochs 0 --log-every-steps 50)
SAMPLE=(--use-ema --sampler ddim --sampling-steps 25 --batch-size 100 --seed 0)

for task in superres segmentation; do
  RESUME=()
  if [ -f "$OUT/models/$task/train_state.pt" ]; then RESUME=(--resume); fi
  echo "=== $task: training ==="
  python train.py --task "$task" --data-root "$DATA/pairs" --work-dir "$OUT" --run-name "$task" "${SMALL[@]}" \
      ${RESUME[@]+"${RESUME[@]}"}
done

echo "=== superres: the held-out images, x4 ==="
python inference.py --ckpt "$OUT/models/superres/ckpt.pt" "${SAMPLE[@]}" \
    --ground-truth "$DATA/heldout/pairs/images" --output-dir "$OUT/superres" --save-comparison
echo "=== segmentation: the held-out images, 4 masks each ==="
python inference.py --ckpt "$OUT/models/segmentation/ckpt.pt" "${SAMPLE[@]}" \
    --condition "$DATA/heldout/pairs/images" --ground-truth "$DATA/heldout/pairs/masks" \
    --samples-per-condition 4 --output-dir "$OUT/segmentation" --save-comparison
echo "pixel DDPM tasks: super-resolution in $OUT/superres (sr_metrics.csv), segmentation in $OUT/segmentation" \
     "(seg_metrics.csv, <stem>_mean.png, <stem>_uncertainty.png); runs in $OUT/models/"
