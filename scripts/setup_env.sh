#!/usr/bin/env bash
# Create or reuse .venv and install FuseLab with the pinned stack. Idempotent: skips pip when pyproject.toml
# has not changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.fuselab-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)-${FUSELAB_EXTRAS:-test}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # torch first, exactly pinned: anything looser pulls a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[${FUSELAB_EXTRAS:-test}]"
  echo "$want" > "$stamp"
fi
