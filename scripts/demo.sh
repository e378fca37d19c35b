#!/usr/bin/env bash
# Set up (once) and run the demo on the embedded synthetic world. Outputs go to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python jobs/make_world.py --config jobs/configs/demo.yaml "$@"
