#!/usr/bin/env bash
# Create or refresh .venv/ from requirements.lock. Idempotent: when neither
# requirements.lock nor pyproject.toml changed since the last successful run,
# it only checks the stamp and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "setup: $PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
    exit 1
fi

stamp=.venv/.mlmd-setup-stamp
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ -x .venv/bin/python && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

echo "setup: creating/updating .venv (torch 2.9.1 + CUDA libraries, ~7 GB on first run)" >&2
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.lock
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "setup: done" >&2
