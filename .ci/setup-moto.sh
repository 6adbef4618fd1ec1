#!/usr/bin/env bash
# Installs moto's server mode into a private virtual environment for the AWS tests.
# Idempotent: a second run reuses the venv and only checks the installation.
# Prints the absolute path of `moto_server` on its last line of stdout.
set -euo pipefail

venv="${FLUIDITY_VENV:-$HOME/.cache/fluidity-venv}"
python="${PYTHON:-python3}"

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup-moto: $python not found; install Python 3.9 or later" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "setup-moto: creating virtual environment at $venv" >&2
    mkdir -p "$(dirname "$venv")"
    if ! "$python" -m venv "$venv" >&2; then
        rm -rf "$venv"
        echo "setup-moto: could not create a virtual environment; on Debian/Ubuntu install python3-venv" >&2
        exit 1
    fi
fi

# pip is quiet when the requirement is already satisfied, so reruns are cheap.
if ! "$venv/bin/python" -c 'import moto, flask' >/dev/null 2>&1 \
    || ! "$venv/bin/python" -c 'import moto, sys; sys.exit(0 if moto.__version__.startswith("5.") else 1)' >/dev/null 2>&1; then
    echo "setup-moto: installing moto[server]==5.* into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'moto[server]==5.*' >&2
fi

server="$venv/bin/moto_server"
if [ ! -x "$server" ]; then
    echo "setup-moto: $server is missing after installation" >&2
    exit 1
fi
echo "$server"
