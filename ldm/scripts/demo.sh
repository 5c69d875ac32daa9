#!/usr/bin/env bash
# LDM demo stage on the digits demo data (32x32 grayscale, 10 classes), offline, CPU or GPU:
#   1. train_vae.py: a tiny AutoencoderKL (factor 4: 32px -> 8x8x4 latents)   -> OUT/vae
#   2. train.py:     a tiny class-conditional UNet on cached latents           -> OUT/checkpoints/checkpoint_best.pt
#   3. inference_per_class.py: samples per class                               -> OUT/samples/<class_name>/*.png
#      inference.py --save_grid: one row per class                             -> OUT/grid/<settings>/grid.png
#
#   bash ldm/scripts/demo.sh DATA OUT      (DATA = folder written by scripts/make_demo_data.py)
# Sizes can be changed with LDM_DEMO_VAE_STEPS, LDM_DEMO_EPOCHS, LDM_DEMO_SAMPLES (images per class).
set -euo pipefail
DATA="$(cd "${1:?usage: demo.sh DATA OUT}" && pwd)"
mkdir -p "${2:?usage: demo.sh DATA OUT}"
OUT="$(cd "$2" && pwd)"
cd "$(dirname "$0")/.."
VAE_STEPS="${LDM_DEMO_VAE_STEPS:-100}"
EPOCHS="${LDM_DEMO_EPOCHS:-20}"
PER_CLASS="${LDM_DEMO_SAMPLES:-20}"

if [ ! -f "$OUT/vae/config.json" ]; then
  python train_vae.py --data_root "$DATA/digits" --output_dir "$OUT/vae" --image_size 32 --preset tiny \
    --batch_size 32 --num_epochs 10 --max_train_steps "$VAE_STEPS" --learning_rate 2e-3 --scale_images 512 \
    --log_every_steps 25
fi

python train.py --data_root "$DATA/digits" --output_dir "$OUT/checkpoints" --vae "$OUT/vae" --image_size 32 \
  --unet_preset tiny --batch_size 64 --num_epochs "$EPOCHS" --learning_rate 1e-3 --lr_warmup_steps 20 \
  --cfg_dropout 0.1 --ema_decay 0.999 --val_split 0.1 --cache_latents --sample_every_epochs 10 \
  --log_every_steps 50 --mixed_precision no

python inference_per_class.py --checkpoint "$OUT/checkpoints/checkpoint_best.pt" --output_dir "$OUT/samples" \
  --total_samples $((PER_CLASS * 10)) --batch_size 100 --cfg_scale 3.0 --scheduler dpmsolver \
  --num_inference_steps 20

python inference.py --checkpoint "$OUT/checkpoints/checkpoint_best.pt" --output_dir "$OUT/grid" \
  --num_samples 8 --batch_size 80 --cfg_scale 3.0 --scheduler dpmsolver --num_inference_steps 20 --save_grid

echo "LDM demo results:"
echo "  VAE (diffusers folder):   $OUT/vae"
echo "  LDM checkpoints:          $OUT/checkpoints/checkpoint_best.pt, checkpoint_last.pt (log.txt, tensorboard/)"
echo "  per-class samples:        $OUT/samples/<class_name>/"
echo "  grid (row = class):       $(ls "$OUT"/grid/*/grid.png)"
