#!/usr/bin/env bash
# One command for a GPU machine with Python 3.12 + torch preinstalled and no network (the device tool's H200):
# installs FuseLab's other dependencies from the wheels scripts/gpu_wheels.sh prepared in .gpu/wheels, then runs
# scripts/gpu/check.py (GPU vs CPU agreement, the micro study on the GPU, MFU figures). Under 8 minutes on one H200.
# Before, here:  bash scripts/gpu_wheels.sh        (wheels, data and the micro world into .gpu/, ~35 MiB)
# There:         bash scripts/gpu_check.sh         (device tool: carry [".gpu"]; results land in $OUT)
# Dry run on a CPU (what CI-less machines can check): bash scripts/gpu_check.sh --device cpu --quick
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.gpu/out}
mkdir -p "$out"
site=/tmp/fuselab-gpu-site
pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$pyver" != "3.12" ]; then
  echo "gpu_check: python3 is $pyver, the wheels in .gpu/wheels are for 3.12: using this environment's packages"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif [ -d .gpu/wheels ] && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/wheels/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export MLFLOW_ENABLE_ASYNC_LOGGING=false
export FUSELAB_WORLD_CACHE=${FUSELAB_WORLD_CACHE:-$PWD/.gpu/worlds}
data=()
[ -d .gpu/data ] && data=(--data-dir "$PWD/.gpu/data")
# fail fast, naming what is missing, before anything long starts
python3 - <<'PY'
import importlib, sys
missing = []
for mod in ("torch", "transformers", "datasets", "lm_eval", "pydantic", "rapidfuzz", "pandas", "pyarrow", "yaml",
            "accelerate", "safetensors", "tokenizers", "evaluate", "gguf"):
    try:
        importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{mod} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("gpu_check: cannot import " + "; ".join(missing) + " -- run scripts/gpu_wheels.sh here and carry .gpu")
import torch, transformers
print(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}", flush=True)
PY
set -o pipefail
python3 scripts/gpu/check.py --out "$out" "${data[@]}" "$@" 2>&1 | tee "$out/gpu_check.log"
