#!/usr/bin/env bash
# DiT stage of the repository demo: a small DiT on the demo VAE's latents of the digits data set.
#
#   bash dit/scripts/demo.sh DATA OUT VAE_DIR
#
# DATA    folder written by scripts/make_demo_data.py (class folders in DATA/digits/digit_0..digit_9)
# OUT     output folder (run in OUT/results, samples in OUT/samples/<class_name>/, grids in OUT/grids/)
# VAE_DIR diffusers AutoencoderKL folder (the demo LDM's VAE, written by ldm/train_vae.py)
# About 3-4 minutes on 2 CPU cores: DiT-Ti/2 (4 blocks, width 192) with cached latents, then 25-step
# DDIM sampling with classifier-free guidance.
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "usage: bash dit/scripts/demo.sh DATA OUT VAE_DIR" >&2
  exit 2
fi
DATA="$(cd "$1" && pwd)"
mkdir -p "$2"
OUT="$(cd "$2" && pwd)"
VAE="$(cd "$3" && pwd)"
cd "$(dirname "$0")/.."
STEPS="${DIT_DEMO_STEPS:-2400}"  # DiT-Ti/2 draws blurred blobs at 800 steps and clear digits by 2400
IMAGE_SIZE="$(python -c "import json,sys; from PIL import Image; import glob
f=sorted(glob.glob(sys.argv[1]+'/digits/digit_0/*'))[0]; print(Image.open(f).size[0])" "$DATA")"

# --no_random_flip: a mirrored digit is not a digit.
python train.py --model DiT-Ti/2 --data_root "$DATA/digits" --results_dir "$OUT/results" \
    --image_size "$IMAGE_SIZE" --num_classes 10 --global_batch_size 32 --num_epochs 1000 \
    --max_train_steps "$STEPS" --vae "$VAE" --learning_rate 1e-3 --ema_decay 0.99 --num_workers 0 \
    --log_every_steps 100 --ckpt_every_steps "$STEPS" --sample_every_steps 0 --cache_latents \
    --no_random_flip --resume

CKPT="$(ls "$OUT"/results/*-DiT-Ti-2/checkpoints/*.pt | sort | tail -n 1)"
python sample.py --ckpt "$CKPT" --num-samples 100 --batch-size 50 --cfg-scale 3.0 \
    --sampler ddim --num-sampling-steps 25 --seed 0 \
    --output-dir "$OUT/samples" --exact-output-dir --grid-dir "$OUT/grids"

echo "DiT demo: checkpoint $CKPT"
echo "DiT demo: samples in $OUT/samples/<class_name>/, one grid per class in $OUT/grids/"
