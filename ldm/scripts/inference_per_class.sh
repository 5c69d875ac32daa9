#!/usr/bin/env bash
# 8000 images split evenly over the classes into ./generated_per_class/<class_name>/ (rerun to complete).
set -euo pipefail
cd "$(dirname "$0")/.."
python inference_per_class.py \
    --checkpoint ./ldm_checkpoints/checkpoint_best.pt \
    --output_dir ./generated_per_class \
    --total_samples 8000 \
    --batch_size 16 \
    --cfg_scale 3.0 \
    --num_inference_steps 50 \
    --scheduler ddim
