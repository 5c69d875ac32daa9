#!/usr/bin/env bash
# Fully synthetic image/mask pairs from a folder of real pairs, with two pixel DDPMs, from ddpm/:
#   1. a mask DDPM (--task masks) learns the masks of DATA/masks;
#   2. a mask -> image DDPM (--task mask2image) learns the images of DATA/images from their masks;
#   3. N new masks are sampled from 1, then one image from each with 2.
#
#   bash scripts/synthetic_pairs.sh DATA OUT [N]        # N pairs (default 1000)
#
# OUT/images/<stem>.png + OUT/masks/<stem>.png (ControlNet's layout: train a segmenter on it, or evaluate it with
# evaluation/precision_recall.py --tstr), OUT/pairs.csv (stem = the mask's name with its seed, the image's seed). Runs go to
# models/pairs_masks/ and models/pairs_mask2image/ (under WORK_DIR, default ddpm/); rerunning continues them
# (--resume) and completes missing pairs. Settings of each training: MASK_FLAGS="..." / IMAGE_FLAGS="..."
# (e.g. "--image-size 128 --num-epochs 500").
set -euo pipefail
DATA="${1:?usage: bash scripts/synthetic_pairs.sh DATA OUT [N]}"
OUT="${2:?usage: bash scripts/synthetic_pairs.sh DATA OUT [N]}"
N="${3:-1000}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
case "$DATA" in /*) ;; *) DATA="$PWD/$DATA" ;; esac
cd "$(dirname "$0")/.."
WORK="${WORK_DIR:-.}"
NGPU=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
read -r -a MASK_EXTRA <<< "${MASK_FLAGS:-}"
read -r -a IMAGE_EXTRA <<< "${IMAGE_FLAGS:-}"
COMMON=(--work-dir "$WORK" --image-size 64 --batch-size 8 --num-epochs 300 --ckpt-every-steps 1000
        --sample-every-epochs 10)

resume_if_there() { [ -f "$WORK/models/$1/train_state.pt" ] && echo --resume || true; }

echo "=== 1/4 mask DDPM on $DATA/masks ==="
torchrun --nnodes=1 --nproc_per_node="$NGPU" train.py --task masks --data-root "$DATA/masks" \
    --run-name pairs_masks "${COMMON[@]}" $(resume_if_there pairs_masks) ${MASK_EXTRA[@]+"${MASK_EXTRA[@]}"}
echo "=== 2/4 mask -> image DDPM on $DATA ==="
torchrun --nnodes=1 --nproc_per_node="$NGPU" train.py --task mask2image --data-root "$DATA" \
    --run-name pairs_mask2image --mask-ablation 0.2 "${COMMON[@]}" $(resume_if_there pairs_mask2image) \
    ${IMAGE_EXTRA[@]+"${IMAGE_EXTRA[@]}"}
echo "=== 3/4 sampling $N masks ==="
torchrun --nnodes=1 --nproc_per_node="$NGPU" inference.py --ckpt "$WORK/models/pairs_masks/ckpt.pt" --use-ema \
    --num-samples "$N" --sampler ddim --sampling-steps 50 --seed 0 --output-dir "$OUT/generated_masks"
echo "=== 4/4 one image per mask ==="
torchrun --nnodes=1 --nproc_per_node="$NGPU" inference.py --ckpt "$WORK/models/pairs_mask2image/ckpt.pt" --use-ema \
    --condition "$OUT/generated_masks" --samples-per-condition 1 --sampler ddim --sampling-steps 50 --seed 100000 \
    --pair-layout --output-dir "$OUT"
echo "synthetic pairs: $OUT/images and $OUT/masks ($N each), seeds in $OUT/pairs.csv"
