#!/usr/bin/env bash
# Web page + HTTP API for a trained ControlNet (upload a mask; edit the paths). Open http://127.0.0.1:7860
#   bash scripts/serve.sh [CHECKPOINT] [LDM_CHECKPOINT]
# Needs the optional packages: pip install fastapi uvicorn python-multipart
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT="${1:-./controlnet_checkpoints/checkpoint_best.pt}"
LDM="${2:-../ldm/ldm_checkpoints/checkpoint_best.pt}"
python serve.py \
    --checkpoint "$CKPT" \
    --ldm_checkpoint "$LDM" \
    --host 127.0.0.1 \
    --port 7860 \
    --queue_size 8 \
    --max_images 16 \
    --max_steps 250 \
    --max_frames 16 \
    --max_upload_mb 8 \
    --batch_size 16 \
    --mixed_precision no \
    --output_dir ./served
