#!/usr/bin/env bash
# Demo stage: class-conditional DDPM on the bundled digits (32x32 grayscale), a few minutes on CPU.
#
#   bash ddpm/scripts/demo.sh DATA OUT       # DATA = folder written by scripts/make_demo_data.py
#
# Trains a small UNet (base width 16, 1.5M parameters, v-prediction: in the same 3 minutes epsilon-prediction
# reached class accuracy 0.80 and FD 375 on the demo's evaluation, v 1.00 and FD 94) for a fixed time budget
# (DDPM_DEMO_MINUTES, default 3; digits appear after ~400 steps of batch 32; on a busy machine OMP_NUM_THREADS=1
# may train faster), then samples 20 images per class (DDPM_DEMO_PER_CLASS)
# with DDIM (25 steps, guidance 3) into OUT/samples/<class_name>/ and a grid per class into OUT/grids/.
# The run itself is in OUT/models/demo/ (ckpt.pt, ema_ckpt.pt, config.json, log.txt).
set -euo pipefail
if [ $# -ne 2 ]; then echo "usage: bash ddpm/scripts/demo.sh DATA OUT" >&2; exit 2; fi
DATA="$1"; OUT="$2"
MINUTES="${DDPM_DEMO_MINUTES:-3}"
PER_CLASS="${DDPM_DEMO_PER_CLASS:-20}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

python train.py \
    --data-root "$DATA/digits" \
    --work-dir "$OUT" \
    --run-name demo \
    --image-size 32 \
    --channels auto \
    --base-channels 16 \
    --time-dim 128 \
    --schedule cosine \
    --prediction-type v_prediction \
    --batch-size 32 \
    --learning-rate 1e-3 \
    --warmup-steps 50 \
    --ema-decay 0.99 \
    --ema-start 200 \
    --num-epochs 1000 \
    --max-minutes "$MINUTES" \
    --sample-every-epochs 0 \
    --log-every-steps 50

python inference.py \
    --ckpt "$OUT/models/demo/ckpt.pt" \
    --use-ema \
    --num-samples $((PER_CLASS * 10)) \
    --batch-size 100 \
    --sampler ddim \
    --sampling-steps 25 \
    --cfg-scale 3 \
    --output-dir "$OUT/samples" \
    --class-subfolders \
    --grid-dir "$OUT/grids"

echo "DDPM demo results:"
echo "  samples (${PER_CLASS} per class): $OUT/samples/<class_name>/"
echo "  grids (one per class + all_classes.png): $OUT/grids/"
echo "  run (checkpoints, log, TensorBoard): $OUT/models/demo/  $OUT/runs/demo/"
