#!/usr/bin/env bash
# ControlNet stage of the demo: mask-guided digits on top of the demo LDM (a few minutes on 2 CPU cores).
#
#   bash controlnet/scripts/demo.sh DATA OUT LDM_CHECKPOINT
#
# DATA is the folder written by scripts/make_demo_data.py (pairs in DATA/pairs/images|masks, class folders in
# DATA/digits/digit_k), LDM_CHECKPOINT the demo LDM (OUT/ldm/checkpoints/checkpoint_best.pt). Trains a
# ControlNet on the training image/mask pairs, conditioned on the digit class too, then generates 2 images for
# each of the ten held-out masks per digit in DATA/heldout/demo_masks (classes from DATA/labels.csv), writes mask | generated comparisons and a Dice report under
# OUT/generated, and links the images by class into OUT/samples/<class_name>/ and as image/mask pairs into
# OUT/pairs/images|masks for the evaluation stage.
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "usage: bash controlnet/scripts/demo.sh DATA OUT LDM_CHECKPOINT" >&2
  exit 2
fi
DATA="$(cd "$1" && pwd)"
mkdir -p "$2"
OUT="$(cd "$2" && pwd)"
LDM="$(cd "$(dirname "$3")" && pwd)/$(basename "$3")"
cd "$(dirname "$0")/.."

# --resume when the run exists: a rerun into the same OUT continues it (or finds it finished).
# --no_random_flip: mirrored digits are not digits. --max_minutes bounds the stage on slow machines.
RESUME=()
if [ -f "$OUT/checkpoints/checkpoint_last.pt" ]; then RESUME=(--resume); fi
python train.py \
    --data_root "$DATA/pairs" \
    --images_folder images \
    --masks_folder masks \
    --ldm_checkpoint "$LDM" \
    --class_labels_csv "$DATA/labels.csv" \
    --output_dir "$OUT/checkpoints" \
    --batch_size 32 \
    --num_epochs 100 \
    --max_train_steps ${CONTROLNET_DEMO_STEPS:-400} \
    --max_minutes 2 \
    --learning_rate 3e-4 \
    --mask_channels 1 \
    --no_random_flip \
    --val_fraction 0.05 \
    --ckpt_every_epochs 5 \
    --sample_every_epochs 5 \
    --sample_steps 20 \
    --log_every_steps 50 \
    --seed 0 \
    ${RESUME[@]+"${RESUME[@]}"}

python inference.py \
    --checkpoint "$OUT/checkpoints/checkpoint_best.pt" \
    --ldm_checkpoint "$LDM" \
    --mask_folder "$DATA/heldout/demo_masks" \
    --class_labels_csv "$DATA/labels.csv" \
    --output_dir "$OUT/generated" \
    --num_images 2 \
    --scheduler dpmsolver \
    --num_inference_steps 20 \
    --controlnet_scale 1.0 \
    --seed 0 \
    --save_comparison \
    --report_dice | grep -v '^dice '   # per-image Dice is in dice.csv; keep the summary lines

# Class folders of the generated images (hard links) for the evaluation stage's table, and synthetic image/mask
# pairs (each image with the mask it was generated from) for its segmentation TSTR.
python ../scripts/demo_link_samples.py "$OUT/generated" "$OUT" --labels "$DATA/labels.csv" \
    --masks "$DATA/heldout/demo_masks"

echo "ControlNet demo: checkpoints in $OUT/checkpoints, training grids (mask | sample | ground truth) in" \
     "$OUT/checkpoints/samples, generated images and comparisons (mask | generated) under $OUT/generated, by class in" \
     "$OUT/samples, as image/mask pairs in $OUT/pairs"
