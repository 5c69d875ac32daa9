#!/usr/bin/env bash
# Evaluation stage of the demo, offline:  bash evaluation/demo.sh DATA OUT
#   DATA: folder written by scripts/make_demo_data.py (class folders DATA/digits/digit_0..digit_9)
#   OUT:  the demo output folder; every OUT/<model>/samples folder that exists is evaluated.
# Splits the real digits into halves A and B by whole patients (medical.group_split: a DICOM patient or a
# NIfTI volume never has images in both; each demo digit is its own), trains a small digit CNN on A (about
# a minute on CPU), exports it as TorchScript (feature extractor + classifier) and prints one table: FD, precision,
# recall on the CNN's features and class accuracy, per model, plus the real-data reference row (B vs A).
# Standard FID (InceptionV3) is added only when pytorch-fid's weight file is already on this machine
# ($FID_INCEPTION_WEIGHTS or torch hub's checkpoints folder): nothing is downloaded.
set -euo pipefail
if [ "$#" -ne 2 ]; then echo "usage: bash evaluation/demo.sh DATA OUT" >&2; exit 2; fi
DATA=$(cd "$1" && pwd)
mkdir -p "$2"
OUT=$(cd "$2" && pwd)
cd "$(dirname "$0")"
EVAL="$OUT/evaluation"
export EVAL_CACHE_DIR="$EVAL/cache"
if [ ! -d "$DATA/digits" ]; then echo "error: $DATA/digits not found (run scripts/make_demo_data.py)" >&2; exit 2; fi

echo "[evaluation] splitting $DATA/digits into halves A (reference, classifier training) and B (held out),"
echo "[evaluation] by whole patients (each demo digit is its own), and training the demo digit classifier on A"
rm -rf "$EVAL/real_a" "$EVAL/real_b"
python demo_classifier.py --split_from "$DATA/digits" --data "$EVAL/real_a" --held_out "$EVAL/real_b" --out "$EVAL"

# The demo networks are tiny: one thread each avoids thread spin-waits on a busy machine.
SMALL=(env OMP_NUM_THREADS=1 python precision_recall.py)
COMMON=(--real "$EVAL/real_a" --feature_extractor "$EVAL/digit_features.pt" --classifier "$EVAL/digit_classifier.pt"
        --metrics fid,precision,recall --batch_size 64 --num_workers 2)
INC=""
HUB=$(python -c "import torch; print(torch.hub.get_dir())")
for cand in "${FID_INCEPTION_WEIGHTS:-}" "$HUB/checkpoints/pt_inception-2015-12-05-6726825d.pth"; do
  if [ -n "$cand" ] && [ -f "$cand" ]; then INC="$cand"; break; fi
done

ROWS=("real half B (reference)=$EVAL/reference.json")
INC_ROWS=("real half B (reference)=$EVAL/reference_inception.json")
echo "[evaluation] reference row: real half B vs real half A"
"${SMALL[@]}" "${COMMON[@]}" --gen "$EVAL/real_b" --json "$EVAL/reference.json"
if [ -n "$INC" ]; then
  python precision_recall.py --real "$EVAL/real_a" --gen "$EVAL/real_b" --metrics fid --inception_weights "$INC" \
    --json "$EVAL/reference_inception.json"
fi
found=0
for samples in "$OUT"/*/samples; do
  [ -d "$samples" ] || continue
  model=$(basename "$(dirname "$samples")")
  found=1
  echo "[evaluation] $model: $samples vs real half A"
  if "${SMALL[@]}" "${COMMON[@]}" --gen "$samples" --json "$EVAL/$model.json"; then
    ROWS+=("$model=$EVAL/$model.json")
    if [ -n "$INC" ]; then
      python precision_recall.py --real "$EVAL/real_a" --gen "$samples" --metrics fid --inception_weights "$INC" \
        --json "$EVAL/${model}_inception.json" && INC_ROWS+=("$model=$EVAL/${model}_inception.json")
    fi
  else
    echo "[evaluation] $model: evaluation failed (see the error above); left out of the table" >&2
  fi
done
[ "$found" -eq 1 ] || echo "[evaluation] no OUT/<model>/samples folders yet: only the reference row is shown"

echo
echo "Demo evaluation (FD/precision/recall on the demo digit CNN's features, class accuracy by its classifier;"
echo "each set is compared with real half A; the reference row is the held-out real half B):"
if [ -n "$INC" ]; then
  python demo_table.py "${ROWS[@]}" --inception "${INC_ROWS[@]}"
else
  python demo_table.py "${ROWS[@]}"
  echo "Note: standard FID (InceptionV3) left out: pt_inception-2015-12-05-6726825d.pth is not on this machine"
  echo "      (set FID_INCEPTION_WEIGHTS=/path/to/it, or put it in $HUB/checkpoints/, to add the column)."
fi
echo "[evaluation] results (JSON per row, TorchScript networks) are in $EVAL"
