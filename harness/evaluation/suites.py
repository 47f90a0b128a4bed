"""`evaluate`: score a model on FuseLab's suites (BBH, CommonSense, MultiPL-E), any lm-eval built-in task or
group (`arc_easy`, `hellaswag`, `bbh_cot_fewshot`, ...) or any task/group of an include path.

lm-eval is the scorer: every FuseLab suite becomes lm-eval task YAML over local data (taskgen.py), and each suite
is one `lm_eval.simple_evaluate` call, seeded from `EvalSettings.seed`, turned into a tidy DataFrame. A FuseLab
suite name wins over an lm-eval name ("bbh" is FuseLab's; lm-eval's own is "bbh_cot_fewshot" or "bbh_fewshot").
Every dataset is checked before the model is loaded (data.py: offline, the missing dataset is named at once).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd

from .data import (BBH_TASKS, BUILTIN_SUITES, COMMONSENSE_FILES, DataUnavailableError, check_task_datasets,
                   resolve_suite_data)
from .multipl_e import available_languages, toolchain_problem
from .sandbox import check_sandbox
from .taskgen import (bbh_group_name, bbh_task_name, commonsense_task_name, multipl_e_task_name,
                      write_suite_tasks)

log = logging.getLogger(__name__)

# primary: this row is its task's primary metric (see `primary_metric_key`); level: "task" or "group" (lm-eval's
# aggregate over a group's tasks; suite averages are taken over tasks, never over group rows).
COLUMNS = ["model", "suite", "task", "metric", "value", "stderr", "n", "note", "primary", "level"]
# lm-eval's own task names, used when the data comes from the HF cache or the hub instead of local files.
BUILTIN_TASK_NAMES = {
    ("bbh", "direct"): [f"bbh_fewshot_{t}" for t in BBH_TASKS],
    ("bbh", "cot"): [f"bbh_cot_fewshot_{t}" for t in BBH_TASKS],
    ("commonsense", None): list(COMMONSENSE_FILES),
}


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation settings pinned per study (lm-eval scores change with batch size and few-shot count)."""

    batch_size: int | str = 1            # or "auto" / "auto:N" (lm-eval probes the largest batch)
    dtype: str = "float32"
    num_fewshot: int | None = None      # None = suite default (bbh 3, commonsense 0, multipl_e always 0)
    seed: int = 1234
    limit: int | dict | None = None     # examples per task, or {suite: examples per task} (others in full)
    device: str | None = None           # None: harness.runtime's auto (the GPU when visible, else CPU)
    attn_implementation: str | None = None  # None: transformers' default (sdpa where supported)
    bbh_variant: str = "direct"         # or "cot": chain-of-thought prompts from the data's cot-prompts/
    multipl_e_languages: tuple[str, ...] = field(default_factory=available_languages)
    max_gen_toks: int = 256             # tokens generated per example (bbh, multipl_e)
    bbh_strip_whitespace: bool = False  # True: BBH exact match ignores leading/trailing whitespace (not lm-eval's)

    def limit_for(self, suite: str) -> int | None:
        """Examples per task for `suite` (None: all)."""
        return self.limit.get(suite) if isinstance(self.limit, dict) else self.limit


def suite_tasks(suite: str, settings: EvalSettings) -> list[str]:
    """The lm-eval task names a local run of `suite` scores (group excluded), in order.

    MultiPL-E lists only the languages of `settings.multipl_e_languages` whose toolchain exists here.
    """
    if suite == "bbh":
        return [bbh_task_name(t, settings.bbh_variant) for t in BBH_TASKS]
    if suite == "commonsense":
        return [commonsense_task_name(t) for t in COMMONSENSE_FILES]
    if suite == "multipl_e":
        return [multipl_e_task_name(lang) for lang in settings.multipl_e_languages if toolchain_problem(lang) is None]
    raise ValueError(f"suite_tasks knows the built-in suites {', '.join(BUILTIN_SUITES)}, not {suite!r}; "
                     "other suites are lm-eval task/group names from include_paths")


@contextlib.contextmanager
def _code_eval_allowed():
    # Set only while FuseLab's own MultiPL-E path runs, restored afterwards.
    previous = os.environ.get("HF_ALLOW_CODE_EVAL")
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = previous


