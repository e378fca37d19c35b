#!/usr/bin/env bash
# Set up (once) and run the test suite: creates .venv, installs must-ray with its test extra
# (skipped when .venv is already up to date with pyproject.toml: scripts/setup.sh),
# runs pytest. Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
