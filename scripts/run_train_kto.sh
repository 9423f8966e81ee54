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
# Extra arguments go to the script and override the config. The job resumes from its latest
# checkpoint if one exists, so the same command restarts a preempted run.
set -euo pipefail
cd "$(dirname "$0")/.."
USAGE="usage: run_train_kto.sh PRETRAINED_UNET SCORED_META_JSON OUTPUT_DIR [extra args]"
UNET=${1:?$USAGE}
SCORED=${2:?$USAGE}
OUT=${3:?$USAGE}
shift 3
CONFIG=configs/accelerate_8gpu.yaml
[ "${DEEPSPEED:-0}" = 1 ] && CONFIG=configs/deepspeed_zero2.yaml
exec accelerate launch --config_file "$CONFIG" --num_processes "${NUM_GPUS:-8}" \
    train_RORem_kto.py --config configs/kto_config.yaml \
    --pretrained_unet "$UNET" --meta_path "$SCORED" --output_dir "$OUT" --resume_from_checkpoint latest "$@"
