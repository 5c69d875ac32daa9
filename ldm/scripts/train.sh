#!/usr/bin/env bash
# Train the class-conditional LDM (run from anywhere; edit the paths). Multi-GPU: see the comment below.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py \
    --data_root /path/to/data \
    --output_dir ./ldm_checkpoints \
    --vae stabilityai/sd-vae-ft-mse \
    --image_size 256 \
    --unet_preset base \
    --batch_size 8 \
    --num_epochs 200 \
    --learning_rate 1e-4 \
    --cfg_dropout 0.1 \
    --mixed_precision fp16 \
    --val_split 0.1 \
    --prediction_type epsilon \
    --snr_gamma 0 \
    --posthoc_ema_every_steps 0 \
    --ckpt_every_steps 1000 \
    --cache_latents
# Objective: --prediction_type v_prediction --snr_gamma 5 (min-SNR-gamma weighting); post-hoc EMA snapshots:
#   --posthoc_ema_every_steps 1000, then python posthoc_ema.py --snapshots ./ldm_checkpoints/posthoc_ema \
#   --sigma_rel 0.08 --checkpoint ./ldm_checkpoints/checkpoint_last.pt
# Multi-GPU (all GPUs of this machine):
#   accelerate launch --multi_gpu train.py --data_root /path/to/data --batch_size 8 --num_epochs 200 --mixed_precision fp16
# Resume an interrupted run: add --resume (reads ./ldm_checkpoints/checkpoint_last.pt).
