"""Running an experiment: the plan (harness.plan: every stage of the config's graph with its cache key), the one
executor (harness.executor) over it, then the results (harness.results) and what goes to MLflow (harness.runlog).

experiment YAML -> Config -> world -> corpus -> distributions (per model) -> vocab maps -> aligned (per source)
-> fused -> train (FuseLLM, CLM-only) -> domain pool / merges / further methods -> evaluate (every contestant)
-> results.

`build_plan(cfg)` computes every stage's content-addressed key without running anything (so `fuselab plan` is
free); `run_experiment(cfg)` executes the stages that are not cached, each into an atomic directory.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from harness.cache import FileHashes
from harness.config import ExperimentConfig
from harness.executor import Executor, describe_used
from harness.plan import Plan, build_plan, workdir  # noqa: F401  (the public entry points)
from harness.results import ExperimentResult, metrics_of, summarize, uncertainty_tables  # noqa: F401


def world_stage_key(seed: int):
    """The cache key of the micro world of `seed` (tests and benchmarks share built worlds by it)."""
    from harness.stages.world import WorldStage

    return WorldStage("world", seed=seed).key


def check_models(cfg: ExperimentConfig, hashes: FileHashes | None = None) -> list[str]:
    """One line per problem with the target or a source (harness.models.check_model), before any stage runs."""
    from harness import models

    return models.check_models([cfg.target, *cfg.sources], hashes=hashes)


def check_evaluation(cfg: ExperimentConfig) -> list[str]:
    """One line per reason the evaluation would fail only after every model is trained, found before any
    stage runs: a built-in suite whose data is missing offline (harness.evaluation.data), or MultiPL-E where
    generated code cannot be jailed (harness.evaluation.sandbox). Nothing is downloaded or executed."""
    from harness.evaluation.data import BUILTIN_SUITES, DataUnavailableError, resolve_suite_data
    from harness.evaluation.multipl_e import available_languages
    from harness.evaluation.sandbox import SandboxUnavailable, check_sandbox

    data_dir = Path(cfg.evaluation.data_dir).expanduser() if cfg.evaluation.data_dir else None
    problems: list[str] = []
    for suite in cfg.evaluation.suites:
        if suite not in BUILTIN_SUITES:
            continue
        # the languages evaluate() runs: those with a toolchain here (the others are reported "not run")
        languages = available_languages() if suite == "multipl_e" else ()
        if suite == "multipl_e" and not languages:
            continue
        try:
            resolve_suite_data(suite, data_dir, languages)
        except DataUnavailableError as exc:
            lines = str(exc).splitlines()
            lacks = " ".join(line.split(": ")[0] + "." for line in lines[1:] if " lacks " in line)
            problems.append(f"evaluation.suites: {suite}: {lines[0]}{' ' + lacks if lacks else ''} Set "
                            f"evaluation.data_dir (or FUSELAB_DATA) to a folder holding its files (listed in "
                            f"harness/evaluation/data.py).")
        if suite == "multipl_e":
            try:
                check_sandbox()
            except (SandboxUnavailable, ValueError) as exc:
                problems.append(f"evaluation.suites: multipl_e: {exc}")
    return problems + _lm_eval_problems(cfg)


def _lm_eval_problems(cfg: ExperimentConfig) -> list[str]:
    """Unknown lm-eval task names and built-in tasks whose dataset is missing offline
    (harness.evaluation.suites.suite_problems); the micro world's group and tasks exist once it is built."""
    from harness.evaluation.suites import suite_problems

    extra: list[str] = []
    if cfg.world is not None:
        from harness.micro.corpus import DOMAINS
        from harness.micro.tasks import GROUP, task_names

        extra = [GROUP, *task_names(list(DOMAINS))]
    return suite_problems(cfg.evaluation.suites, cfg.evaluation.include_path, extra_names=extra)


def train_settings(cfg: ExperimentConfig, **overrides):
    """fusion.trainer.TrainSettings from the config's `training` section (its fields have the TrainSettings
    names) and the experiment seed; `overrides` (e.g. device, max_steps) win."""
    from harness.stages.train import train_settings as settings

    return settings(cfg.training.model_dump(), cfg.seed, **overrides)


def _import_registered_methods() -> None:
    # Registries fill on import: make every built-in method available by name.
    import fusion.align  # noqa: F401
    import fusion.fuse  # noqa: F401
    import fusion.vocab  # noqa: F401


def _quiet_libraries() -> None:
    # Our own per-stage lines are the progress report; per-file "Loading weights" bars drown them.
    import datasets
    import transformers

    from harness.tracking import quiet_third_party

    quiet_third_party()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def preflight(cfg: ExperimentConfig) -> Plan:
    """The plan, once the evaluation and the models pass their checks (before any stage runs, rather than
    after all the training): a ConfigError / ModelLoadError with one line per problem otherwise."""
    from harness.corpus import corpus_problems

    plan = build_plan(cfg)
    evaluation_problems = [*corpus_problems(cfg.corpus), *check_evaluation(cfg)]
    if evaluation_problems:
        from harness.config import ConfigError

        raise ConfigError("\n".join(evaluation_problems))
    problems = check_models(cfg, plan.hashes)
    if problems:  # one line per problem, each naming the model
        from harness.models import ModelLoadError

        raise ModelLoadError("\n".join(problems))
    plan.cache.clean_stale()
    return plan


