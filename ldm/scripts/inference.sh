#!/usr/bin/env bash
# Generate images for every class (grid included), then 20 images of one class.
set -euo pipefail
cd "$(dirname "$0")/.."
python inference.py \
    --checkpoint ./ldm_checkpoints/checkpoint_best.pt \
    --output_dir ./generated \
    --num_samples 10 \
    --cfg_scale 3.0 \
    --num_inference_steps 50 \
    --scheduler ddim \
    --batch_size 16 \
    --save_grid
python inference.py \
    --checkpoint ./ldm_checkpoints/checkpoint_best.pt \
    --output_dir ./generated \
    --class_label "class_name" \
    --num_samples 20 \
    --cfg_scale 4.0 \
    --seed 42
