"""Where each evaluation suite's data comes from, and the error that says what to provide when it is missing.

Resolution order per suite: the `data_dir` argument, env `FUSELAB_DATA`, the local Hugging Face cache (lm-eval's
built-in tasks, only if the cache already holds their datasets), the hub when online. The local layout is the one of
the shared data folder (see its SOURCES.md):

    <data_dir>/bbh/<task>.json                                  BIG-Bench-Hard, {"examples": [{"input", "target"}]}
    <data_dir>/bbh/cot-prompts/<task>.txt                       the 3 chain-of-thought exemplars per task
    <data_dir>/commonsense/arc_easy_test.llmfoundry.jsonl       {"query", "choices", "gold"}
    <data_dir>/commonsense/arc_challenge_test.llmfoundry.jsonl
    <data_dir>/commonsense/openbookqa_test.llmfoundry.jsonl
    <data_dir>/commonsense/hellaswag_validation.ai2olmo.jsonl.gz   HF fields (ctx_a, ctx_b, endings, label, ...)
    <data_dir>/commonsense/boolq_validation.ai2olmo.jsonl.gz       HF fields (question, passage, answer)
    <data_dir>/multipl-e/humaneval-<language>.jsonl             MultiPL-E rows (python: HumanEval-X rows)
    optional, few-shot examples: <data_dir>/commonsense/{arc_easy,arc_challenge,openbookqa}_validation.ai2olmo.jsonl.gz
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)
COMMONSENSE_FILES = {
    "arc_easy": "commonsense/arc_easy_test.llmfoundry.jsonl",
    "arc_challenge": "commonsense/arc_challenge_test.llmfoundry.jsonl",
    "boolq": "commonsense/boolq_validation.ai2olmo.jsonl.gz",
    "hellaswag": "commonsense/hellaswag_validation.ai2olmo.jsonl.gz",
    "openbookqa": "commonsense/openbookqa_test.llmfoundry.jsonl",
}
# Optional validation copies: few-shot examples for the tasks scored on their test split (lm-eval draws them from
# train, which the shared data lacks); without them the shots come from the scored split.
COMMONSENSE_FEWSHOT_FILES = {
    "arc_easy": "commonsense/arc_easy_validation.ai2olmo.jsonl.gz",
    "arc_challenge": "commonsense/arc_challenge_validation.ai2olmo.jsonl.gz",
    "openbookqa": "commonsense/openbookqa_validation.ai2olmo.jsonl.gz",
}
# The hub datasets lm-eval 0.4.13's built-in tasks read (checked in the local HF cache before going online).
BUILTIN_DATASETS = {
    "bbh": ("SaylorTwift/bbh",),
    "commonsense": ("allenai/ai2_arc", "aps/super_glue", "Rowan/hellaswag", "allenai/openbookqa"),
    "multipl_e": ("nuprl/MultiPL-E",),
}
BUILTIN_SUITES = ("bbh", "commonsense", "multipl_e")


class DataUnavailableError(FileNotFoundError):
    """A suite's data is neither local nor reachable; the message lists the files to provide."""


@dataclass(frozen=True)
class DataSource:
    kind: str            # "local" (files under root), "hf_cache" (built-in tasks, cached), "hub" (online)
    root: Path | None    # the data folder for "local"


def multipl_e_file(language: str) -> str:
    return f"multipl-e/humaneval-{language}.jsonl"


def suite_files(suite: str, languages: tuple[str, ...] = ()) -> list[str]:
    """Files (relative to the data folder) that a local run of `suite` reads."""
    if suite == "bbh":
        return [f"bbh/{t}.json" for t in BBH_TASKS] + [f"bbh/cot-prompts/{t}.txt" for t in BBH_TASKS]
    if suite == "commonsense":
        return list(COMMONSENSE_FILES.values())
    if suite == "multipl_e":
        return [multipl_e_file(lang) for lang in languages]
    raise ValueError(f"unknown suite {suite!r}; built-in suites are {', '.join(BUILTIN_SUITES)}")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or huggingface.co cannot be reached in 3 s."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("HF_DATASETS_OFFLINE")):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return False
    except OSError:
        return True


def hf_cache_has(repo_id: str) -> bool:
    """Whether the local Hugging Face caches (datasets or hub) already hold dataset `repo_id`."""
    from datasets import config as ds_config
    from huggingface_hub import constants as hub_constants

    parts = repo_id.split("/")  # "org/name", or a bare canonical name such as "gsm8k"
    candidates = [Path(ds_config.HF_DATASETS_CACHE) / "___".join(parts),
                  Path(hub_constants.HF_HUB_CACHE) / ("datasets--" + "--".join(parts))]
    return any(path.is_dir() and any(path.iterdir()) for path in candidates)


