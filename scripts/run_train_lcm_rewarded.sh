#!/usr/bin/env bash
# Launch reward-weighted LCM distillation on one 8-GPU node (configs/lcm_rewarded_config.yaml).
#
#   bash scripts/run_train_lcm_rewarded.sh path/to/RORem_unet data/meta.json path/to/disc experiment/RORem_LCM_rewarded
#   bash scripts/run_train_lcm_rewarded.sh ... --weighting filter --reward_threshold 0.7
#   bash scripts/run_train_lcm_rewarded.sh ... --reward_source teacher --score_every 10
#   NUM_GPUS=4 DEEPSPEED=1 bash scripts/run_train_lcm_rewarded.sh ...
#
# Extra arguments go to train_RORem_lcm_rewarded.py and override the config; scripts/launch.sh does
# the launch (restarts resume from the latest checkpoint).
set -euo pipefail
USAGE="usage: run_train_lcm_rewarded.sh TEACHER_UNET META_JSON DISCRIMINATOR OUTPUT_DIR [extra args]"
UNET=${1:?$USAGE}
META=${2:?$USAGE}
DISC=${3:?$USAGE}
OUT=${4:?$USAGE}
shift 4
exec bash "$(dirname "$0")/launch.sh" train_RORem_lcm_rewarded.py configs/lcm_rewarded_config.yaml \
    --pretrained_teacher_unet "$UNET" --meta_path "$META" --discriminator_path "$DISC" --output_dir "$OUT" "$@"
