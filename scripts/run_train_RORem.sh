#!/usr/bin/env bash
# Launch train_RORem.py on one 8-GPU node, with plain DDP (default) or DeepSpeed ZeRO-2.
#
#   bash scripts/run_train_RORem.sh data/meta.json experiment/RORem            # DDP, configs/accelerate_8gpu.yaml
#   DEEPSPEED=1 bash scripts/run_train_RORem.sh data/meta.json experiment/RORem # ZeRO-2, configs/deepspeed_zero2.yaml
#   NUM_GPUS=4 bash scripts/run_train_RORem.sh ... --use_lora --lora_rank 64     # extra args go to the script
#
# scripts/launch.sh does the launch: restarts resume from the latest checkpoint.
set -euo pipefail
USAGE="usage: run_train_RORem.sh META_JSON OUTPUT_DIR [extra args]"
META=${1:?$USAGE}
OUT=${2:?$USAGE}
shift 2
exec bash "$(dirname "$0")/launch.sh" train_RORem.py configs/train_RORem.yaml --meta_path "$META" --output_dir "$OUT" "$@"
