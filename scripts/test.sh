#!/usr/bin/env bash
# Set up .venv and run the whole test suite (CPU is enough).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest "$@"
