#!/usr/bin/env bash
# Download, on a machine with network access, the wheels that scripts/gpu_check.sh installs on a GPU
# machine without them. That machine (DESIGN.md section 13: Python 3.12, x86-64) has torch,
# accelerate, peft, transformers, safetensors, tensorboard and matplotlib, but not diffusers,
# DeepSpeed or pymoo. The versions are this project's pins (requirements.txt) and what they need.
#
#   bash scripts/fetch_gpu_wheels.sh          # into .whl/ (git ignores it; the device tool carries it)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELS:-.whl}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" \
    diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 zipp==4.1.2 \
    hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
    pymoo==0.6.2 moocore==0.3.2 cffi==2.1.1 pycparser==3.12 platformdirs==4.14.8 autograd==1.9.1 cma==4.5.0 \
    alive-progress==3.3.0 about-time==4.2.1 graphemeu==0.7.2 Deprecated==1.3.1
# DeepSpeed publishes a source archive only: build its wheel here without compiling any op (ZeRO-2
# with the scripts' own torch AdamW needs none; others compile on first use)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
ls -1 "$DEST"
du -sh "$DEST"
