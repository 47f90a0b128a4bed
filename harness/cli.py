"""`fuselab` command line: plan, run, verify, study, report, ui, train, world.

Configuration errors print one line naming the file and field, and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "studies" / "micro_quickstart.yaml"


def _config(args):
    from harness.config import load_config

    return load_config(args.config, args.overrides)


def cmd_plan(args) -> int:
    from harness.config import load_config
    from harness.corpus import corpus_problems
    from harness.estimate import estimate, format_estimate, resolve_hardware
    from harness.pipeline import build_plan, check_models

    cfg = load_config(args.config, args.overrides, check_paths=False)  # a plan needs no data: absent is a problem
    plan = build_plan(cfg)
    problems = check_models(cfg, plan.hashes)
    table = plan.table()
    est = estimate(cfg, hardware=args.hardware or resolve_hardware())
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
              worker_id=args.worker_id, progress="trials" if args.quiet else True)
    return 0


def cmd_report(args) -> int:
    from studies.report import report_main

    report_main(args.target, Path(args.workdir), Path(args.out) if args.out else None,
                tracking_uri=args.tracking_uri, storage=args.storage)
    return 0


def cmd_ui(args) -> int:
    from harness.tracking import ui_main

    ui_main(Path(args.workdir), host=args.host, port=args.port, block=True)
    return 0


def cmd_train(args) -> int:
    from harness.launch import launch_training

    return launch_training(args.config, args.overrides, launcher=args.launcher, nproc=args.nproc)


def cmd_world(args) -> int:
    from harness.micro import build_micro_world

    w = build_micro_world(Path(args.root), seed=args.seed)
    print(f"micro world at {w.root}: models {sorted(w.models)}, domains {w.domains}, target {w.target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuselab", description="FuseLLM fusion vs merging: benchmarks and ablations")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", nargs="?", default=str(QUICKSTART), help="experiment YAML (default: micro quickstart)")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fusion.lam=0.8")

    sp = sub.add_parser("plan", help="print the stages, which are cached, and estimates; runs nothing")
    with_config(sp)
    sp.add_argument("--hardware", type=_hardware, default=None, metavar="PROFILE",
                    help="estimate for a named profile (cpu, a100x8, h100x4, l4...; harness/estimate.py GPU_PEAKS) "
                         "instead of this machine (default: its CUDA GPUs, else its CPU)")
    sp.set_defaults(fn=cmd_plan)
    sp = sub.add_parser("run", help="run (or resume) an experiment")
    with_config(sp)
    sp.add_argument("--quiet", action="store_true", help="one line per stage: no progress bars or training steps")
    sp.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    sp.add_argument("--nproc", type=int, default=None,
                    help="processes for distribution extraction (torchrun; one per GPU with runtime.device cuda); "
                         "same as runtime.extraction_nproc=N")
    sp.set_defaults(fn=cmd_run)
    sp = sub.add_parser("verify", help="check cached stages by content hash; remove corrupt ones (`run` rebuilds them)")
    with_config(sp)
    sp.add_argument("--all", action="store_true", help="every stage in the work dir's cache, not one config's")
    sp.add_argument("--workdir", default=os.environ.get("FUSELAB_WORKDIR", ".fuselab"), help="with --all")
    sp.add_argument("--report-only", action="store_true", help="do not remove corrupt stages")
    sp.set_defaults(fn=cmd_verify)
    sp = sub.add_parser("study", help="run (or resume / join) an Optuna study")
    sp.add_argument("spec")
    sp.add_argument("overrides", nargs="*")
    sp.add_argument("--n-trials", type=int, default=None)
    sp.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in the work dir)")
    sp.add_argument("--worker-id", default=None,
                    help="name of this worker in trial attributes (default: host-pid); run several to share a study")
    sp.add_argument("--quiet", action="store_true", help="one line per trial (start, score), no stage lines")
    sp.set_defaults(fn=cmd_study)
    sp = sub.add_parser("report", help="tables and plots for a run, experiment or study")
    sp.add_argument("target")
    sp.add_argument("--workdir", default=os.environ.get("FUSELAB_WORKDIR", ".fuselab"))
    sp.add_argument("--out", default=None, help="output folder (default: <workdir>/reports/<name>)")
    sp.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                    help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite in the work dir)")
    sp.add_argument("--storage", default=None, help="Optuna storage URL, for study targets")
    sp.set_defaults(fn=cmd_report)
    sp = sub.add_parser("ui", help="open the MLflow UI on the project's store")
    sp.add_argument("--workdir", default=os.environ.get("FUSELAB_WORKDIR", ".fuselab"))
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=5000)
    sp.set_defaults(fn=cmd_ui)
    sp = sub.add_parser("train", help="train the target under a launcher (DeepSpeed / torchrun)")
    with_config(sp)
    sp.add_argument("--launcher", choices=["torchrun", "deepspeed", "none"], default="torchrun")
    sp.add_argument("--nproc", type=int, default=1)
    sp.set_defaults(fn=cmd_train)
    sp = sub.add_parser("world", help="build the micro world only")
    sp.add_argument("--root", default=".fuselab/world")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_world)
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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments
        from harness.evaluation.lm_eval_cli import main as lm_eval_main

        return lm_eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        # every library's bars too (lm-eval's per-task ones); tqdm reads TQDM_* when it is imported, so now
        os.environ["TQDM_DISABLE"] = "1"
    from harness.tracking import quiet_third_party

    quiet_third_party()  # before any library is imported: their notices would drown our progress lines
    from harness.cache import CorruptStageError
    from harness.config import ConfigError
    from harness.corpus import CorpusError
    from harness.models import ModelLoadError

    _stop_on_signals()
    try:
        return int(args.fn(args) or 0)
    except _Stopped as exc:  # open MLflow runs were ended KILLED on the way out; `fuselab ui` stopped its server
        print(f"fuselab: stopped by {exc}", file=sys.stderr)
        return 128 + exc.signum
    except (ConfigError, CorpusError, ModelLoadError, CorruptStageError) as exc:
        print(f"fuselab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
