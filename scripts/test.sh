#!/usr/bin/env bash
# Set up .venv with the test tools, then lint, type-check and run the whole test suite.
# Offline, the tests read MNIST from $MNIST_EXP_DATA; when unset and ../shared/data is
# beside the project, a temporary copy is seeded from it. Extra arguments go to pytest; the
# quick tier (under a minute) is: bash scripts/test.sh -m "not slow and not server and not browser"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh dev
if [[ -z ${MNIST_EXP_DATA:-} && -x ../shared/data/seed.sh ]]; then
  MNIST_EXP_DATA=$(mktemp -d)
  trap 'rm -rf "$MNIST_EXP_DATA"' EXIT
  ../shared/data/seed.sh "$MNIST_EXP_DATA" >/dev/null
  export MNIST_EXP_DATA
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy mnist_exp
# pytest exits 5 when it collects no test: that is a failure here, as any non-zero code.
# Three pytest-xdist workers for two cores: while a test waits on a server, a scheduler or a
# browser, the extra worker uses its core (docs/performance.md); each worker's runs take their share
# of the cores in torch threads (tests/conftest.py). Each file runs on one worker, so its
# daemons and module fixtures start once, in the order tests/conftest.py sorts them: the
# files with the most processes first.
workers=$(($(nproc) * 3 / 2))
.venv/bin/python -m pytest --numprocesses "$((workers > 1 ? workers : 1))" \
  --dist loadfile --no-loadscope-reorder "$@"
