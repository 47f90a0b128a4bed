"""`fuselab` command line: plan, run, verify, study, report, ui, train, world, config show.

Expected failures (a config error, a missing file, a model that does not load, an unknown report target, a
merge or an evaluation that cannot run: the types in `EXPECTED_ERRORS`) print one line naming the culprit and
exit with status 2; `--debug` adds the traceback. Ctrl-C exits with 130 (SIGTERM / SIGHUP with 128 + signal),
open MLflow runs ended KILLED and finished stages kept in the cache: the same command resumes.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "studies" / "micro_quickstart.yaml"


def _config(args):
    from harness.config import load_config

    return load_config(args.config, args.overrides)


def cmd_plan(args) -> int:
    from harness.corpus import corpus_problems
    from harness.estimate import estimate, format_estimate, resolve_hardware
    from harness.pipeline import build_plan, check_models

    cfg, study = _plan_config(args)
    plan = build_plan(cfg)
    problems = check_models(cfg, plan.hashes)
    table = plan.table()
    est = estimate(cfg, hardware=args.hardware or resolve_hardware())
    if study:
        print(study)
    print(f"experiment {cfg.name} ({cfg.content_hash()}); cache {plan.cache.root}")
    print(_fusion_switches(cfg.fusion))
    import pandas as pd

    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
        print(table.to_string(index=False))
    print("\nestimates:")
    print(format_estimate(est))
    from harness.pipeline import check_evaluation

    for line in [*corpus_problems(cfg.corpus), *check_evaluation(cfg), *problems]:  # `run` stops at these
        print(f"fuselab: problem: {line}", file=sys.stderr)
    return 0


def _plan_config(args):
    """(config, note) for `fuselab plan`, never reading data (absent files are problems, not errors): an experiment
    YAML as it is, or for a study spec its base with the spec's overrides (one trial) and a line saying so."""
    from harness.config import load_config, read_yaml

    data = read_yaml(Path(args.config))
    if not (isinstance(data, dict) and "search_space" in data):
        return load_config(args.config, args.overrides, check_paths=False), None
    from studies.spec import load_spec

    spec = load_spec(args.config, args.overrides, check=False)
    trials = len(spec.grid()) if spec.sampler == "grid" else spec.n_trials
    return spec.base_config(), (f"study {spec.study_name}: {trials} trials ({spec.sampler} over "
                                f"{', '.join(spec.search_space)}; seeds {spec.seeds}); below: one trial, the base "
                                f"{spec.base_path.name} with the spec's overrides")


def _hardware(profile: str):
    """--hardware: a profile of harness.estimate (or auto); a bad name is a usage error."""
    from harness.estimate import resolve_hardware

    try:
        return resolve_hardware(profile)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fusion_switches(fusion) -> str:
    """One line with every method switch as resolved (a preset fills the switches the config leaves unset)."""
    from harness.config import REFERENCE_PRESET

    names = ["vocab_map", "fusion", "score", *REFERENCE_PRESET]
    return f"fusion (preset {fusion.preset}): " + ", ".join(f"{n}={getattr(fusion, n)}" for n in names)


def cmd_run(args) -> int:
    if args.nproc is not None:  # same as the override runtime.extraction_nproc=N
        args.overrides = [*args.overrides, f"runtime.extraction_nproc={args.nproc}"]
    cfg = _config(args)
    _refuse_bad_models(cfg)
    from harness.pipeline import run_experiment

    result = run_experiment(cfg, progress="stages" if args.quiet else True, track=not args.no_track)
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200, "display.float_format", "{:.4f}".format):
        print("\nResults (suite averages; bpb = bits per byte on held-out text, lower is better):")
        if len(getattr(result, "intervals", ())):
            from harness.report import MARK_VS_CLM, MARK_VS_TARGET, uncertainty_table

            print(uncertainty_table(result).to_string())
            print(f"[lo, hi]: 95% bootstrap interval (n = items or held-out documents); {MARK_VS_TARGET} / "
                  f"{MARK_VS_CLM}: differs from the target / CLM-only (paired test, p < 0.05); "
                  f"p-values: comparisons.csv in {result.run_dir}")
        else:
            print(result.results.to_string(index=False))
    return 0


