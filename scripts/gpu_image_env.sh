#!/usr/bin/env bash
# A Python environment on this CPU machine that mirrors the GPU machine's image (DESIGN.md section 16),
# so the GPU check's dry run meets the library versions the real run will meet:
#
#   bash scripts/gpu_image_env.sh                       # makes .venv-gpu-image/ (about 700 MB downloaded)
#   PYTHON=.venv-gpu-image/bin/python bash scripts/gpu_check.sh --dry
#
# What it holds: Python 3.12 (the image's; 3.11 with a warning where no 3.12 is installed), torch 2.11.0
# and torchvision 0.26.0 (the image's CUDA 13 builds: PyPI has no CPU build of them; the CUDA libraries
# they load are borrowed from .venv's torch, or downloaded when there is none), transformers 5.17.0,
# accelerate 1.15.0, huggingface_hub 1.33.0, numpy 2.5.2 (2.4.6 on 3.11), safetensors 0.8.0, tokenizers
# 0.23.2, and this project's pins for what the image has without a known version (peft, scipy, timm, ...).
# Not in it, as not in the image: diffusers, DeepSpeed, pymoo, lpips, pytorch-fid, open_clip, gradio,
# wandb. scripts/gpu_check.sh installs the first six from .whl/ (scripts/fetch_gpu_wheels.sh), as there.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${GPU_IMAGE_ENV:-.venv-gpu-image}
PY=${GPU_IMAGE_PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
        if [ -n "$candidate" ] && "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
            PY=$candidate
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    PY=python3
    echo "warning: no Python 3.12 here (the image's); the mirror uses $("$PY" --version)" >&2
fi
rm -rf "$ENV"
"$PY" -m venv "$ENV"
PIP=("$ENV/bin/python" -m pip install -q --disable-pip-version-check)
MINOR=$("$ENV/bin/python" -c "import sys; print(sys.version_info[1])")
NUMPY=$([ "$MINOR" -ge 12 ] && echo 2.5.2 || echo 2.4.6)
# torch without its CUDA packages when .venv has them (the same CUDA 13 libraries, found through a .pth)
NVIDIA=$(ls -d .venv/lib/python3*/site-packages/nvidia 2>/dev/null | head -1 || true)
if [ -n "$NVIDIA" ]; then
    "${PIP[@]}" --no-deps torch==2.11.0 torchvision==0.26.0
    mkdir -p "$ENV/cuda_libs" && ln -sfn "$(cd "$NVIDIA" && pwd)" "$ENV/cuda_libs/nvidia"
    SITE=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$(cd "$ENV/cuda_libs" && pwd)" > "$SITE/zz_cuda_libs.pth"
    "${PIP[@]}" "typing-extensions>=4.10" sympy networkx jinja2 fsspec filelock "setuptools<82" pillow
else
    "${PIP[@]}" torch==2.11.0 torchvision==0.26.0
fi
cat > "$ENV/constraints.txt" <<EOF
torch==2.11.0
torchvision==0.26.0
EOF
"${PIP[@]}" -c "$ENV/constraints.txt" transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0 "numpy==$NUMPY" \
    safetensors==0.8.0 tokenizers==0.23.2 peft==0.21.2 scipy einops msgpack ninja py-cpuinfo psutil tensorboard matplotlib \
    "timm" pyyaml tqdm regex requests packaging
"$ENV/bin/python" -c "import torch, transformers, accelerate, huggingface_hub, numpy; print('mirror of the GPU image:', 'Python', \
'.'.join(map(str, __import__('sys').version_info[:3])), 'torch', torch.__version__, 'transformers', transformers.__version__, \
'accelerate', accelerate.__version__, 'huggingface_hub', huggingface_hub.__version__, 'numpy', numpy.__version__)"
