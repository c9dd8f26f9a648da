#!/usr/bin/env bash
# The README's Quickstart: install the node (into .venv on Debian's own python3, see python-env.sh) and run it;
# arguments go to `compressing-scp run` (e.g. --config config/example.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh
"$PYTHON" -m pip install -q --disable-pip-version-check .
exec compressing-scp run "$@"