def _refuse_bad_models(cfg) -> None:
    """The model checks of `run_experiment`, before torch, datasets and the pipeline are imported: a broken
    model is refused in about a second instead of after the imports (the run repeats them, from the cache of
    file checks)."""
    from harness.cache import HASHES, FileHashes
    from harness.models import ModelLoadError, check_models

    cache = Path(os.environ.get("FUSELAB_WORKDIR", cfg.workdir)).expanduser().resolve() / "cache"
    problems = check_models([cfg.target, *cfg.sources], hashes=FileHashes(cache / HASHES))
    if problems:
        raise ModelLoadError("\n".join(problems))


def cmd_verify(args) -> int:
    """Check cached stages against their manifests by content (sha256 of every file); remove the corrupt ones
    (unless --report-only) so that `fuselab run` rebuilds them. Exit 1 when any stage was corrupt."""
    from harness.cache import StageCache

    if args.all:
        wd = Path(os.environ.get("FUSELAB_WORKDIR", args.workdir)).expanduser().resolve()
        cache = StageCache(wd / "cache")
        named = [(str(k), k) for k in cache.stage_keys()]
    else:
        from harness.pipeline import build_plan

        plan = build_plan(_config(args))
        cache = plan.cache
        named = [(st.name, st.key) for st in plan.stages.values() if st.kind != "world"]
    counts = {"ok": 0, "corrupt": 0, "unverified": 0, "missing": 0}
    for name, key in named:
        st = cache.status(key, full=True)
        counts[st.state] += 1
        if st.state == "ok":
            print(f"  ok          {name:<34} {key.key}")
        elif st.state == "unverified":
            print(f"  unverified  {name:<34} {key.key} (built before manifests; remove it to rebuild it verified)")
        elif st.state == "corrupt":
            fate = "kept (--report-only)" if args.report_only else "removed: `fuselab run` rebuilds it"
            print(f"  CORRUPT     {name:<34} {key.key}: {'; '.join(st.problems)}; {fate}")
            if not args.report_only:
                cache.discard(key)
    print(f"{counts['ok']} ok, {counts['corrupt']} corrupt, {counts['unverified']} unverified, "
          f"{counts['missing']} not built; cache {cache.root}")
    return 1 if counts["corrupt"] else 0


def cmd_study(args) -> int:
    from studies.runner import run_study

    run_study(args.spec, overrides=args.overrides, n_trials=args.n_trials, storage=args.storage,
              worker_id=args.worker_id, progress="trials" if args.quiet else True, track=not args.no_track)
    return 0


def cmd_report(args) -> int:
    from studies.report import report_main

    report_main(args.target, Path(args.workdir), Path(args.out) if args.out else None,
                tracking_uri=args.tracking_uri, storage=args.storage)
    return 0


def cmd_ui(args) -> int:
    from harness.tracking import is_server_uri, resolve_tracking_uri
    from harness.ui import ui_main

    uri = resolve_tracking_uri(args.tracking_uri, Path(args.workdir))
    if is_server_uri(uri):  # nothing to start: the server serves its own UI
        print(f"{uri} is a tracking server: its MLflow UI is at {uri}")
        return 0
    ui_main(Path(args.workdir), host=args.host, port=args.port, block=True, uri=uri)
    return 0


def cmd_train(args) -> int:
    from harness.launch import launch_training

    return launch_training(args.config, args.overrides, launcher=args.launcher, nproc=args.nproc)


def cmd_world(args) -> int:
    from harness.micro import build_micro_world

    cfg = _config(args)
    root = world_root(cfg, args.config)
    w = build_micro_world(root, seed=cfg.world.seed)
    print(f"micro world at {w.root}: models {sorted(w.models)}, domains {w.domains}, target {w.target}")
    return 0


