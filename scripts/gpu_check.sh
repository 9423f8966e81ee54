#!/usr/bin/env bash
# The one GPU check (scripts/gpu_check.py says what it runs), as one command:
#
#   bash scripts/gpu_check.sh            # on one GPU, under 8 minutes; table in $OUT (or gpu_check_out/)
#   bash scripts/gpu_check.sh --dry      # on a CPU: the same runs on a simulated GPU (toy_world/sim_gpu.py)
#
# A GPU machine with torch, accelerate, peft and transformers but no diffusers (and no network) gets
# the missing packages from the wheels in $WHEELS (default .whl/, made on a networked machine by
# scripts/fetch_gpu_wheels.sh), installed into $GPU_CHECK_SITE (default /tmp/gpu_check_site) for this run only.
# scripts/gpu_image_env.sh makes such an environment on a CPU machine, for the dry run (PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
OUT_DIR=${OUT:-gpu_check_out}
if ! "$PY" -c "import diffusers" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "error: diffusers is not installed and $WHEELS holds no wheels (make them with scripts/fetch_gpu_wheels.sh)" >&2
        exit 2
    fi
    SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 \
    DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT_DIR"
set +e
"$PY" scripts/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
status=${PIPESTATUS[0]}
exit "$status"
