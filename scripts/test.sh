#!/usr/bin/env bash
# Set up .venv, lint (ruff check, ruff format --check: configured in pyproject.toml) and run
# the whole test suite (CPU is enough); arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/python -m pytest "$@"
