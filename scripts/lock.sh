#!/usr/bin/env bash
# Regenerate requirements.lock from the current .venv (after adding a dependency by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
{ echo "# Pinned environment for mlmd (pip freeze of a working .venv; regenerate with scripts/lock.sh)."
  .venv/bin/python -m pip freeze --all | grep -v -E "^(mlmd|pip)[= @]|^-e |^# Editable" ; } > requirements.lock
