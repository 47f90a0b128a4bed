#!/usr/bin/env bash
# Prepare, here (network), the wheels scripts/gpu_check.sh installs on the GPU machine (no network there).
# That machine has Python 3.12 with torch 2.11, transformers 5.17, accelerate, tokenizers, safetensors, numpy,
# pandas, pyarrow, scipy, scikit-learn, sacrebleu, matplotlib... preinstalled (../.library/device/KINDS.md); what
# FuseLab's GPU check needs beyond them (datasets, lm-eval and its helpers, pydantic, rapidfuzz, editdistance,
# gguf) goes to .gpu/wheels/ as cp312 manylinux x86_64 wheels. The pipeline's MLflow, Optuna, DeepSpeed and
# mergekit paths are not exercised by the check, so their (large) wheels stay behind.
# Output: .gpu/wheels/*.whl and .gpu/worlds/ (the micro world), gitignored; the device tool carries them
# (name `.gpu` in `carry`): ~26 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu/wheels
build=.gpu/build
rm -rf "$out" "$build"
mkdir -p "$out" "$build"
PY=${PYTHON:-python3}
LOCK=requirements/lock-cpu.txt
pin() { grep -iE "^$1==" "$LOCK" | head -n1; }
# What the GPU machine already has, at the versions it has (pinned so the resolver keeps them; torch and
# transformers are not requirements of anything downloaded here).
PRESENT="tokenizers==0.23.2 accelerate==1.15.0 safetensors==0.8.0
numpy==2.5.2 huggingface-hub==1.33.0"
# Names there at versions we do not know: never downloaded (assumed compatible, checked by gpu_check's imports).
THERE="torch transformers tokenizers accelerate safetensors numpy huggingface-hub pandas pyarrow scipy scikit-learn
sacrebleu matplotlib jinja2 markupsafe pyyaml tqdm requests urllib3 idna certifi charset-normalizer filelock fsspec
packaging typing-extensions xxhash aiohttp aiosignal frozenlist multidict yarl propcache attrs aiohappyeyeballs
httpx httpcore h11 anyio sniffio hf-xet regex sentencepiece protobuf psutil python-dateutil six pytz tzdata
joblib threadpoolctl absl-py portalocker tabulate colorama lxml click networkx sympy mpmath triton pillow
contourpy cycler fonttools kiwisolver pyparsing rich markdown-it-py mdurl pygments shellingham typer
nvidia-.* cuda-.* setuptools pip wheel"
WANT="$(pin datasets) $(pin lm_eval | sed 's/lm_eval/lm-eval/') $(pin evaluate) $(pin pydantic) $(pin rapidfuzz)
$(pin editdistance) $(pin gguf) $(pin dill) $(pin multiprocess)"
# Pure-Python packages published only as sdists: built here into wheels (py3-none-any).
"$PY" -m pip wheel -q --no-deps -w "$build" "$(pin rouge_score | sed 's/rouge_score/rouge-score/')" \
  "$(pin word2number)" "$(pin sqlitedict)"
cat > "$build/req.txt" <<REQ
$(echo $PRESENT | tr ' ' '\n')
$(echo $WANT | tr ' ' '\n')
REQ
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  --find-links "$build" -d "$build/all" -r "$build/req.txt"
there_re="^($(echo $THERE | tr ' ' '|' | tr '_' '-'))-[0-9]"
for w in "$build"/all/*.whl; do
  name=$(basename "$w" | sed -E 's/-[0-9].*//' | tr '_' '-' | tr 'A-Z' 'a-z')
  if ! echo "$name-0" | grep -qE "$there_re"; then cp "$w" "$out/"; fi
done
rm -rf "$build"
echo "wrote $(ls "$out" | wc -l) wheels, $(du -sh "$out" | cut -f1) to $out:"
ls "$out"
# The micro world (tokenizers, tiny source models, tasks: ~7 MiB), so the GPU machine does not rebuild it.
. .venv/bin/activate 2>/dev/null || true
world=$(python -c 'from harness.pipeline import world_stage_key; print(world_stage_key(0).key)')
src=${FUSELAB_WORLD_CACHE:-.fuselab/test-worlds}/$world
if [ ! -d "$src" ]; then
  FUSELAB_WORLD_CACHE=${FUSELAB_WORLD_CACHE:-.fuselab/test-worlds} python -c "
from pathlib import Path; import os
from harness.micro import build_micro_world
build_micro_world(Path(os.environ['FUSELAB_WORLD_CACHE']) / '$world', seed=0, progress=True)"
fi
rm -rf .gpu/worlds && mkdir -p .gpu/worlds && cp -r "$src" .gpu/worlds/
echo "copied the micro world $world ($(du -sh .gpu/worlds | cut -f1)); .gpu/ holds $(du -sh .gpu | cut -f1)"
