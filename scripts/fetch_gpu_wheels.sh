#!/usr/bin/env bash
# Download, on a machine with network access, the wheels that scripts/gpu_check.sh installs on the GPU
# machine, which has no network: exactly what its image lacks for the check (DESIGN.md section 16: it
# has Python 3.12, torch 2.11, transformers, accelerate, peft, safetensors, numpy, scipy, tensorboard,
# timm, torchvision, ...; not diffusers, DeepSpeed, pymoo, lpips, pytorch-fid or open_clip). Versions
# are this project's pins (requirements.txt) and what they need beyond the image. Works from a fresh
# clone (any python3 with pip; DeepSpeed's wheel is built in an isolated environment, without torch).
#
#   bash scripts/fetch_gpu_wheels.sh          # into .whl/ (git ignores it; the device tool carries it)
#   PYTHON_VERSION=3.11 bash scripts/fetch_gpu_wheels.sh   # for another Python (a mirror of the image here)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELS:-.whl}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PYVER=${PYTHON_VERSION:-3.12}
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" \
    diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 \
    hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
    pymoo==0.6.2 moocore==0.3.2 cffi==2.1.1 pycparser==3.12 platformdirs==4.14.8 autograd==1.9.1 cma==4.5.0 \
    alive-progress==3.3.0 about-time==4.2.1 graphemeu==0.7.2 Deprecated==1.3.1 \
    lpips==0.1.4 pytorch-fid==0.3.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.14
# DeepSpeed publishes a source archive only: build its wheel without compiling any op (ZeRO-2 with the
# scripts' own torch AdamW needs none; others compile on first use); its build needs no torch
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DEST" deepspeed==0.19.8
ls -1 "$DEST"
du -sh "$DEST"
