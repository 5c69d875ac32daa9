#!/usr/bin/env bash
# Demo stage: pixel mask -> image DDPM on the digit pairs, the same masks and classes as the ControlNet stage.
#
#   bash ddpm/scripts/demo_pairs.sh DATA OUT [concat|spade]     # DATA = folder written by scripts/make_demo_data.py
#
# Trains a small conditioned UNet (base width 16) on DATA/pairs with the digit class as well (DATA/labels.csv)
# for DDPM_PAIRS_MINUTES (default 2), then generates 2 images for each of the ten held-out masks per digit in
# DATA/heldout/demo_masks (DDIM, 25 steps) with mask | image comparisons and the Dice report (ControlNet's
# definition) in OUT/generated/, and links the images by class into OUT/samples/<class_name>/ and as pairs into
# OUT/pairs/ for the evaluation stage. A rerun into the same OUT continues the run and fills in missing images.
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then echo "usage: bash ddpm/scripts/demo_pairs.sh DATA OUT [concat|spade]" >&2; exit 2; fi
DATA="$(cd "$1" && pwd)"; mkdir -p "$2"; OUT="$(cd "$2" && pwd)"; MODE="${3:-concat}"
MINUTES="${DDPM_PAIRS_MINUTES:-2}"
cd "$(dirname "$0")/.."
RESUME=()
if [ -f "$OUT/models/demo/train_state.pt" ]; then RESUME=(--resume); fi

python train.py \
    --task mask2image \
    --cond-mode "$MODE" \
    --data-root "$DATA/pairs" \
    --class-labels-csv "$DATA/labels.csv" \
    --work-dir "$OUT" \
    --run-name demo \
    --image-size 32 \
    --base-channels 16 \
    --time-dim 128 \
    --schedule cosine \
    --batch-size 32 \
    --learning-rate 1e-3 \
    --warmup-steps 50 \
    --ema-decay 0.99 \
    --ema-start 200 \
    --num-epochs 1000 \
    --max-minutes "$MINUTES" \
    --sample-every-epochs 0 \
    --log-every-steps 50 \
    ${RESUME[@]+"${RESUME[@]}"}

python inference.py \
    --ckpt "$OUT/models/demo/ckpt.pt" \
    --use-ema \
    --condition "$DATA/heldout/demo_masks" \
    --class-labels-csv "$DATA/labels.csv" \
    --samples-per-condition 2 \
    --batch-size 100 \
    --sampler ddim \
    --sampling-steps 25 \
    --cfg-scale 3 \
    --seed 0 \
    --output-dir "$OUT/generated" \
    --save-comparison \
    --report-dice

python ../scripts/demo_link_samples.py "$OUT/generated" "$OUT" --labels "$DATA/labels.csv" \
    --masks "$DATA/heldout/demo_masks"
echo "pixel mask -> image ($MODE): run in $OUT/models/demo, images and comparisons in $OUT/generated, by class in" \
     "$OUT/samples, as pairs in $OUT/pairs"
