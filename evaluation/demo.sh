#!/usr/bin/env bash
# Evaluation stage of the demo, offline:  bash evaluation/demo.sh DATA OUT
#   DATA: folder written by scripts/make_demo_data.py: training digits in DATA/digits/digit_k (what every model
#         trained on), held-out digits in DATA/heldout/digits (never trained on), pairs likewise.
#   OUT:  the demo output folder; every OUT/<model>/samples folder that exists is evaluated.
# Trains a small digit CNN on the training digits (about a minute on CPU) and exports it as TorchScript (feature
# extractor + classifier). Each model's samples are then compared with the held-out digits: FD, precision and
# recall on the CNN's features with bootstrap intervals, the real-vs-real floor (two halves of the held-out
# digits, split by patient), class accuracy, a memorization audit against the training digits (calibrated on the
# held-out ones: at most 1% of them would be flagged), and train-synthetic-test-real accuracy next to the same
# classifier trained on the real training digits. One trust report (Markdown + JSON + gallery) per model, one
# table, one overview image. Reference row: the training digits themselves, evaluated as if generated (every
# image is a copy: the audit must say so). Each mask-guided model (ControlNet, the pixel mask -> image DDPMs) also
# gets a segmentation TSTR on its image/mask pairs and its mean mask Dice; the pixel DDPM super-resolution and
# segmentation results (OUT/ddpm_tasks) are printed under the table.
# Standard FID (InceptionV3) is added only when pytorch-fid's weight file is already on this machine
# ($FID_INCEPTION_WEIGHTS or torch hub's checkpoints folder): nothing is downloaded.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: bash evaluation/demo.sh DATA OUT" >&2
  exit 2
fi
DATA="$(cd "$1" && pwd)"
mkdir -p "$2"
OUT="$(cd "$2" && pwd)"
cd "$(dirname "$0")"
EVAL="$OUT/evaluation"
mkdir -p "$EVAL"
export EVAL_CACHE_DIR="$EVAL/cache"
for d in "$DATA/digits" "$DATA/heldout/digits"; do
  if [ ! -d "$d" ]; then echo "error: $d not found (run scripts/make_demo_data.py)" >&2; exit 2; fi
done

echo "[evaluation] training the demo digit classifier on the training digits"
python demo_classifier.py --data "$DATA/digits" --out "$EVAL"

# The demo networks are tiny: one thread each avoids thread spin-waits on a busy machine.
SMALL=(env OMP_NUM_THREADS=1 python precision_recall.py)
COMMON=(--real "$DATA/heldout/digits" --train_dir "$DATA/digits" --feature_extractor "$EVAL/digit_features.pt"
        --classifier "$EVAL/digit_classifier.pt" --metrics fid,precision,recall,memorization --audit_size 32
        --bootstrap 100 --floor --tstr --batch_size 64 --num_workers 2)
INC=""
HUB=$(python -c "import torch; print(torch.hub.get_dir())")
for cand in "${FID_INCEPTION_WEIGHTS:-}" "$HUB/checkpoints/pt_inception-2015-12-05-6726825d.pth"; do
  if [ -n "$cand" ] && [ -f "$cand" ]; then INC="$cand"; break; fi
done

ROWS=("training digits (copies)=$EVAL/training_digits.json")
INC_ROWS=()
echo "[evaluation] reference row: the training digits, evaluated as if generated"
"${SMALL[@]}" "${COMMON[@]}" --gen "$DATA/digits" --json "$EVAL/training_digits.json"
MODELS=()
for samples in "$OUT"/*/samples; do
  [ -d "$samples" ] || continue
  model=$(basename "$(dirname "$samples")")
  echo "[evaluation] $model: $samples vs the held-out digits"
  if "${SMALL[@]}" "${COMMON[@]}" --gen "$samples" --json "$EVAL/$model.json"; then
    ROWS+=("$model=$EVAL/$model.json")
    MODELS+=("$model=$samples")
    if [ -n "$INC" ]; then
      python precision_recall.py --real "$DATA/heldout/digits" --gen "$samples" --metrics fid \
        --inception_weights "$INC" --json "$EVAL/${model}_inception.json" && INC_ROWS+=("$model=$EVAL/${model}_inception.json")
    fi
  else
    echo "[evaluation] $model: evaluation failed (see the error above); left out of the table" >&2
  fi
done
[ ${#MODELS[@]} -gt 0 ] || echo "[evaluation] no OUT/<model>/samples folders yet: only the reference row is shown"
SEG=()
DICE=()
EXTRA=()
for pairs in "$OUT"/*/pairs; do  # the mask-guided models (ControlNet, pixel mask -> image DDPM)
  [ -d "$pairs/images" ] || continue
  model=$(basename "$(dirname "$pairs")")
  echo "[evaluation] $model: segmenter trained on its image/mask pairs, tested on the held-out pairs"
  "${SMALL[@]}" --real "$DATA/heldout/pairs" --train_dir "$DATA/pairs" --gen "$pairs" \
    --metrics memorization --audit_size 32 --tstr --json "$EVAL/${model}_pairs.json" && SEG+=("$model=$EVAL/${model}_pairs.json")
  dice=$(find "$OUT/$model/generated" -name dice.csv 2>/dev/null | head -n 1)
  [ -z "$dice" ] || DICE+=("$model=$dice")
done
[ ${#SEG[@]} -eq 0 ] || SEG=(--segmentation "${SEG[@]}")
[ ${#DICE[@]} -eq 0 ] || EXTRA+=(--dice "${DICE[@]}")
for f in superres/sr_metrics.csv segmentation/seg_metrics.csv; do
  [ -f "$OUT/ddpm_tasks/$f" ] || continue
  case "$f" in superres/*) EXTRA+=(--superres "$OUT/ddpm_tasks/$f") ;; *) EXTRA+=(--seg_metrics "$OUT/ddpm_tasks/$f") ;; esac
done

echo
echo "Demo evaluation against the held-out digits (FD/precision/recall on the demo digit CNN's features with 95%"
echo "bootstrap intervals, class accuracy by its classifier, copy rate of the memorization audit against the"
echo "training digits, TSTR: the CNN trained on the samples and tested on the held-out digits; floor: two halves of"
echo "the held-out digits compared with each other):"
if [ ${#INC_ROWS[@]} -gt 0 ]; then
  python demo_table.py "${ROWS[@]}" --inception "${INC_ROWS[@]}" ${SEG[@]+"${SEG[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
else
  python demo_table.py "${ROWS[@]}" ${SEG[@]+"${SEG[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  echo "Note: standard FID (InceptionV3) left out: pt_inception-2015-12-05-6726825d.pth is not on this machine"
  echo "      (set FID_INCEPTION_WEIGHTS=/path/to/it, or put it in $HUB/checkpoints/, to add the column)."
fi
python demo_overview.py --real "$DATA/heldout/digits" --out "$EVAL/overview.png" ${MODELS[@]+"${MODELS[@]}"}
echo "[evaluation] trust reports (<model>.md, .json, _gallery.png), TorchScript networks and overview.png are in $EVAL"
