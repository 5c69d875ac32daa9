#!/usr/bin/env bash
# Generate images that follow the masks of a folder with a trained ControlNet (edit the paths).
#   bash scripts/inference.sh [MASK_FOLDER] [LDM_CHECKPOINT]
set -euo pipefail
cd "$(dirname "$0")/.."
MASKS="${1:-/path/to/masks}"
LDM="${2:-../ldm/ldm_checkpoints/checkpoint_best.pt}"
python inference.py \
    --checkpoint ./controlnet_checkpoints/checkpoint_best.pt \
    --ldm_checkpoint "$LDM" \
    --mask_folder "$MASKS" \
    --output_dir ./generated \
    --num_images 1 \
    --controlnet_scale 1.0 \
    --scheduler ddim \
    --num_inference_steps 50 \
    --seed 42 \
    --save_comparison \
    --report_dice