def world_root(cfg, source: str) -> Path:
    """Where the pipeline reads `cfg`'s micro world: its plan's world stage folder
    (`<workdir>/cache/world/<key>`, or `FUSELAB_WORLD_CACHE/<key>` when that is set)."""
    from harness.config import ConfigError
    from harness.pipeline import build_plan

    if cfg.world is None:
        raise ConfigError(f"{Path(source).name}: world: not set; this experiment uses no micro world")
    return build_plan(cfg).path("world")


def cmd_config_show(args) -> int:
    """The resolved, validated config as YAML, after a comment line with its content hash."""
    import yaml

    cfg = _config(args)
    print(f"# {cfg.name}: content hash {cfg.content_hash()} (config {args.config}, "
          f"overrides: {' '.join(args.overrides) or 'none'})")
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fuselab")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed: pip install -e .)"


def _command(sub, name: str, help: str, example: str, fn, *, common: argparse.ArgumentParser):
    """A subcommand with its one-line help, a description, an example in the epilog and --debug."""
    sp = sub.add_parser(name, help=help, description=help, parents=[common],
                        epilog="example:\n  " + "\n  ".join(example.splitlines()),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.set_defaults(fn=fn)
    return sp


def _with_config(sp, what: str = "experiment YAML (default: the micro quickstart)") -> None:
    sp.add_argument("config", nargs="?", default=str(QUICKSTART), help=what)
    sp.add_argument("overrides", nargs="*", help="dotted overrides with YAML values, e.g. fusion.lam=0.8 "
                                                 "evaluation.suites=[micro,bbh] (docs/CONFIG.md)")


def _workdir_arg(sp, what: str) -> None:
    sp.add_argument("--workdir", default=os.environ.get("FUSELAB_WORKDIR", ".fuselab"),
                    help=f"{what} (default: FUSELAB_WORKDIR, else .fuselab)")


def _experiment_commands(sub, common) -> None:
    sp = _command(sub, "plan", "print the stages, which are cached, and estimates; runs nothing",
                  "fuselab plan studies/micro_quickstart.yaml fusion.lam=0.8\n"
                  "fuselab plan studies/paper_llama2_openllama_mpt_7b.yaml --hardware a100x8", cmd_plan, common=common)
    _with_config(sp)
    sp.add_argument("--hardware", type=_hardware, default=None, metavar="PROFILE",
                    help="estimate for a named profile (cpu, a100x8, h100x4, l4...; harness/estimate.py GPU_PEAKS) "
                         "instead of this machine (default: its CUDA GPUs, else its CPU)")
    sp = _command(sub, "run", "run (or resume) an experiment: every stage not cached, then the results table",
                  "fuselab run studies/micro_quickstart.yaml fusion.alignment=dtw --quiet", cmd_run, common=common)
    _with_config(sp)
    sp.add_argument("--quiet", action="store_true", help="one line per stage: no progress bars or training steps")
    sp.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    sp.add_argument("--nproc", type=int, default=None,
                    help="processes for distribution extraction (torchrun; one per GPU with runtime.device cuda); "
                         "same as runtime.extraction_nproc=N")
    sp = _command(sub, "verify", "check cached stages by content hash; remove corrupt ones (`run` rebuilds them)",
                  "fuselab verify studies/micro_quickstart.yaml\nfuselab verify --all --report-only", cmd_verify,
                  common=common)
    _with_config(sp)
    sp.add_argument("--all", action="store_true", help="every stage in the work dir's cache, not one config's")
    _workdir_arg(sp, "work dir whose cache --all checks")
    sp.add_argument("--report-only", action="store_true", help="do not remove corrupt stages")
    sp = _command(sub, "train", "train the target under a launcher (DeepSpeed / torchrun)",
                  "fuselab train studies/micro_quickstart.yaml training.deepspeed=zero2 --launcher torchrun "
                  "--nproc 2", cmd_train, common=common)
    _with_config(sp)
    sp.add_argument("--launcher", choices=["torchrun", "deepspeed", "none"], default="torchrun",
                    help="how the training processes start (default: torchrun)")
    sp.add_argument("--nproc", type=int, default=1, help="training processes, one per GPU (default: 1)")
    sp = _command(sub, "world", "build the micro world where the config's pipeline reads it (its cache folder)",
                  "fuselab world studies/micro_quickstart.yaml world.seed=1", cmd_world, common=common)
    _with_config(sp, "experiment YAML with a `world:` section (default: the micro quickstart)")
    sp = _command(sub, "config", "print the resolved, validated config (YAML) with its content hash",
                  "fuselab config show studies/micro_quickstart.yaml fusion.lam=0.8", None, common=common)
    show = sp.add_subparsers(dest="action", required=True, metavar="show")
    sp = _command(show, "show", "print the resolved, validated config (YAML) with its content hash",
                  "fuselab config show studies/micro_quickstart.yaml fusion.lam=0.8", cmd_config_show, common=common)
    _with_config(sp)


def _study_commands(sub, common) -> None:
    sp = _command(sub, "study", "run (or resume, or join as one more worker) an Optuna study",
                  "fuselab study studies/micro_alignment_x_fusion.yaml --n-trials 2 --quiet", cmd_study,
                  common=common)
    sp.add_argument("spec", help="study spec YAML (studies/*.yaml with a search_space)")
    sp.add_argument("overrides", nargs="*", help="experiment overrides (training.max_steps=5) or study.<field>=v "
                                                 "(study.seeds=[0])")
    sp.add_argument("--n-trials", type=int, default=None, help="at most this many trials in this process")
    sp.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in the work dir)")
    sp.add_argument("--worker-id", default=None,
                    help="name of this worker in trial attributes (default: host-pid); run several to share a study")
    sp.add_argument("--quiet", action="store_true", help="one line per trial (start, score), no stage lines")
    sp.add_argument("--no-track", action="store_true", help="do not log to MLflow (trials stay in the storage)")
    sp = _command(sub, "report", "tables and plots for a run, experiment or study",
                  "fuselab report micro_quickstart\nfuselab report studies/micro_alignment_x_fusion.yaml", cmd_report,
                  common=common)
    sp.add_argument("target", help="an experiment config or study spec YAML, an MLflow run id, an MLflow "
                                   "experiment name or a study name")
    _workdir_arg(sp, "work dir of the store, the Optuna storage and reports/")
    sp.add_argument("--out", default=None, help="output folder (default: <workdir>/reports/<name>)")
    sp.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                    help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite in the work dir)")
    sp.add_argument("--storage", default=None, help="Optuna storage URL, for study targets")
    sp = _command(sub, "ui", "serve the MLflow UI (a tracking server other machines can log to) on a store",
                  "fuselab ui --port 5001\nfuselab ui --tracking-uri sqlite:////data/mlflow.db --host 0.0.0.0",
                  cmd_ui, common=common)
    _workdir_arg(sp, "work dir of the default store; artifacts of new experiments go to <workdir>/mlartifacts")
    sp.add_argument("--tracking-uri", default=None,
                    help="store to serve: a database URI (default: MLFLOW_TRACKING_URI, else SQLite in the work "
                         "dir); an http(s) URI is a server already and only its address is printed")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sp.add_argument("--port", type=int, default=5000, help="port; a busy one is refused (default: 5000)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (expected errors print one line without it)")
    p = argparse.ArgumentParser(prog="fuselab", parents=[common],
                                description="FuseLLM fusion vs merging: benchmarks and ablations",
                                epilog="example:\n  fuselab run studies/micro_quickstart.yaml\n\n"
                                       "`fuselab COMMAND --help` shows each command's arguments and an example.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fuselab {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _experiment_commands(sub, common)
    _study_commands(sub, common)
    sub.add_parser("lm-eval", add_help=False, help="lm-eval's own command line with FuseLab's models registered "
                   "(--model fuselab-ensemble); arguments pass through unchanged (harness/evaluation/lm_eval_cli.py)")
    return p


class _Stopped(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised where the program is (a KeyboardInterrupt: whatever handles Ctrl-C, such as
    the tracker's KILLED status or `fuselab ui` stopping its server, handles these too)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_on_signals() -> None:
    def stop(signum, frame):
        raise _Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:  # leave handlers someone else installed
            signal.signal(sig, stop)


# Failures a user can fix, by module: printed as one line (exit 2). Looked up only in modules already imported
# (an exception can only come from a module that was), so naming them costs no import.
EXPECTED_ERRORS = {
    "builtins": ("FileNotFoundError", "PermissionError"),
    "harness.config": ("ConfigError",),
    "harness.corpus": ("CorpusError",),
    "harness.models": ("ModelLoadError",),
    "harness.cache": ("CorruptStageError",),
    "harness.runtime": ("RuntimeConfigError",),
    "harness.graph": ("GraphError",),
    "harness.launch": ("LaunchError",),
    "harness.sharded": ("ShardedExtractionError",),
    "harness.tracking": ("TrackingError",),
    "harness.recipes.kd": ("TokenizerMismatch",),
    "harness.stages.merge": ("MergeFailed",),
    "harness.evaluation.data": ("DataUnavailableError",),
    "harness.evaluation.sandbox": ("SandboxUnavailable",),
    "baselines.merging": ("UnmergeableModelsError",),
    "studies.report": ("ReportError",),
}


def is_expected(exc: BaseException) -> bool:
    """True when `exc` is one of `EXPECTED_ERRORS` (a problem of the input or the machine, not of FuseLab)."""
    for module, names in EXPECTED_ERRORS.items():
        mod = sys.modules.get(module)
        types = tuple(t for t in (getattr(mod, n, None) for n in names) if isinstance(t, type))
        if types and isinstance(exc, types):
            return True
    return False


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`build_parser()`'s arguments, with overrides also accepted after options (`run exp.yaml --quiet
    fusion.lam=0.8`: argparse alone takes positionals only before them)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [t for t in extra if t.startswith("-") or "=" not in t or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one `fuselab` command; returns its exit status (0 ok, 1 `verify` found corruption, 2 an expected
    error or bad arguments, 130 Ctrl-C, 128 + N signal N)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments
        from harness.evaluation.lm_eval_cli import main as lm_eval_main

        return lm_eval_main(argv[1:])
    args = parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return _dispatch(args)
    except _Stopped as exc:  # open MLflow runs were ended KILLED on the way out; `fuselab ui` stopped its server
        _say(f"stopped by {exc}", debug)
        return 128 + exc.signum
    except KeyboardInterrupt:
        _say(f"interrupted{_resume_hint(args)}", debug)
        return 130
    except Exception as exc:
        if not is_expected(exc):
            raise
        _say(f"error: {exc}", debug)
        return 2


def _dispatch(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "quiet", False):
        # every library's bars too (lm-eval's per-task ones); tqdm reads TQDM_* when it is imported, so now
        os.environ["TQDM_DISABLE"] = "1"
    from harness.tracking import quiet_third_party

    quiet_third_party()  # before any library is imported: their notices would drown our progress lines
    _stop_on_signals()
    return int(args.fn(args) or 0)


def _resume_hint(args) -> str:
    if args.command in ("run", "study", "train", "world"):
        return "; what finished is cached: the same command resumes from there"
    return ""


def _say(line: str, debug: bool) -> None:
    """`fuselab: <line>` on stderr, after the traceback of the exception being handled with --debug."""
    if debug:
        traceback.print_exc()
    print(f"fuselab: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
