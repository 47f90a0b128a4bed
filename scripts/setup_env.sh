#!/usr/bin/env bash
# Create or reuse .venv and install FuseLab with the exact set in requirements/lock-cpu.txt (a pip constraints
# file: pyproject.toml holds compatible ranges, the lock the versions seen working). Idempotent: skips pip when
# neither pyproject.toml nor the lock changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
LOCK=${FUSELAB_LOCK:-requirements/lock-cpu.txt}
if [ ! -f "$LOCK" ]; then
  echo "setup_env.sh: lock file $LOCK not found (set FUSELAB_LOCK or run scripts/lock.sh in a working .venv)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.fuselab-installed
want="$(cat pyproject.toml "$LOCK" | sha256sum | cut -d' ' -f1)-${FUSELAB_EXTRAS:-test}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # torch first, at the lock's exact version: on a CPU machine that is the CPU wheel; anything looser pulls a
  # multi-GB CUDA build.
  torch_pin=$(grep -E '^torch==' "$LOCK" | head -n1)
  python -m pip install -q -c "$LOCK" "${torch_pin:-torch}"
  python -m pip install -q -c "$LOCK" -e ".[${FUSELAB_EXTRAS:-test}]"
  echo "$want" > "$stamp"
fi