def _missing(root: Path, files: list[str]) -> list[str]:
    return [f for f in files if not (root / f).is_file()]


def resolve_suite_data(suite: str, data_dir: Path | None, languages: tuple[str, ...] = ()) -> DataSource:
    """Pick the data source of `suite` (see module docstring). Raises DataUnavailableError at once when offline
    and nothing local is complete, listing every file to provide and where."""
    files = suite_files(suite, languages)
    roots: list[tuple[str, Path]] = []
    if data_dir is not None:
        roots.append(("data_dir argument", Path(data_dir)))
    if os.environ.get("FUSELAB_DATA"):
        roots.append(("FUSELAB_DATA", Path(os.environ["FUSELAB_DATA"])))
    for _, root in roots:
        if not _missing(root, files):
            return DataSource("local", root.resolve())
    if all(hf_cache_has(r) for r in BUILTIN_DATASETS[suite]):
        return DataSource("hf_cache", None)
    if not hub_offline():
        return DataSource("hub", None)
    lines = [f"no data for evaluation suite {suite!r}: offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set or the hub "
             f"unreachable), the local HF cache lacks {', '.join(BUILTIN_DATASETS[suite])}, and no data folder holds "
             f"all of its files."]
    for label, root in roots:
        missing = _missing(root, files)
        lines.append(f"{label} {root} lacks {len(missing)} of {len(files)} files: "
                     + ", ".join(str(root / m) for m in missing[:8]) + (" ..." if len(missing) > 8 else ""))
    lines.append("Provide these files under one folder and pass it as data_dir= (or set FUSELAB_DATA):")
    lines.extend(f"  <data_dir>/{f}" for f in files)
    lines.append("Formats and upstream sources: see harness/evaluation/data.py and the shared data SOURCES.md.")
    raise DataUnavailableError("\n".join(lines))


# `datasets` builders that read local files (`dataset_kwargs.data_files`) instead of a hub repository.
LOCAL_BUILDERS = ("json", "csv", "parquet", "arrow", "text", "pandas")


def _data_files(spec) -> list[str]:
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, dict):
        return [f for v in spec.values() for f in _data_files(v)]
    return [f for v in spec or [] for f in _data_files(v)]


def task_dataset_problem(task: str, cfg: dict) -> str | None:
    """Why lm-eval task `task` (its resolved config `cfg`) cannot read its dataset offline, else None.

    A local builder (`dataset_path: json|csv|parquet|arrow|text`) or a local folder needs its `data_files` (glob
    patterns allowed); a hub dataset needs to be in the local HF cache. Tasks without a `dataset_path` (Python
    tasks, custom datasets) are not checked.
    """
    import glob

    path = cfg.get("dataset_path")
    if not path:
        return None
    files = _data_files((cfg.get("dataset_kwargs") or {}).get("data_files"))
    if path in LOCAL_BUILDERS or Path(str(path)).expanduser().exists():
        missing = [f for f in files if not glob.glob(str(Path(f).expanduser()))]
        return f"lm-eval task {task!r}: data file(s) not found: {', '.join(missing)}" if missing else None
    if hf_cache_has(str(path)):
        return None
    name = cfg.get("dataset_name")
    return (f"lm-eval task {task!r} reads the hub dataset {path!r}" + (f" (config {name!r})" if name else "")
            + ", which is not in the local Hugging Face cache")


def check_task_datasets(configs: list[tuple[str, dict]]) -> None:
    """Raise DataUnavailableError at once when any of the (task, resolved config) pairs cannot read its dataset:
    missing local files always, a hub dataset absent from the cache only when offline (online lm-eval downloads
    it). The message names every such dataset and how to provide it."""
    problems = [p for task, cfg in configs if (p := task_dataset_problem(task, cfg))]
    offline = bool(problems) and hub_offline()
    shown = problems if offline else [p for p in problems if "data file(s) not found" in p]
    if not shown:
        return
    reason = " (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set or the hub unreachable)" if offline else ""
    raise DataUnavailableError(
        f"lm-eval tasks without their data{reason}:\n" + "\n".join(f"  {line}" for line in shown)
        + "\nDownload the dataset once online (it is then cached), or point the task at a local copy: an "
          "evaluation.include_path folder with a group YAML whose task list overrides the built-in task, e.g. "
          "`task: [{task: arc_easy, dataset_path: json, dataset_name: null, dataset_kwargs: {data_files: "
          "{train: ..., validation: ..., test: ...}}}]` (docs/SUITES.md).")
