"""`fuselab lm-eval ARGS`: lm-eval's own command line, with FuseLab's models registered first.

The arguments go to lm-eval unchanged (`lm_eval.__main__.cli_evaluate`, the `lm-eval` / `lm_eval` console
script), after `import baselines.ensemble` has registered the output ensemble as `--model fuselab-ensemble`:

    fuselab lm-eval --model fuselab-ensemble \\
        --model_args 'members=/models/a|/models/b,combiner=mean' --tasks arc_easy --limit 10
    fuselab lm-eval run --model hf --model_args pretrained=/models/a --tasks hellaswag
    fuselab lm-eval ls tasks

One default differs: an evaluation given no device (neither `--device` nor a `device:` in its `--config`)
runs on FuseLab's automatic device (harness.runtime: the GPU when one is visible, else the CPU) instead of
lm-eval's "cuda:0", which fails on a machine without a GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

NOT_EVALUATIONS = ("ls", "validate", "-h", "--help")


def _option_value(argv: list[str], *names: str) -> str | None:
    """The value of the first of `names` in `argv` ("--name value" or "--name=value"); None when absent."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _config_sets_device(path: str) -> bool:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # lm-eval reports the bad file itself
    return isinstance(data, dict) and data.get("device") is not None


def with_default_device(argv: list[str]) -> list[str]:
    """`argv` plus `--device <auto device>` when it is an evaluation (not `ls`, `validate` or help) that names
    no device on its command line or in its `--config` YAML; otherwise `argv` unchanged."""
    if not argv or argv[0] in NOT_EVALUATIONS or any(a in ("-h", "--help") for a in argv):
        return list(argv)
    if _option_value(argv, "--device") is not None:
        return list(argv)
    config = _option_value(argv, "--config", "-C")
    if config is not None and _config_sets_device(config):
        return list(argv)
    from harness.runtime import resolve_device

    return [*argv, "--device", resolve_device("auto")]


def main(argv: list[str]) -> int:
    """Run lm-eval's CLI on `argv` (the words after `fuselab lm-eval`) with `fuselab-ensemble` registered;
    returns lm-eval's exit status (0 when it returns normally)."""
    import baselines.ensemble  # noqa: F401  -- registers the model "fuselab-ensemble"
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *with_default_device(list(argv))]
    try:
        cli_evaluate()
    except SystemExit as exc:
        code = exc.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