def _as_lm(model, settings: EvalSettings):
    from lm_eval.api.model import LM

    if isinstance(model, LM):
        return model
    if isinstance(model, tuple) and len(model) == 2:
        # (model, tokenizer) already loaded and placed by the caller: lm-eval scores it where it is, so a stage
        # loads each model once (settings.device/dtype describe where the caller put it).
        from lm_eval.models.huggingface import HFLM

        hf_model, tokenizer = model
        return HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=settings.batch_size)
    if isinstance(model, (str, Path)):
        from lm_eval.models.huggingface import HFLM

        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"evaluate(model={str(model)!r}): not an HF model folder (no config.json); pass "
                                    "a saved model folder or an lm_eval.api.model.LM instance")
        from harness.runtime import resolve_device

        extra = {"attn_implementation": settings.attn_implementation} if settings.attn_implementation else {}
        return HFLM(pretrained=str(path), dtype=settings.dtype, device=resolve_device(settings.device or "auto"),
                    batch_size=settings.batch_size, **extra)
    raise TypeError(f"evaluate(model=...) takes an HF folder path, a (model, tokenizer) pair or an lm_eval LM "
                    f"instance, not {type(model).__name__}")


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# Order of preference among metric names when a task's own metric list is unknown (results without lm-eval's
# "configs", frames written before the `primary` column existed).
PRIMARY_PREFERENCE = ("acc", "exact_match", "pass@1", "acc_norm")


def metric_name(metric: str, filter_name: str) -> str:
    """FuseLab's name of lm-eval's metric key `metric,filter`: `metric` for the "none" filter, else
    `metric_filter` (e.g. "exact_match_get-answer")."""
    return metric if filter_name == "none" else f"{metric}_{filter_name}"


def primary_metric_key(config: dict | None, keys: list[str]) -> str | None:
    """The primary `metric,filter` key of one task among the `keys` lm-eval reported for it (in its order).

    The rule: the first metric of the task's `metric_list` that was reported, under the first filter of its
    `filter_list` that reported it (lm-eval names the unfiltered result "none"). A generation task with one
    answer-extraction filter (the micro tasks' "strip", BBH chain-of-thought's "get-answer") is therefore
    scored through that filter, and a task that declares several filters (e.g. strict-match, flexible-extract)
    through the first one it declares. Without a config (results from elsewhere), the first reported key of the
    first metric in `PRIMARY_PREFERENCE`, else the first reported key. None when `keys` is empty.
    """
    pairs = [tuple(k.split(",", 1)) for k in keys]
    if not pairs:
        return None
    config = config or {}
    metrics = [m["metric"] for m in config.get("metric_list") or [] if isinstance(m, dict) and "metric" in m]
    filters = [f["name"] for f in config.get("filter_list") or [] if isinstance(f, dict) and "name" in f] or ["none"]
    for metric in metrics:
        for filter_name in filters:
            if (metric, filter_name) in pairs:
                return f"{metric},{filter_name}"
        for m, f in pairs:  # a filter lm-eval added or renamed: the metric's first reported filter
            if m == metric:
                return f"{m},{f}"
    for metric in PRIMARY_PREFERENCE:
        for m, f in pairs:
            if m == metric:
                return f"{m},{f}"
    return ",".join(pairs[0])


def results_to_frame(results: dict, suite: str, model_name: str) -> pd.DataFrame:
    """lm-eval's results dict -> tidy rows (tasks and groups). Metric names drop lm-eval's ",none" filter suffix;
    another filter is kept as a suffix (e.g. "exact_match_get-answer"). `primary` marks each task's primary
    metric (`primary_metric_key`, from the task's config in `results["configs"]`); `level` is "group" for
    lm-eval's group aggregates (the names in `results["group_subtasks"]`), "task" otherwise."""
    n_samples = results.get("n-samples", {})
    subtasks = results.get("group_subtasks", {})
    configs = results.get("configs", {})

    def count(task: str) -> int:
        if task in n_samples:
            return int(n_samples[task]["effective"])
        return sum(count(t) for t in subtasks.get(task, []))

    rows = []
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            if section == "groups" and task in results.get("results", {}):
                continue
            keys = [k for k in metrics if "," in k and "_stderr," not in k]
            is_group = task in subtasks
            primary = None if is_group else primary_metric_key(configs.get(task), keys)
            for key in keys:
                metric, filter_name = key.split(",", 1)
                rows.append({"model": model_name, "suite": suite, "task": task,
                             "metric": metric_name(metric, filter_name), "value": _number(metrics[key]),
                             "stderr": _number(metrics.get(f"{metric}_stderr,{filter_name}")),
                             "n": count(task), "note": "", "primary": key == primary,
                             "level": "group" if is_group else "task"})
    return pd.DataFrame(rows, columns=COLUMNS)


