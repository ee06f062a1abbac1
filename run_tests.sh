#!/usr/bin/env bash
# One command: set everything up, then run the linters and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/system-deps.sh
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
