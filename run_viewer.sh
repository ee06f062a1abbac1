#!/usr/bin/env bash
# One command: set everything up, then open the viewer on the bundled demo study
# (or on the DICOM folder/files given as arguments).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/system-deps.sh
bash scripts/setup.sh
exec .venv/bin/ich-viewer "$@"