def _not_run_rows(model_name: str, languages: tuple[str, ...]) -> list[dict]:
    return [{"model": model_name, "suite": "multipl_e", "task": multipl_e_task_name(lang), "metric": "pass@1",
             "value": math.nan, "stderr": math.nan, "n": 0, "note": f"not run: {toolchain_problem(lang)}",
             "primary": True, "level": "task"}
            for lang in languages]


def _split_metric_name(name: str) -> tuple[str, str]:
    # Inverse of metric_name for frames without a `primary` column: the longest known metric name that is a
    # prefix ("acc_norm" is a metric, not acc under a filter "norm").
    if name in PRIMARY_PREFERENCE:
        return name, "none"
    for known in sorted(PRIMARY_PREFERENCE, key=len, reverse=True):
        if name.startswith(known + "_"):
            return known, name[len(known) + 1:]
    return name, "none"


def _is_group_row(row) -> bool:
    # Frames written before the `level` column: the suite itself (an include-path group such as "micro") and
    # the built-in suites' group names are lm-eval group aggregates.
    groups = {bbh_group_name("direct"), bbh_group_name("cot"), "fuselab_commonsense", "fuselab_multipl_e"}
    return row["task"] == row["suite"] or row["task"] in groups


def primary_scores(eval_long: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, suite, task) of `eval_long` (evaluate's columns): the task's primary metric.

    Group aggregates and the perplexity rows are left out; a task whose primary value is NaN (not run) keeps its
    row (callers drop NaN). Frames without the `primary` / `level` columns (written by older versions) get the
    same rule from metric names: `PRIMARY_PREFERENCE`, a filtered metric counting as its metric.
    Columns: model, suite, task, metric, value, stderr, n, in the frame's order.
    """
    cols = ["model", "suite", "task", "metric", "value", "stderr", "n"]
    if eval_long is None or not len(eval_long):
        return pd.DataFrame(columns=cols)
    ev = eval_long[eval_long["suite"] != "perplexity"]
    levels = ev["level"] if "level" in ev.columns else pd.Series(None, index=ev.index, dtype=object)
    is_group = [lvl == "group" if isinstance(lvl, str) else _is_group_row(row)
                for lvl, (_, row) in zip(levels, ev.iterrows())]
    ev = ev.loc[[not g for g in is_group]]  # .loc: an empty list keeps the columns (perplexity-only runs)
    picked = []
    for _, g in ev.groupby(["model", "suite", "task"], sort=False):
        flags = g["primary"].map(lambda v: str(v) in ("True", "1", "1.0")) if "primary" in g.columns else None
        if flags is not None and g["primary"].notna().any():
            if flags.any():
                picked.append(g[flags].iloc[0])
            continue  # a task (or group) with no primary metric
        keys = [",".join(_split_metric_name(m)) for m in g["metric"]]
        picked.append(g.iloc[keys.index(primary_metric_key(None, keys))])
    if not picked:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame(picked)[cols].reset_index(drop=True)


ITEM_COLUMNS = ["model", "suite", "task", "metric", "doc_id", "value"]


def sample_scores(results: dict, suite: str, model_name: str) -> pd.DataFrame:
    """lm-eval's logged samples (`results["samples"]`, from log_samples=True) -> one row per (task, metric,
    document): model, suite, task, metric (named as in `results_to_frame`), doc_id, value (the item's score;
    NaN when lm-eval's per-item value is not a number). For mean-aggregated metrics the task's value is the
    mean of its items' values: what bootstrap intervals and paired tests resample (harness.stats)."""
    rows = []
    for task, samples in (results.get("samples") or {}).items():
        for sample in samples:
            filter_name = sample.get("filter", "none")
            for metric in sample.get("metrics", []):
                rows.append({"model": model_name, "suite": suite, "task": task,
                             "metric": metric_name(metric, filter_name), "doc_id": int(sample["doc_id"]),
                             "value": _number(sample.get(metric))})
    return pd.DataFrame(rows, columns=ITEM_COLUMNS)


def _write_samples(samples: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for task, items in samples.items():
        with open(folder / f"{task}.jsonl", "w") as fh:
            for item in items:
                fh.write(json.dumps(item, default=str, ensure_ascii=False) + "\n")


# lm-eval's HFLM logs one warning per request that does not fit the model's context (twice, through two
# handlers): a micro quickstart prints ~140 of them. They are counted and summarised in one line per suite.
_TRUNCATION_MARKERS = ("Truncating", "Left truncation applied")


class _TruncationCounter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if any(m in record.getMessage() for m in _TRUNCATION_MARKERS):
            self.count += 1
            return False
        return True


@contextlib.contextmanager
def summarised_truncation(model_name: str, suite: str):
    """Within the block, lm-eval's per-request truncation warnings are counted, not printed; at the end one
    warning says how many requests of `suite` were cut to `model_name`'s context (none: nothing)."""
    logger = logging.getLogger("lm_eval.models.huggingface")
    counter = _TruncationCounter()
    logger.addFilter(counter)
    try:
        yield counter
    finally:
        logger.removeFilter(counter)
        if counter.count:
            log.warning("%s on %s: %d request(s) longer than the model's context were truncated from the left "
                        "(lm-eval's per-request warnings, summarised)", model_name, suite, counter.count)


def _without_progress_bars(lm) -> list[str]:
    """Make lm-eval's request methods of this instance run with disable_tqdm=True (lm-eval passes the bar's
    `disable` explicitly, so TQDM_DISABLE does not reach it); returns the names shadowed on the instance."""
    import functools
    import inspect

    names = []
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, name, None)
        if method is not None and name not in vars(lm) and "disable_tqdm" in inspect.signature(method).parameters:
            setattr(lm, name, functools.partial(method, disable_tqdm=True))
            names.append(name)
    return names


def _restore_methods(lm, names: list[str]) -> None:
    for name in names:
        delattr(lm, name)


def _references(index: dict, name: str) -> list[str]:
    """Names a group entry of `index` refers to (its task list: names, or dicts' "task"/"group")."""
    entry = index.get(name)
    members = (entry.cfg or {}).get("task") if entry is not None and entry.cfg else None
    if not isinstance(members, list):
        return []
    return [m if isinstance(m, str) else m.get("task") or m.get("group") for m in members
            if isinstance(m, (str, dict))]


def _resolves_locally(index: dict, name: str, seen: frozenset = frozenset()) -> bool:
    if name not in index:
        return False
    return all(ref in seen or _resolves_locally(index, ref, seen | {name}) for ref in _references(index, name))


def task_manager(names: list[str], include_paths=()):
    """The lm-eval TaskManager that knows `names`: the include paths alone when they define every name and
    everything those refer to (fast), else lm-eval's built-in tasks plus the include paths (an include path
    overrides a built-in of the same name; ~5 s to index)."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(_resolves_locally(local.task_index, n) for n in names):
            return local
    return TaskManager(include_path=paths or None)


def leaf_task_configs(index: dict, name: str, overrides: dict | None = None) -> list[tuple[str, dict]]:
    """(leaf task name, its config as lm-eval builds it) for task/group/tag `name` of a TaskManager's index:
    a group's own task-level keys and a member dict's keys override the member's config, as lm-eval's factory
    does. A member dict naming no registered task is an inline task (its dict is its config)."""
    from lm_eval.config.group import GroupConfig

    overrides = overrides or {}
    entry = index.get(name)
    if entry is None:
        return [(name, dict(overrides))]
    kind = entry.kind.name
    if kind == "TAG":
        return [leaf for task in sorted(entry.tags) for leaf in leaf_task_configs(index, task, overrides)]
    cfg = dict(entry.cfg or {})
    if kind != "GROUP":
        return [(name, {**cfg, **overrides})]
    group_fields = {f.name for f in fields(GroupConfig)}
    merged = {**{k: v for k, v in cfg.items() if k not in group_fields}, **overrides}
    leaves = []
    for member in cfg.get("task") or []:
        if isinstance(member, str):
            leaves += leaf_task_configs(index, member, merged)
        elif isinstance(member, dict):
            ref = member.get("task") or member.get("group")
            rest = {k: v for k, v in member.items() if k != "group"}
            leaves += leaf_task_configs(index, ref, {**merged, **rest})
    return leaves


def unknown_names(names: list[str], manager) -> list[str]:
    """One line per name of `names` that is neither a FuseLab suite nor known to `manager`, with close matches."""
    import difflib

    lines = []
    for name in names:
        if name in BUILTIN_SUITES or name in manager.task_index:
            continue
        close = difflib.get_close_matches(name, [*BUILTIN_SUITES, *manager.all_tasks], n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        lines.append(f"{name!r} is neither a FuseLab suite ({', '.join(BUILTIN_SUITES)}) nor an lm-eval task, "
                     f"group or tag (built-in or in the include paths){hint}")
    return lines


def suite_problems(suites: list[str], include_paths=(), extra_names=()) -> list[str]:
    """One line per reason `evaluate(..., suites, include_paths=...)` would fail on an lm-eval name, found
    without loading a model or any data: a name that is not a FuseLab suite, not in `extra_names` (names that
    exist only later, e.g. the micro world's "micro" group) and unknown to lm-eval; a task whose dataset is
    missing offline (harness.evaluation.data.check_task_datasets). FuseLab suites are checked by
    data.resolve_suite_data. For `fuselab plan` / `run` before any stage (harness.pipeline.check_evaluation)."""
    names = [s for s in suites if s not in BUILTIN_SUITES and s not in set(extra_names)]
    if not names:
        return []
    missing = [p for p in include_paths if not Path(p).expanduser().is_dir()]
    if missing:
        return [f"evaluation.include_path: folder {p} does not exist" for p in missing]
    manager = task_manager(names, include_paths)
    problems = [f"evaluation.suites: {line}" for line in unknown_names(names, manager)]
    known = [n for n in names if n in manager.task_index]
    try:
        check_task_datasets([leaf for n in known for leaf in leaf_task_configs(manager.task_index, n)])
    except DataUnavailableError as exc:
        problems.append("evaluation.suites: " + " ".join(line.strip() for line in str(exc).splitlines()))
    return problems


def _fuselab_suite_run(suite: str, source, settings: EvalSettings, root: Path, model_name: str):
    """(TaskManager, task names, num_fewshot, not-run rows of MultiPL-E languages without a toolchain) of a
    FuseLab suite; the manager is None when nothing can run."""
    from lm_eval.tasks import TaskManager

    languages = settings.multipl_e_languages if suite == "multipl_e" else ()
    runnable = tuple(lang for lang in languages if toolchain_problem(lang) is None)
    skipped = pd.DataFrame(_not_run_rows(model_name, tuple(lang for lang in languages if lang not in runnable)),
                           columns=COLUMNS)
    if suite == "multipl_e" and not runnable:
        return None, [], None, skipped
    if source.kind == "local" or suite == "multipl_e":
        folder, group, _ = write_suite_tasks(
            suite, source.root, root, bbh_variant=settings.bbh_variant, num_fewshot=settings.num_fewshot,
            max_gen_toks=settings.max_gen_toks, languages=runnable,
            bbh_strip_whitespace=settings.bbh_strip_whitespace)
        return TaskManager(include_path=[str(folder)], include_defaults=False), [group], None, skipped
    tasks = BUILTIN_TASK_NAMES[(suite, settings.bbh_variant if suite == "bbh" else None)]
    return TaskManager(), tasks, settings.num_fewshot, skipped


def _resolve_sources(suites: list[str], settings: EvalSettings, data_dir, include_paths) -> tuple[dict, object]:
    """Every suite's data, before the model is loaded: FuseLab suites' sources, and the TaskManager of the
    lm-eval names (None without any) after checking their datasets. Raises DataUnavailableError / ValueError."""
    sources = {}
    for suite in suites:
        if suite in BUILTIN_SUITES:
            runnable = tuple(lang for lang in settings.multipl_e_languages if toolchain_problem(lang) is None) \
                if suite == "multipl_e" else ()
            if suite != "multipl_e" or runnable:
                sources[suite] = resolve_suite_data(suite, data_dir, runnable)
            if suite == "multipl_e" and runnable:
                check_sandbox()  # no jail here: SandboxUnavailable now, not after every generation
    names = [s for s in suites if s not in BUILTIN_SUITES]
    if not names:
        return sources, None
    manager = task_manager(names, include_paths)
    unknown = unknown_names(names, manager)
    if unknown:
        raise ValueError("evaluate: " + "; ".join(unknown) + f" (include_paths={[str(p) for p in include_paths]})")
    check_task_datasets([leaf for n in names for leaf in leaf_task_configs(manager.task_index, n)])
    return sources, manager


def _run_lm_eval(lm, suite: str, tasks: list[str], num_fewshot, manager, settings: EvalSettings, model_name: str,
                 log_samples: bool) -> dict:
    """lm-eval's `simple_evaluate` of `tasks` with the settings' seeds (generated code allowed for MultiPL-E
    only, in its jail), lm-eval's truncation warnings summarised in one line."""
    from lm_eval import simple_evaluate

    unsafe = suite == "multipl_e"
    with _code_eval_allowed() if unsafe else contextlib.nullcontext(), summarised_truncation(model_name, suite):
        return simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, batch_size=settings.batch_size, device=settings.device,
            limit=settings.limit_for(suite), task_manager=manager, log_samples=log_samples, random_seed=settings.seed,
            numpy_random_seed=settings.seed, torch_random_seed=settings.seed, fewshot_random_seed=settings.seed,
            confirm_run_unsafe_code=unsafe, verbosity="WARNING")


def evaluate(model, suites: list[str], settings: EvalSettings, *, data_dir: Path | None = None,
             include_paths: list[Path] = (), model_name: str | None = None,
             log_samples_dir: Path | None = None, task_dir: Path | None = None,
             progress: bool = True, return_items: bool = False):
    """Score `model` on `suites` with lm-eval; returns tidy rows (model, suite, task, metric, value, stderr, n, note,
    primary, level), and with `return_items=True` the pair (rows, per-item scores: `sample_scores`).

    model: an HF model folder (str/Path; loaded on settings.device in settings.dtype), a loaded (model, tokenizer)
    pair (scored where it is), or an `lm_eval.api.model.LM` instance (e.g. the output ensemble).
    suites: "bbh", "commonsense", "multipl_e", or lm-eval task/group/tag names: built-in (e.g. "arc_easy") or
    found in `include_paths` (e.g. "micro"; an include path overrides a built-in of the same name).
    Values are fractions in [0, 1] (acc, acc_norm, exact_match, pass@1); `n` is examples scored; group rows (task =
    group name) are the groups' own aggregates (docs/SUITES.md). A MultiPL-E language without a toolchain gets value
    NaN and a "not run" note.
    task_dir: where generated task YAML goes (default: a temporary folder, removed afterwards).
    progress=False hides the model's per-request progress bars (`disable_tqdm`); results are the same.
    Before the model is loaded: unknown names raise ValueError (with close matches), missing data
    DataUnavailableError naming the files or hub datasets (data.py), MultiPL-E without a code jail
    SandboxUnavailable (sandbox.py). Deterministic for fixed settings.
    """
    if isinstance(suites, str):
        suites = [suites]
    sources, named_manager = _resolve_sources(suites, settings, data_dir, include_paths)
    lm = _as_lm(model, settings)
    model_name = model_name or (Path(model).name if isinstance(model, (str, Path)) else type(model).__name__)
    frames, item_frames = [], []
    with contextlib.ExitStack() as stack:
        if not progress:
            stack.callback(_restore_methods, lm, _without_progress_bars(lm))
        root = Path(task_dir) if task_dir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fuselab-tasks-")))
        for suite in suites:
            if suite in BUILTIN_SUITES:
                manager, tasks, num_fewshot, skipped = _fuselab_suite_run(suite, sources.get(suite), settings, root,
                                                                          model_name)
                frames.append(skipped)
                if manager is None:
                    continue
            else:
                manager, tasks, num_fewshot = named_manager, [suite], settings.num_fewshot
            results = _run_lm_eval(lm, suite, tasks, num_fewshot, manager, settings, model_name,
                                   log_samples_dir is not None or return_items)
            if log_samples_dir is not None and results.get("samples"):
                _write_samples(results["samples"], Path(log_samples_dir) / suite)
            frames.append(results_to_frame(results, suite, model_name))
            if return_items:
                item_frames.append(sample_scores(results, suite, model_name))
    frames = [f for f in frames if not f.empty]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    if not return_items:
        return out
    item_frames = [f for f in item_frames if not f.empty]
    return out, pd.concat(item_frames, ignore_index=True) if item_frames else pd.DataFrame(columns=ITEM_COLUMNS)
