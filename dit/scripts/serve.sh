#!/usr/bin/env bash
# Web page + HTTP API for a trained DiT on http://127.0.0.1:7860 (Ctrl-C stops it); images are also saved,
# once, under ./served/<settings>/. Needs the optional packages: pip install fastapi uvicorn python-multipart.
#   bash scripts/serve.sh ./results/000-DiT-B-2/checkpoints/0050000.pt
# --host 0.0.0.0 serves the network: add --auth user:password (or @file) then.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT="${1:?usage: bash scripts/serve.sh CHECKPOINT [extra serve.py flags]}"
shift
python serve.py \
    --checkpoint "$CKPT" \
    --host 127.0.0.1 \
    --port 7860 \
    --output_dir ./served \
    --batch_size 8 \
    --mixed_precision auto \
    --cfg_channels auto \
    --queue_size 8 \
    --max_images 16 \
    --max_steps 250 \
    --max_frames 16 \
    "$@"
