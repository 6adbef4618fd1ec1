#!/usr/bin/env bash
# Installs what the end-to-end tests need: curl, prlimit (util-linux), and Python's
# `websockets` (a real WebSocket client and server) in the shared test virtual environment.
# Idempotent: when everything is present it only checks, in well under a second.
# Prints the absolute path of the venv's python on its last line of stdout.
set -euo pipefail

venv="${FLUIDITY_VENV:-$HOME/.cache/fluidity-venv}"
python="${PYTHON:-python3}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v prlimit >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-e2e: installing ${missing[*]}" >&2
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >&2
fi

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup-e2e: $python not found; install Python 3.9 or later" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "setup-e2e: creating virtual environment at $venv" >&2
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi

# websockets 13 introduced the sync client's `sock=` handshake hooks the tests use.
if ! "$venv/bin/python" -c 'import sys, websockets; sys.exit(0 if int(websockets.__version__.split(".")[0]) >= 13 else 1)' >/dev/null 2>&1; then
    echo "setup-e2e: installing websockets into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'websockets>=13,<17' >&2
fi

echo "$venv/bin/python"
