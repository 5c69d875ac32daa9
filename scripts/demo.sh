#!/usr/bin/env bash
# The repository's main job on the bundled demo data (scikit-learn's digits), on GPU or CPU.
#
#   bash scripts/demo.sh [OUTPUT_ROOT]
#
# Writes the demo data once to demo_data/ (training digits, and a held-out third no model trains on), then
# runs each model's demo stage into a new folder
# demo_output/<timestamp>/ (earlier demo runs are never overwritten):
#   ddpm        class-conditional pixel DDPM               -> <out>/ddpm
#   ldm         small VAE + class-conditional LDM          -> <out>/ldm
#   controlnet  mask-guided ControlNet on the demo LDM     -> <out>/controlnet
#   dit         small DiT on the demo VAE's latents        -> <out>/dit
#   ddpm_pairs  pixel mask -> image DDPM (mask concatenated, and SPADE) on the ControlNet stage's masks
#                                                          -> <out>/ddpm_mask2image_concat, <out>/ddpm_mask2image_spade
#   ddpm_tasks  pixel DDPM super-resolution x4 and segmentation, judged on the held-out digits -> <out>/ddpm_tasks
#   evaluation  trust report per model: FD / precision / recall with intervals, floor, class accuracy,
#               memorization audit, TSTR; one table and overview.png   -> <out>/evaluation
# Run only some stages with DEMO_STAGES="ddpm ldm" bash scripts/demo.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="$ROOT/demo_data"
OUT="${1:-$ROOT/demo_output/$(date +%Y%m%d-%H%M%S)}"
STAGES="${DEMO_STAGES:-ddpm ldm controlnet dit ddpm_pairs ddpm_tasks evaluation}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# v3: a held-out third in demo_data/heldout/ that no model trains on, labels.csv and heldout/demo_masks/ (an older demo_data/ is written anew)
if [ ! -f "$DATA/.complete-v3" ]; then
  rm -rf "$DATA"
  python "$ROOT/scripts/make_demo_data.py" --out "$DATA"
  touch "$DATA/.complete-v3"
fi
python - <<'PY'
import torch
dev = f"CUDA ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
print(f"Demo device: {dev}")
PY

SECONDS=0
for stage in $STAGES; do
  start=$SECONDS
  echo
  echo "=== demo stage: $stage ==="
  case "$stage" in
    ddpm)       bash "$ROOT/ddpm/scripts/demo.sh" "$DATA" "$OUT/ddpm" ;;
    ldm)        bash "$ROOT/ldm/scripts/demo.sh" "$DATA" "$OUT/ldm" ;;
    controlnet) bash "$ROOT/controlnet/scripts/demo.sh" "$DATA" "$OUT/controlnet" \
                     "$OUT/ldm/checkpoints/checkpoint_best.pt" ;;
    dit)        bash "$ROOT/dit/scripts/demo.sh" "$DATA" "$OUT/dit" "$OUT/ldm/vae" ;;
    ddpm_pairs) for mode in concat spade; do
                  bash "$ROOT/ddpm/scripts/demo_pairs.sh" "$DATA" "$OUT/ddpm_mask2image_$mode" "$mode"
                done ;;
    ddpm_tasks) bash "$ROOT/ddpm/scripts/demo_tasks.sh" "$DATA" "$OUT/ddpm_tasks" ;;
    evaluation) bash "$ROOT/evaluation/demo.sh" "$DATA" "$OUT" ;;
    *) echo "error: unknown demo stage '$stage' (DEMO_STAGES takes: ddpm ldm controlnet dit ddpm_pairs ddpm_tasks evaluation)" >&2; exit 2 ;;
  esac
  echo "=== $stage finished in $((SECONDS - start)) s ==="
done
echo
echo "Demo finished in $SECONDS s. Everything is under: $OUT"
