#!/usr/bin/env bash
# README command 1: set up (or reuse) the environment and run the micro quickstart end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec fuselab run studies/micro_quickstart.yaml "$@"
