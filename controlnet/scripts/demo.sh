#!/usr/bin/env bash
# ControlNet stage of the demo: mask-guided digits on top of the demo LDM (a few minutes on 2 CPU cores).
#
#   bash controlnet/scripts/demo.sh DATA OUT LDM_CHECKPOINT
#
# DATA is the folder written by scripts/make_demo_data.py (pairs in DATA/pairs/images|masks, class folders in
# DATA/digits/digit_k), LDM_CHECKPOINT the demo LDM (OUT/ldm/checkpoints/checkpoint_best.pt). Trains a
# ControlNet on the image/mask pairs, conditioned on the digit class too, then generates 2 images for one
# mask of each digit and writes mask | generated comparisons plus a Dice report under OUT/.
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "usage: bash controlnet/scripts/demo.sh DATA OUT LDM_CHECKPOINT" >&2
  exit 2
fi
DATA="$(cd "$1" && pwd)"
mkdir -p "$2"
OUT="$(cd "$2" && pwd)"
LDM="$(cd "$(dirname "$3")" && pwd)/$(basename "$3")"
cd "$(dirname "$0")/.."

# The pairs share file names with the class folders: write stem -> class name, and pick one mask per digit.
python - "$DATA" "$OUT" <<'PY'
import shutil, sys
from pathlib import Path
data, out = Path(sys.argv[1]), Path(sys.argv[2])
rows, first = ["stem,class_name"], {}
for folder in sorted((data / "digits").iterdir()):
    for f in sorted(folder.glob("*.png")):
        rows.append(f"{f.stem},{folder.name}")
        first.setdefault(folder.name, f.name)
(out / "labels.csv").write_text("\n".join(rows) + "\n")
masks = out / "masks"
masks.mkdir(exist_ok=True)
for name in first.values():
    shutil.copy(data / "pairs" / "masks" / name, masks / name)
PY

# --resume: a rerun into the same OUT continues (or finds the run finished) instead of refusing.
# --no_hflip: mirrored digits are not digits. --time_limit_minutes bounds the stage on slow machines.
python train.py \
    --data_root "$DATA/pairs" \
    --images_folder images \
    --masks_folder masks \
    --ldm_checkpoint "$LDM" \
    --class_labels_csv "$OUT/labels.csv" \
    --output_dir "$OUT/checkpoints" \
    --batch_size 32 \
    --num_epochs 100 \
    --max_steps ${CONTROLNET_DEMO_STEPS:-400} \
    --time_limit_minutes 2 \
    --learning_rate 3e-4 \
    --mask_channels 1 \
    --no_hflip \
    --val_fraction 0.05 \
    --val_every 5 \
    --sample_steps 20 \
    --log_every 50 \
    --seed 0 \
    --resume

python inference.py \
    --checkpoint "$OUT/checkpoints/checkpoint_best.pt" \
    --ldm_checkpoint "$LDM" \
    --mask_folder "$OUT/masks" \
    --class_labels_csv "$OUT/labels.csv" \
    --output_dir "$OUT/generated" \
    --num_images 2 \
    --scheduler dpmsolver \
    --num_inference_steps 20 \
    --controlnet_scale 1.0 \
    --seed 0 \
    --save_comparison \
    --report_dice

echo "ControlNet demo: checkpoints in $OUT/checkpoints, training grids (mask | sample | ground truth) in" \
     "$OUT/checkpoints/samples, generated images and comparisons (mask | generated) under $OUT/generated"
