#!/usr/bin/env bash
# Install everything the tests need (Debian peers and Python packages), then lint, type-check and run the whole suite.
# Used by .ci/run and by the README's Quickstart. Needs root (or sudo) for apt-get on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh

apt_install dcmtk libgdcm-tools dicom3tools orthanc haproxy systemd
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test,bench]"
"$PYTHON" -m ruff check scp tests benchmarks
"$PYTHON" -m ruff format --check scp tests benchmarks
"$PYTHON" -m mypy scp
"$PYTHON" -m pytest "$@"
