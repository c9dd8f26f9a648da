#!/usr/bin/env bash
# Install everything the tests need (Debian peers and Python packages), then lint, type-check and run the whole suite.
# Used by .ci/run and by the README's Quickstart. Needs root (or sudo) for apt-get on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(dcmtk libgdcm-tools dicom3tools orthanc haproxy systemd)
missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e ".[test,bench]"
python3 -m ruff check scp tests benchmarks
python3 -m ruff format --check scp tests benchmarks
python3 -m mypy scp
python3 -m pytest "$@"
