#!/usr/bin/env bash
# Set up (once; later runs skip the install: scripts/setup.sh) and run the whole MuST pipeline
# on the embedded synthetic world (jobs/configs/demo.yaml): world -> 5 teachers -> pseudo labels
# -> student -> evaluation -> transfer.
# Outputs go to out/demo/ (report: out/demo/reports/). Extra arguments go to jobs/pipeline.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python jobs/pipeline.py --config jobs/configs/demo.yaml "$@"
