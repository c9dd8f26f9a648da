# Sourced by tests/run.sh and scripts/run-node.sh: sets PYTHON, the interpreter to install into, and puts its
# scripts first on PATH. That is the machine's python3 when its pip may install packages (a pyenv or container
# Python); otherwise (Debian's own python3, which PEP 668 marks externally managed, or one without pip) it is a
# virtual environment in .venv, made with Debian's python3-venv (installed when missing).

apt_install() {
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if ((${#missing[@]})); then
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        echo "installing Debian packages: ${missing[*]}"
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

pip_may_install() {
    python3 -m pip --version >/dev/null 2>&1 && python3 - <<'PY'
import os, sys, sysconfig
sys.exit(os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))
PY
}

PYTHON=python3
if ! pip_may_install; then
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv 2>/dev/null || { rm -rf .venv; apt_install python3-venv; python3 -m venv .venv; }
    fi
    PYTHON="$PWD/.venv/bin/python"
    export PATH="$PWD/.venv/bin:$PATH"
fi
