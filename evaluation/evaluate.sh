#!/usr/bin/env bash
# Evaluate generated images against real ones:  bash evaluate.sh REAL_DIR GEN_DIR [extra flags...]
# Writes the report to stdout, the figures to GEN_DIR/../eval_<gen folder name>.json and the Markdown trust
# report beside it (eval_<gen folder name>.md).
# Trust report (memorization audit, intervals, real-vs-real floor, TSTR): add
#   --train_dir TRAIN_DIR --metrics fid,precision,recall,memorization --bootstrap 200 --floor --tstr
# (REAL_DIR is then the held-out real set: images the model was NOT trained on).
# Offline machines: add --inception_weights /path/to/pt_inception-2015-12-05-6726825d.pth
#                   and --vgg_weights /path/to/vgg16-397923af.pth (see README.md).
# DICOM / NIfTI data: add the window the model was trained with, e.g. --intensity_window -160,240.
set -euo pipefail
if [ "$#" -lt 2 ]; then echo "usage: bash evaluate.sh REAL_DIR GEN_DIR [extra flags]" >&2; exit 2; fi
REAL=$1; GEN=$2; shift 2
JSON="$(cd "$(dirname "$GEN")" && pwd)/eval_$(basename "$GEN").json"
cd "$(dirname "$0")"
python precision_recall.py \
  --real "$REAL" \
  --gen "$GEN" \
  --batch_size 32 \
  --metrics fid,precision,recall \
  --num_workers 4 \
  --json "$JSON" \
  "$@"
