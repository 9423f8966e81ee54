#!/bin/bash
# Train on N nodes x 8 GPUs under SLURM: one `accelerate launch` per node, 8 ranks each.
#
#   sbatch --nodes 4 scripts/slurm_train.sh configs/deepspeed_zero2_multinode.yaml \
#       train_RORem.py --config configs/train_RORem.yaml --meta_path /shared/data/meta.json \
#       --output_dir /shared/experiments/RORem_full --resume_from_checkpoint latest
#
# Submit from the repository root. --output_dir (checkpoints, data_check.json) and --latent_cache_dir
# must be on a filesystem every node mounts (checked at start-up). SLURM's TERM before a time limit or
# preemption reaches every rank: each saves a checkpoint at the end of its step and exits 0, and with
# --requeue the job resumes from it (--resume_from_checkpoint latest). GPUS_PER_NODE (8) and
# MAIN_PORT (29500) can be set in the environment.
#SBATCH --job-name=rorem
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=TERM@300
#SBATCH --output=slurm-%j.out
set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: sbatch --nodes N scripts/slurm_train.sh ACCELERATE_CONFIG SCRIPT.py [script arguments]" >&2
    exit 2
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_PORT=${MAIN_PORT:-29500}
cd "${SLURM_SUBMIT_DIR:-.}"
if [ -z "${RORem_NODE_STEP:-}" ]; then
    # on the batch host: start this script once per node; each copy reads its own SLURM_NODEID
    # awk reads every line: `head -n 1` closes the pipe early, and under pipefail scontrol's SIGPIPE
    # would end the job before it starts (3 runs in 10 here with two node names)
    MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
    export RORem_NODE_STEP=1 MAIN_IP GPUS_PER_NODE MAIN_PORT
    exec srun --nodes "$SLURM_NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1 bash scripts/slurm_train.sh "$@"
fi
CONFIG=$1
shift
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m accelerate.commands.launch --config_file "$CONFIG" \
    --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" "$@"
