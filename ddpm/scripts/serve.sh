#!/usr/bin/env bash
# Web page + HTTP API for DDPM checkpoints on this machine only (http://127.0.0.1:7860), from ddpm/.
#
#   bash scripts/serve.sh [CKPT ...] [-- extra serve.py flags, e.g. -- --auth user:secret --port 8000]
#
# Each checkpoint is loaded once; images are also saved once under ./served/<tag>/ (the CLI's folder names).
# Needs the optional packages: pip install fastapi uvicorn python-multipart
set -euo pipefail
cd "$(dirname "$0")/.."
CKPTS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do CKPTS+=("$1"); shift; done
[ $# -gt 0 ] && shift
[ ${#CKPTS[@]} -gt 0 ] || CKPTS=("./models/DDPM_conditional/ema_ckpt.pt")
python serve.py \
    --checkpoint "${CKPTS[@]}" \
    --host 127.0.0.1 \
    --port 7860 \
    --batch_size 8 \
    --device auto \
    --queue_size 8 \
    --max_images 16 \
    --max_steps 250 \
    --max_frames 16 \
    --output_dir ./served \
    "$@"
