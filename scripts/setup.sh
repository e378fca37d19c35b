#!/usr/bin/env bash
# Create .venv (Python >= 3.10) and install must-ray (editable) with its test extra.
# Re-running is free: when .venv already holds this checkout's install of this pyproject.toml
# (a stamp in .venv records its hash), nothing is installed and pip is not even started.
# A clean clone (no .venv) or a changed pyproject.toml installs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
STAMP=.venv/.must-ray-installed
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(pwd)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && .venv/bin/python -c "import must_ray, sys; sys.exit(not must_ray.__file__.startswith('$(pwd)/'))" 2>/dev/null; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "$want" > "$STAMP"