def run_experiment(cfg: ExperimentConfig, *, tracker=None, parent_run_id: str | None = None,
                   progress: bool | str = True, track: bool = True) -> ExperimentResult:
    """Run (or resume) the whole comparison and return its results; every stage is cached.

    progress: True prints stage lines, progress bars and training steps; "stages" one line per stage
    (`fuselab run --quiet`); False nothing. With tracking, metrics reach MLflow as stages finish
    (`harness.runlog.LiveLog`), training curves at every logging step."""
    import torch

    torch.manual_seed(cfg.seed)
    _import_registered_methods()
    _quiet_libraries()
    plan = preflight(cfg)
    run_dir = workdir(cfg) / "runs" / f"{cfg.name}-{cfg.content_hash()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if tracker is None and track:
        from harness.tracking import Tracker, resolve_experiment_name

        tracker = Tracker(cfg.tracking.uri, resolve_experiment_name(cfg.tracking.experiment, cfg.name), workdir(cfg))
    if tracker is None:
        return execute(plan, run_dir, progress)
    return _tracked(plan, run_dir, progress, tracker, parent_run_id)


def _tracked(plan: Plan, run_dir: Path, progress: bool | str, tracker, parent_run_id: str | None) -> ExperimentResult:
    from harness.runlog import LiveLog, track_result
    from harness.tracking import ExperimentRuns

    cfg = plan.cfg
    with tracker.run(cfg.name, nested=parent_run_id is not None, parent_run_id=parent_run_id,
                     tags={"fuselab.kind": "experiment", "fuselab.config_hash": cfg.content_hash()}) as run:
        tracker.log_config(cfg)
        live = LiveLog(ExperimentRuns(tracker, run.info.run_id, tags={"fuselab.experiment": cfg.name}), plan)
        try:
            result = execute(plan, run_dir, progress, live=live)
            tracker.log_params(runtime_params(cfg, run_dir))
            track_result(tracker, result, plan.contestants, live=live)
        except BaseException as exc:
            live.live.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        live.live.close()
        return result


def execute(plan: Plan, run_dir: Path, progress: bool | str, live=None) -> ExperimentResult:
    """Ensure every stage of the plan (one executor), then gather the contestants' evaluations into the results
    (harness.results), written to `run_dir`."""
    cfg = plan.cfg
    t_all = time.perf_counter()
    ex = Executor(plan, progress=progress, listeners=[live.on_stage] if live else [],
                  curve_sink=live.curve_sink if live else None)
    if progress:
        print(f"FuseLab experiment {cfg.name} ({cfg.content_hash()}), cache {plan.cache.root}", flush=True)
    ex.run()
    result = gather(plan, run_dir, ex.stage_log)
    result.cache_hits, result.stages_run = ex.hits, ex.ran
    result.stage_timings = {**ex.timings, "total": time.perf_counter() - t_all}
    result.save(run_dir)
    used = {n: json.loads((plan.path(n) / "runtime.json").read_text()) for n in plan.stages
            if (plan.path(n) / "runtime.json").is_file()}
    (run_dir / "runtime.json").write_text(json.dumps({"runtime": ex.placement.params(), "stages": used}, indent=2))
    if progress:
        print(f"\nstages run {ex.ran}, cached {ex.hits}, total {result.stage_timings['total']:.1f} s; "
              f"results in {run_dir}")
    return result


def gather(plan: Plan, run_dir: Path, stage_log: list[dict]) -> ExperimentResult:
    """The results of a plan whose stages are built: the long format and table in contestant order, every
    score's interval and the paired tests, the training curves, the fusion diagnostics (empty without them)."""
    from harness.stages.diagnostics import read_diagnostics
    from harness.stages.evaluate import read_eval, read_units
    from harness.stages.train import loss_curves

    frames, items, docs, losses = [], [], [], {}
    for c in plan.contestants:
        folder = plan.path(f"eval/{c.label}")
        long = read_eval(folder)
        long["method"] = c.method
        frames.append(long)
        units = read_units(folder)
        items.append(units[0])
        docs.append(units[1])
        if c.losses_from is not None:
            losses.update(loss_curves(plan.path(c.losses_from.name), c.label))
    long = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    methods = dict(zip(long["model"], long["method"])) if len(long) else {}
    long = long.drop(columns=["method"], errors="ignore")
    models = list(dict.fromkeys(long["model"])) if len(long) else []
    results = summarize(long, models)
    results.insert(1, "method", [methods[m] for m in results["model"]])
    intervals, comparisons = uncertainty_tables(long, pd.concat(items, ignore_index=True),
                                                pd.concat(docs, ignore_index=True), results,
                                                seed=plan.cfg.evaluation.settings.seed)
    stage_times = pd.DataFrame(stage_log, columns=["stage", "seconds", "cached"])
    diagnostics = read_diagnostics(plan.path("diagnostics") if "diagnostics" in plan.stages else None)
    return ExperimentResult(plan.cfg, results, long, metrics_of(results), losses, {}, run_dir, 0, 0, stage_times,
                            intervals=intervals, comparisons=comparisons, diagnostics=diagnostics)


def runtime_params(cfg: ExperimentConfig, run_dir: Path) -> dict[str, str]:
    """MLflow params: the resolved runtime (placement.device, ...) and where each model-running stage ran
    (device/<stage> = "cuda:0 bfloat16"; several models: "<model>=<device> <dtype>; ..."), from runtime.json."""
    rec = json.loads((run_dir / "runtime.json").read_text())
    out = {f"placement.{k}": str(v) for k, v in rec["runtime"].items()}  # runtime.* holds the config as written
    for stage, used in rec["stages"].items():
        out["device/" + stage.replace(":", "_")] = describe_used(used)[:500]
    return out
