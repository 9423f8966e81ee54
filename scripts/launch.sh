#!/usr/bin/env bash
# Launch any train_*.py on one 8-GPU node with its config: plain DDP (configs/accelerate_8gpu.yaml),
# or ZeRO-2 with DEEPSPEED=1 (configs/deepspeed_zero2.yaml); NUM_GPUS processes (default 8).
#
#   bash scripts/launch.sh train_RORem_draft.py configs/draft_config.yaml --pretrained_unet path/to/RORem_unet ...
#
# Extra arguments go to the script and override the config. The job resumes from its latest
# checkpoint if one exists, so the same command restarts a preempted run; SIGTERM saves a checkpoint
# first. The launch config chooses the distributed mode; never add --multi_gpu to a DeepSpeed launch
# (it selects plain DDP and silently drops DeepSpeed). The run_train_*.sh scripts name the inputs of
# one method and call this. Several nodes under SLURM: scripts/slurm_train.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
USAGE="usage: launch.sh TRAIN_SCRIPT CONFIG_YAML [script arguments]"
SCRIPT=${1:?$USAGE}
CFG=${2:?$USAGE}
shift 2
LAUNCH_CONFIG=configs/accelerate_8gpu.yaml
[ "${DEEPSPEED:-0}" = 1 ] && LAUNCH_CONFIG=configs/deepspeed_zero2.yaml
exec accelerate launch --config_file "$LAUNCH_CONFIG" --num_processes "${NUM_GPUS:-8}" \
    "$SCRIPT" --config "$CFG" --resume_from_checkpoint latest "$@"
