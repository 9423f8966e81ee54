#!/usr/bin/env bash
# Launch train_RORem_draft.py (direct reward fine-tuning through the discriminator) on one 8-GPU
# node with configs/draft_config.yaml (DRaFT-1 on the remover, discriminator plus preservation).
#
#   bash scripts/run_train_draft.sh path/to/RORem_unet data/meta.json path/to/disc experiment/RORem_DRaFT
#   bash scripts/run_train_draft.sh ... --reg_coef 0.1 --validation_meta_path heldout/meta.json
#   bash scripts/run_train_draft.sh ... --config configs/draft_lcm_config.yaml --student_lora path/to/RORem_LCM_lora
#
# Extra arguments go to the script and override the config (a second --config replaces the first);
# scripts/launch.sh does the launch (restarts resume from the latest checkpoint).
set -euo pipefail
USAGE="usage: run_train_draft.sh PRETRAINED_UNET META_JSON DISCRIMINATOR OUTPUT_DIR [extra args]"
UNET=${1:?$USAGE}
META=${2:?$USAGE}
DISC=${3:?$USAGE}
OUT=${4:?$USAGE}
shift 4
exec bash "$(dirname "$0")/launch.sh" train_RORem_draft.py configs/draft_config.yaml \
    --pretrained_unet "$UNET" --meta_path "$META" --discriminator_path "$DISC" --output_dir "$OUT" "$@"
