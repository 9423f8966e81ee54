#!/usr/bin/env bash
# Launch train_RORem_kto.py (Diffusion-KTO) on one 8-GPU node with configs/kto_config.yaml (the
# official example's scale: effective batch 2048 scored results, lr 1e-7 after 200 warm-up steps,
# LoRA rank 8), on scored triplets {"source", "mask", "GT", "score": 0/1}.
#
#   bash scripts/run_train_kto.sh path/to/RORem_unet scored/meta.json experiment/RORem_KTO
#   bash scripts/run_train_kto.sh path/to/RORem_unet scored/meta.json experiment/RORem_KTO \
#       --validation_meta_path heldout_pairs/meta.json --discriminator_path path/to/disc --validation_steps 200
#   DEEPSPEED=1 bash scripts/run_train_kto.sh ... --no-use_lora                # full fine-tune under ZeRO-2
#
# Extra arguments go to the script and override the config; scripts/launch.sh does the launch
# (restarts resume from the latest checkpoint).
set -euo pipefail
USAGE="usage: run_train_kto.sh PRETRAINED_UNET SCORED_META_JSON OUTPUT_DIR [extra args]"
UNET=${1:?$USAGE}
SCORED=${2:?$USAGE}
OUT=${3:?$USAGE}
shift 3
exec bash "$(dirname "$0")/launch.sh" train_RORem_kto.py configs/kto_config.yaml \
    --pretrained_unet "$UNET" --meta_path "$SCORED" --output_dir "$OUT" "$@"
