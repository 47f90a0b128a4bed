#!/usr/bin/env bash
# Regenerate requirements/lock-cpu.txt from the working .venv: the exact set seen working, used by
# scripts/setup_env.sh as a pip constraints file. Run after a deliberate upgrade that passed the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
out=requirements/lock-cpu.txt
py=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
{
  echo "# The exact set FuseLab was seen working with: Python $py, CPU torch, Linux x86_64 ($(date +%F))."
  echo "# scripts/setup_env.sh installs with it as a pip constraints file (-c), so the README's two commands"
  echo "# reproduce this environment. Regenerate with scripts/lock.sh. torch's local label (+cpu) is dropped:"
  echo "# '==2.13.0' also matches the CPU build, which setup_env.sh installs first."
  python -m pip freeze --exclude-editable | grep -v '^#' | grep -v '^-e ' \
    | sed -E 's/^(torch|torchvision|torchaudio)==([0-9.]+)\+[a-z0-9]+$/\1==\2/' | LC_ALL=C sort -f
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(grep -vc '^#' "$out") packages)"
