#!/usr/bin/env bash
# Launch train_RORem.py on one 8-GPU node, with plain DDP (default) or DeepSpeed ZeRO-2.
#
#   bash scripts/run_train_RORem.sh data/meta.json experiment/RORem            # DDP, configs/accelerate_8gpu.yaml
#   DEEPSPEED=1 bash scripts/run_train_RORem.sh data/meta.json experiment/RORem # ZeRO-2, configs/deepspeed_zero2.yaml
#   NUM_GPUS=4 bash scripts/run_train_RORem.sh ... --use_lora --lora_rank 64     # extra args go to the script
#
# The launch config chooses the distributed mode; never add --multi_gpu to a DeepSpeed launch
# (it selects plain DDP and silently drops DeepSpeed). The job resumes from its latest checkpoint
# if one exists, so the same command restarts a preempted run; SIGTERM saves a checkpoint first.
set -euo pipefail
cd "$(dirname "$0")/.."
META=${1:?usage: run_train_RORem.sh META_JSON OUTPUT_DIR [extra args]}
OUT=${2:?usage: run_train_RORem.sh META_JSON OUTPUT_DIR [extra args]}
shift 2
CONFIG=configs/accelerate_8gpu.yaml
[ "${DEEPSPEED:-0}" = 1 ] && CONFIG=configs/deepspeed_zero2.yaml
exec accelerate launch --config_file "$CONFIG" --num_processes "${NUM_GPUS:-8}" \
    train_RORem.py --config configs/train_RORem.yaml \
    --meta_path "$META" --output_dir "$OUT" --resume_from_checkpoint latest "$@"
