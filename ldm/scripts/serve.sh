#!/usr/bin/env bash
# Web page + HTTP API for an LDM checkpoint on http://127.0.0.1:7860 (Ctrl-C stops it). Needs the optional
# packages: pip install fastapi uvicorn python-multipart. --host 0.0.0.0 serves the network (add --auth).
set -euo pipefail
cd "$(dirname "$0")/.."
python serve.py \
    --checkpoint ./ldm_checkpoints/checkpoint_best.pt \
    --host 127.0.0.1 \
    --port 7860 \
    --output_dir ./served \
    --batch_size 16 \
    --mixed_precision no \
    --scheduler ddim \
    --num_inference_steps 50 \
    --cfg_scale 3.0 \
    --queue_size 8 \
    --max_images 16 \
    --max_steps 250 \
    --max_frames 16
