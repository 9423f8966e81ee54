#!/usr/bin/env bash
# Launch reward-weighted LCM distillation on one 8-GPU node (configs/lcm_rewarded_config.yaml).
#
#   bash scripts/run_train_lcm_rewarded.sh path/to/RORem_unet data/meta.json path/to/disc experiment/RORem_LCM_rewarded
#   bash scripts/run_train_lcm_rewarded.sh ... --weighting filter --reward_threshold 0.7
#   bash scripts/run_train_lcm_rewarded.sh ... --reward_source teacher --score_every 10
#   NUM_GPUS=4 DEEPSPEED=1 bash scripts/run_train_lcm_rewarded.sh ...
#
# Extra arguments go to train_RORem_lcm_rewarded.py and override the config. The job resumes from
# its latest checkpoint if one exists, so the same command restarts a preempted run.
set -euo pipefail
cd "$(dirname "$0")/.."
USAGE="usage: run_train_lcm_rewarded.sh TEACHER_UNET META_JSON DISCRIMINATOR OUTPUT_DIR [extra args]"
UNET=${1:?$USAGE}
META=${2:?$USAGE}
DISC=${3:?$USAGE}
OUT=${4:?$USAGE}
shift 4
CONFIG=configs/accelerate_8gpu.yaml
[ "${DEEPSPEED:-0}" = 1 ] && CONFIG=configs/deepspeed_zero2.yaml
exec accelerate launch --config_file "$CONFIG" --num_processes "${NUM_GPUS:-8}" \
    train_RORem_lcm_rewarded.py --config configs/lcm_rewarded_config.yaml \
    --pretrained_teacher_unet "$UNET" --meta_path "$META" --discriminator_path "$DISC" --output_dir "$OUT" \
    --resume_from_checkpoint latest "$@"
