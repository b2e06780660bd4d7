#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv from pyproject.toml.
# Usage: bash scripts/setup.sh [extra]   e.g. `bash scripts/setup.sh dev` adds the test tools.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extra=${1:-}
[[ -x .venv/bin/python ]] || python3 -m venv .venv
stamp=.venv/.installed-${extra:-base}
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".${extra:+[$extra]}"
  touch "$stamp"
fi
