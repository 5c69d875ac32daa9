#!/usr/bin/env bash
# Train a ControlNet on DATA/images + DATA/masks on top of a trained LDM (edit the paths).
#   bash scripts/train.sh [DATA] [LDM_CHECKPOINT]            one process
#   NUM_GPUS=4 bash scripts/train.sh [DATA] [LDM_CHECKPOINT] accelerate, 4 processes
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-/path/to/data}"
LDM="${2:-../ldm/ldm_checkpoints/checkpoint_best.pt}"
LAUNCH=(python)
RESUME=()  # continue the run in ./controlnet_checkpoints if there is one
if [ -f ./controlnet_checkpoints/checkpoint_last.pt ]; then RESUME=(--resume); fi
if [ "${NUM_GPUS:-1}" -gt 1 ]; then
  LAUNCH=(accelerate launch --multi_gpu --num_processes "$NUM_GPUS")
fi
"${LAUNCH[@]}" train.py \
    --data_root "$DATA" \
    --images_folder images \
    --masks_folder masks \
    --ldm_checkpoint "$LDM" \
    --output_dir ./controlnet_checkpoints \
    --batch_size 8 \
    --num_epochs 100 \
    --learning_rate 1e-5 \
    --freeze_unet \
    --mask_channels 1 \
    --mixed_precision fp16 \
    --snr_gamma 0 \
    --posthoc_ema_every_steps 0 \
    --ckpt_every_steps 1000 \
    ${RESUME[@]+"${RESUME[@]}"}
