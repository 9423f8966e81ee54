#!/usr/bin/env bash
# Launch train_RORem_dpo.py on one 8-GPU node with configs/dpo_config.yaml (the paper's scale:
# effective batch 2048 pairs, beta 5000 on mean errors, LoRA rank 8).
#
#   bash scripts/run_train_dpo.sh path/to/RORem_unet pairs/meta.json experiment/RORem_DPO
#   bash scripts/run_train_dpo.sh path/to/RORem_unet pairs/meta.json experiment/RORem_DPO \
#       --validation_meta_path pairs/heldout.json --discriminator_path path/to/disc --validation_steps 200
#   NUM_GPUS=4 bash scripts/run_train_dpo.sh ... --beta 1.0 --beta_unit sum    # the plan's units
#   DEEPSPEED=1 bash scripts/run_train_dpo.sh ... --no-use_lora                # full fine-tune under ZeRO-2
#
# Extra arguments go to the script and override the config; scripts/launch.sh does the launch
# (restarts resume from the latest checkpoint).
set -euo pipefail
USAGE="usage: run_train_dpo.sh PRETRAINED_UNET PAIRS_META_JSON OUTPUT_DIR [extra args]"
UNET=${1:?$USAGE}
PAIRS=${2:?$USAGE}
OUT=${3:?$USAGE}
shift 3
exec bash "$(dirname "$0")/launch.sh" train_RORem_dpo.py configs/dpo_config.yaml \
    --pretrained_unet "$UNET" --preference_data "$PAIRS" --output_dir "$OUT" "$@"
