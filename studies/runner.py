"""Optuna studies over FuseLab experiments: resumable, several workers on one storage, every trial an
MLflow run nested under one parent run per study.

How a study runs (`run_study`):
- Storage: Optuna RDB (SQLite file `<workdir>/optuna.db` by default, any SQLAlchemy URL). The study is
  created once (`load_if_exists` semantics); later processes join it.
- Grid studies enqueue every (setting, seed) point once, when the study is created; workers pop points
  from that queue, so two workers never run the same point and a restarted worker runs only what is left.
  TPE/random studies stop at `n_trials` trials in the whole study (all workers together); each of their
  trials runs every seed and reports the running mean, which a `median` pruner may cut short.
- A trial whose worker died (SIGKILL, power loss) stops sending heartbeats; after the grace period any
  worker marks it FAIL (its MLflow run too) and re-queues its point (`max_retries` times). A trial that
  raises is FAIL with the error as user attr `fuselab.error`, and the study goes on.
- On SQLite, claiming a queued trial and creating a new one take a file lock next to the database: SQLite
  has no row locks, and without it two workers could both claim one trial.

The pipeline (`harness.pipeline.run_experiment`) does not report intermediate values (it evaluates once,
at the end), so pruning works across seeds only; see docs/STUDIES.md.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import math
import os
import socket
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from harness.config import ConfigError, ExperimentConfig
from harness.tracking import (
    TAG_ROLE,
    TAG_STUDY,
    NullTracker,
    Tracker,
    file_lock,
    sqlite_path,
)
from studies.attrs import (ATTR_ERROR, ATTR_GRID_SIZE, ATTR_HELDOUT, ATTR_OBJECTIVE, ATTR_RUN_ID, ATTR_RUNS,
                           ATTR_SEARCH_SPACE, ATTR_SETTING, ATTR_SPEC_HASH, ATTR_WORKER)
from studies.heldout import heldout_pending, run_heldout
from studies.spec import SEED_PARAM, CategoricalSpace, FloatSpace, StudySpec, load_spec

ObjectiveFn = Callable[..., Any]  # (cfg, *, tracker, parent_run_id, trial) -> ExperimentResult | dict


class NoTrialLeft(Exception):
    """Raised by the storage instead of creating a trial the study does not need (grid queue empty,
    trial budget spent); ends this worker's optimisation loop."""


class StudyStorage(RDBStorage):
    """RDBStorage that (a) serialises trial claims and creations with a file lock on SQLite and
    (b) refuses to create trials outside the grid queue / beyond the trial budget."""

    def __init__(self, url: str, *, lock_path: Path | None, may_create: Callable[[int], bool], **kwargs):
        super().__init__(url, **kwargs)
        self._lock_path = lock_path
        self._may_create = may_create

    def _lock(self):
        return file_lock(self._lock_path) if self._lock_path else contextlib.nullcontext()

    def set_trial_state_values(self, trial_id, state, values=None):
        if state == TrialState.RUNNING:
            with self._lock():
                return super().set_trial_state_values(trial_id, state, values)
        return super().set_trial_state_values(trial_id, state, values)

    def _create_new_trial(self, study_id, template_trial=None):
        # Optuna's cache layer calls this private method directly (create_new_trial delegates to it).
        if template_trial is not None:  # enqueued points and retries of dead trials
            return super()._create_new_trial(study_id, template_trial)
        with self._lock():
            if not self._may_create(study_id):
                raise NoTrialLeft()
            return super()._create_new_trial(study_id, template_trial)


def _counted(t: FrozenTrial) -> bool:
    """Does this trial use up the trial budget? Not a dead worker's trial (it was re-queued)."""
    if t.state == TrialState.FAIL:
        return ATTR_ERROR in t.user_attrs
    return True


def make_storage(spec: StudySpec, url: str, tracker: Tracker | None = None) -> StudyStorage:
    """The study's storage with heartbeats (dead workers' trials fail and are re-queued)."""
    db = sqlite_path(url)
    lock = db.with_name(db.name + ".lock") if db else None
    if db:
        db.parent.mkdir(parents=True, exist_ok=True)

    def may_create(study_id: int) -> bool:
        if spec.sampler == "grid":
            return False  # a grid study runs its queue and nothing else
        trials = storage.get_all_trials(study_id, deepcopy=False)
        return sum(_counted(t) for t in trials) < spec.n_trials

    grace = spec.grace_period or 2 * spec.heartbeat_interval
    handler = _DeadTrialHandler(tracker, spec.max_retries, grace)
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 120}}} if db else {}
    with (file_lock(lock) if lock else contextlib.nullcontext()), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = StudyStorage(url, lock_path=lock, may_create=may_create, heartbeat_interval=spec.heartbeat_interval,
                               grace_period=grace, heartbeat_stale_trial_callback=handler, **kwargs)
    return storage


class _DeadTrialHandler:
    """Called for each trial found without heartbeat: end its MLflow run FAILED, then re-queue its point."""

    def __init__(self, tracker: Tracker | None, max_retries: int, grace: int):
        self.tracker = tracker
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
        self.grace = grace

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(ATTR_RUN_ID)
        if self.tracker is not None and run_id:
            with contextlib.suppress(Exception):  # the run may live in another store; requeue regardless
                msg = f"worker {trial.user_attrs.get(ATTR_WORKER, '?')} died: no heartbeat for {self.grace} s"
                self.tracker.set_tags({"fuselab.error": msg}, run_id=run_id)
                self.tracker.end_run(run_id, "FAILED")
        self.retry(study, trial)


def run_pipeline(cfg: ExperimentConfig, *, tracker: Tracker, parent_run_id: str, trial: optuna.Trial,
                 progress: bool | str = False):
    """The default objective: the real pipeline; its runs nest under the trial's run. progress: as
    `harness.pipeline.run_experiment`'s ("stages": one line per stage)."""
    from harness.pipeline import run_experiment

    if not tracker.enabled:  # --no-track
        return run_experiment(cfg, progress=progress, track=False)
    return run_experiment(cfg, tracker=tracker, parent_run_id=parent_run_id, progress=progress)


def run_record(out, seed: int, spec: StudySpec) -> dict:
    """What a study keeps of one experiment run (ATTR_RUNS): {"seed", "metrics", "methods"}."""
    metric = spec.objective.metric
    metrics = {k: float(v) for k, v in (out.metrics if hasattr(out, "metrics") else dict(out)).items()}
    if metric not in metrics:
        raise KeyError(f"{spec.source_name}: objective.metric {metric!r} is not among the experiment's "
                       f"metrics ({', '.join(sorted(metrics)[:20])}...); pick one of these")
    record = {"seed": int(seed), "metrics": metrics}
    results = getattr(out, "results", None)
    if results is not None and {"model", "method"} <= set(results.columns):
        # which model is the target / CLM-only: the ablation report's baselines (harness.report)
        record["methods"] = dict(zip(map(str, results["model"]), map(str, results["method"])))
    return record


def setting_label(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != SEED_PARAM) or "base"


class Objective:
    """One Optuna trial = one setting, run for one seed (grid) or every seed (tpe/random)."""

    def __init__(self, spec: StudySpec, tracker: Tracker, parent_run_id: str, objective_fn: ObjectiveFn,
                 worker_id: str, progress: bool):
        self.spec = spec
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.objective_fn = objective_fn
        self.worker_id = worker_id
        self.progress = progress
        self.started: list[int] = []  # trial numbers this process ran

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name, space in self.spec.search_space.items():
            if self.spec.sampler == "grid" or isinstance(space, CategoricalSpace):
                params[name] = trial.suggest_categorical(name, self.spec.encoded_values(name))
            elif isinstance(space, FloatSpace):
                params[name] = trial.suggest_float(name, space.low, space.high, log=space.log, step=space.step)
            else:
                params[name] = trial.suggest_int(name, space.low, space.high, log=space.log, step=space.step)
        if self.spec.sampler == "grid":
            params[SEED_PARAM] = trial.suggest_categorical(SEED_PARAM, list(self.spec.seeds))
        return params

    def __call__(self, trial: optuna.Trial) -> float:
        params = self.suggest(trial)
        seeds = [params[SEED_PARAM]] if SEED_PARAM in params else list(self.spec.seeds)
        setting = setting_label(params)
        trial.set_user_attr(ATTR_SETTING, setting)
        trial.set_user_attr(ATTR_WORKER, self.worker_id)
        tags = {TAG_ROLE: "trial", TAG_STUDY: self.spec.study_name, "fuselab.trial": trial.number,
                "fuselab.setting": setting, "fuselab.worker": self.worker_id}
        self.started.append(trial.number)
        if self.progress:
            print(f"[{self.spec.study_name}] trial {trial.number}: {setting}, seeds {seeds}", flush=True)
        began = time.monotonic()
        pruned: optuna.TrialPruned | None = None
        try:
            with self.tracker.run(f"trial {trial.number}", parent_run_id=self.parent_run_id, tags=tags) as run:
                trial.set_user_attr(ATTR_RUN_ID, run.info.run_id)
                self.tracker.log_params({**{k: _display(self.spec, k, v) for k, v in params.items()},
                                         "seeds": ",".join(map(str, seeds))})
                try:
                    value = self._run_seeds(trial, params, seeds, run.info.run_id)
                except optuna.TrialPruned as exc:
                    self.tracker.set_tags({"fuselab.pruned": str(exc)})
                    pruned = exc
                    value = math.nan
        except KeyboardInterrupt:
            # Ctrl-C: the point goes back to the queue so that a resumed study still runs it.
            _requeue(trial, self.spec.max_retries)
            raise
        except Exception as exc:
            trial.set_user_attr(ATTR_ERROR, f"{type(exc).__name__}: {exc}"[:2000])
            if self.progress:
                print(f"[{self.spec.study_name}] trial {trial.number} failed: {type(exc).__name__}: {exc}", flush=True)
            raise
        if pruned is not None:
            if self.progress:
                print(f"[{self.spec.study_name}] trial {trial.number} pruned after {time.monotonic() - began:.0f} s: "
                      f"{pruned}", flush=True)
            raise pruned
        if self.progress:
            print(f"[{self.spec.study_name}] trial {trial.number}: {self.spec.objective.metric} = {value:.4g} in "
                  f"{time.monotonic() - began:.0f} s; {_running_best(trial.study, trial.number, value)}", flush=True)
        return value

    def _run_seeds(self, trial: optuna.Trial, params: dict, seeds: list[int], run_id: str) -> float:
        metric = self.spec.objective.metric
        runs = []
        for i, seed in enumerate(seeds):
            cfg = self.spec.config_for({k: v for k, v in params.items() if k != SEED_PARAM}, seed)
            out = self.objective_fn(cfg, tracker=self.tracker, parent_run_id=run_id, trial=trial)
            runs.append(run_record(out, seed, self.spec))
            trial.set_user_attr(ATTR_RUNS, runs)
            if len(seeds) > 1:
                so_far = _mean([r["metrics"][metric] for r in runs])
                trial.report(so_far, step=i)
                if i < len(seeds) - 1 and trial.should_prune():
                    raise optuna.TrialPruned(f"mean {metric} {so_far:.4g} after {i + 1} of {len(seeds)} seeds")
        names = sorted(set.intersection(*(set(r["metrics"]) for r in runs)))
        means = {k: _mean([r["metrics"][k] for r in runs]) for k in names}
        self.tracker.log_metrics(means, run_id=run_id)
        value = means[metric]
        self.tracker.log_metrics({"objective": value}, run_id=run_id)
        return value


def _better(direction: str, a: float, b: float) -> bool:
    return a > b if direction == "maximize" else a < b


def _running_best(study: optuna.Study, number: int, value: float) -> str:
    """'best so far 0.2778 (trial 1)': over the study's complete trials (every worker's) and this one."""
    direction = study.direction.name.lower()
    best_n, best_v = number, value
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != number and t.value is not None and _better(direction, t.value, best_v):
            best_n, best_v = t.number, t.value
    return f"best so far {best_v:.4g} (trial {best_n}{', this one' if best_n == number else ''})"


def study_summary(spec: StudySpec, study: optuna.Study, ran_here: list[int] | None = None) -> str:
    """One line on where a study stands, counting trials by what happened to them (a queued grid point is
    not a trial that ran), e.g. `study s: 4 trials ran here (3 complete, 1 failed); 4 of 8 grid points done,
    4 waiting; best micro = 0.2778 (trial 1: fusion.fusion=mince)`."""
    trials = study.get_trials(deepcopy=False)

    def counts(ts) -> str:
        names = {TrialState.COMPLETE: "complete", TrialState.FAIL: "failed", TrialState.PRUNED: "pruned",
                 TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
        parts = [f"{sum(t.state == st for t in ts)} {name}" for st, name in names.items()
                 if any(t.state == st for t in ts)]
        return ", ".join(parts) or "none"

    parts = []
    if ran_here is not None:
        mine = [t for t in trials if t.number in set(ran_here)]
        parts.append(f"{len(mine)} trial{'s' if len(mine) != 1 else ''} ran here ({counts(mine)})")
    finished = [t for t in trials if t.state.is_finished()]
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    if spec.sampler == "grid":
        # a retried point (dead worker) adds a trial: count the points whose last attempt finished
        size = study.user_attrs.get(ATTR_GRID_SIZE, len(spec.grid()))
        parts.append(f"{size - waiting - running} of {size} grid points done, {waiting} waiting, {running} running")
    else:
        parts.append(f"{sum(_counted(t) for t in finished)} of {spec.n_trials} trials done, {running} running")
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if complete:
        direction = study.direction.name.lower()
        best = complete[0]
        for t in complete[1:]:
            if _better(direction, t.value, best.value):
                best = t
        parts.append(f"best {spec.objective.metric} = {best.value:.4g} (trial {best.number}: "
                     f"{best.user_attrs.get(ATTR_SETTING, 'base')})")
    return f"study {spec.study_name}: " + "; ".join(parts)


def _requeue(trial: optuna.Trial, max_retries: int) -> None:
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        RetryHeartbeatStaleTrialCallback(max_retry=max_retries)(trial.study, frozen)


def _display(spec: StudySpec, name: str, value: Any) -> Any:
    return value if name == SEED_PARAM else spec.decode(name, value)


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs))


def _sampler(spec: StudySpec, worker_id: str) -> optuna.samplers.BaseSampler:
    # Workers must not share a sampler seed, or TPE/random would propose the same points in each.
    seed = (spec.sampler_seed + zlib.crc32(worker_id.encode())) % (2**31)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid: unused, points come from the queue


def _pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def open_study(spec: StudySpec, storage: StudyStorage, worker_id: str, progress: bool = False) -> optuna.Study:
    """Create the study (and queue its grid) or join it; refuses a spec that differs from the one the
    study was created with."""
    spec_hash = spec.content_hash()
    with storage._lock():
        try:
            study = optuna.create_study(study_name=spec.study_name, storage=storage, sampler=_sampler(spec, worker_id),
                                        pruner=_pruner(spec), direction=spec.objective.direction)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=spec.study_name, storage=storage, sampler=_sampler(spec, worker_id),
                                      pruner=_pruner(spec))
            created = False
        if created:
            study.set_user_attr(ATTR_SPEC_HASH, spec_hash)
            study.set_user_attr(ATTR_OBJECTIVE, spec.objective.model_dump())
            study.set_user_attr(ATTR_SEARCH_SPACE, list(spec.search_space))
            study.set_user_attr("fuselab.seeds", list(spec.seeds))
            study.set_user_attr("fuselab.spec_path", str(spec.spec_path))
    if not created:
        theirs = study.user_attrs.get(ATTR_SPEC_HASH)
        if theirs is not None and theirs != spec_hash:
            raise ConfigError(
                f"{spec.source_name}: study {spec.study_name!r} in {storage.url} was created from a different spec "
                f"or overrides (hash {theirs} != {spec_hash}); use a new study_name (or study.study_name=...) "
                "or delete the study (optuna delete-study)")
        direction = study.direction.name.lower()
        if direction != spec.objective.direction:
            raise ConfigError(f"{spec.source_name}: objective.direction {spec.objective.direction} but study "
                              f"{spec.study_name!r} was created with {direction}")
    if spec.sampler == "grid":
        _queue_grid(spec, study, created, storage._lock, progress)
    return study


def _queue_grid(spec: StudySpec, study: optuna.Study, created: bool, lock: Callable, progress: bool) -> None:
    if not created:
        # The creator queues right after creating; on a shared server it may be another host, still queueing.
        deadline = time.monotonic() + 60
        while ATTR_GRID_SIZE not in study.user_attrs and time.monotonic() < deadline:
            if study.get_trials(deepcopy=False):
                time.sleep(1)
            else:
                break
    with lock():
        if ATTR_GRID_SIZE in study.user_attrs or (not created and study.get_trials(deepcopy=False)):
            return
        points = spec.grid()
        for point in points:
            study.enqueue_trial(point, skip_if_exists=True)
        study.set_user_attr(ATTR_GRID_SIZE, len(points))
    if progress:
        print(f"[{spec.study_name}] queued {len(points)} grid points", flush=True)


def study_finished(spec: StudySpec, study: optuna.Study) -> bool:
    trials = study.get_trials(deepcopy=False)
    if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
        return False
    if spec.sampler == "grid":
        return ATTR_GRID_SIZE in study.user_attrs
    return sum(_counted(t) for t in trials) >= spec.n_trials


def run_study(spec_path: str | Path, overrides: list[str] | tuple[str, ...] = (), n_trials: int | None = None,
              storage: str | None = None, worker_id: str | None = None, *,
              objective_fn: ObjectiveFn | None = None, progress: bool | str = True, wait_for_others: bool = True,
              report: bool = True, track: bool = True) -> optuna.Study:
    """Run (or join, or resume) the study of `spec_path`; returns the Optuna study.

    `overrides`: experiment overrides applied after the spec's (`training.max_steps=5`); `study.<field>=v`
    sets a spec field. `n_trials`: at most this many trials in this process (the study's own size comes
    from the grid or the spec's `n_trials`). `storage`: an RDB URL instead of the spec's / the default
    `sqlite:///<workdir>/optuna.db`. `worker_id`: a label for this process in MLflow and the trials
    (default host-pid). `objective_fn(cfg, *, tracker, parent_run_id, trial)` replaces the pipeline (tests).
    `wait_for_others`: when nothing is left to start, wait while other workers' trials run (a dead
    worker's trial is detected after the grace period and re-run here). When the study is complete,
    the parent MLflow run is ended FINISHED and (`report`) the ablation report is logged to it.
    `progress`: True prints each trial's start, its score with the running best, one line per pipeline stage
    and a closing `study_summary`; "trials" the same without the stage lines; False nothing.
    `track=False` (`fuselab study --no-track`): nothing goes to MLflow (a `NullTracker`); trials, their metrics
    and the report are still in the Optuna storage and the work dir.
    """
    spec = load_spec(spec_path, overrides)
    if storage:
        spec = spec.model_copy(update={"storage": storage})
    worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = spec.base_config()
    workdir = spec.workdir()
    tracker = Tracker(base.tracking.uri, spec.experiment_name(), workdir) if track else NullTracker()
    url = spec.storage_url()
    study_storage = make_storage(spec, url, tracker)
    study = open_study(spec, study_storage, worker_id, progress)
    parent = tracker.ensure_run(f"study {spec.study_name}", {TAG_ROLE: "study", TAG_STUDY: spec.study_name})
    tracker.set_tags({"fuselab.storage": url, "fuselab.sampler": spec.sampler, "fuselab.spec": str(spec.spec_path),
                      "fuselab.objective": f"{spec.objective.direction} {spec.objective.metric}"}, run_id=parent)
    tracker.log_params({"study.sampler": spec.sampler, "study.seeds": ",".join(map(str, spec.seeds)),
                        "study.objective": spec.objective.metric, "study.direction": spec.objective.direction,
                        **{f"study.space.{k}": str(v.model_dump()) for k, v in spec.search_space.items()}},
                       run_id=parent)
    if objective_fn is None:  # each trial's pipeline: one line per stage in a talkative study
        objective_fn = functools.partial(run_pipeline, progress="stages" if progress is True else False)
    objective = Objective(spec, tracker, parent, objective_fn, worker_id, bool(progress))

    ran = 0
    while n_trials is None or ran < n_trials:
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
            ran += 1
        except NoTrialLeft:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            states = {t.state for t in study.get_trials(deepcopy=False)}
            if TrialState.WAITING in states:
                continue  # a dead worker's point was just re-queued
            if TrialState.RUNNING not in states or not wait_for_others:
                break
            time.sleep(min(spec.heartbeat_interval, 5))
    if study_finished(spec, study):
        # Every worker that sees the end gets here; the lock and the status check make one of them close.
        with file_lock(workdir / f".study-{spec.study_name}.lock"):
            # a study completed before it had a held-out run gets one (and a new report) when run again
            if tracker.run_status(parent) == "RUNNING" or heldout_pending(study):
                _held_out(spec, study, tracker, parent, objective_fn, bool(progress))
                _close_study_run(spec, study, tracker, parent, report, workdir)
    if progress:
        print(study_summary(spec, study, objective.started), flush=True)
    return study


def _held_out(spec: StudySpec, study: optuna.Study, tracker: Tracker, parent: str, objective_fn: ObjectiveFn,
              progress: bool) -> None:
    """The held-out test run of the chosen setting (studies.heldout); a failure is recorded, not raised: the
    study's own trials are complete."""
    try:
        run_heldout(spec, study, tracker, parent, objective_fn, progress)
    except Exception as exc:
        print(f"[{spec.study_name}] held-out test run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        # a failed one is tried again the next time the study is run
        study.set_user_attr(ATTR_HELDOUT, {"failed": f"{type(exc).__name__}: {exc}"})


def _close_study_run(spec: StudySpec, study: optuna.Study, tracker: Tracker, parent: str, report: bool,
                     workdir: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.FAIL,
                                                                          TrialState.PRUNED)}
    metrics = {f"trials_{k}": v for k, v in counts.items()}
    with contextlib.suppress(ValueError):  # no complete trial: no best value
        metrics["best_objective"] = study.best_value
    tracker.log_metrics(metrics, run_id=parent)
    if report:
        try:
            from studies.report import write_study_report

            write_study_report(study, workdir / "reports" / spec.study_name, tracker=tracker, run_id=parent)
        except Exception as exc:  # a plotting problem must not turn a finished study into a failed one
            print(f"[{spec.study_name}] report failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            tracker.set_tags({"fuselab.report_error": f"{type(exc).__name__}: {exc}"}, run_id=parent)
    tracker.end_run(parent, "FINISHED")


def load_objective(text: str) -> ObjectiveFn:
    """`package.module:function` -> the function (for `--objective`)."""
    mod, _, fn = text.partition(":")
    if not fn:
        raise ValueError(f"--objective {text!r}: expected module:function")
    return getattr(importlib.import_module(mod), fn)


def main(argv: list[str] | None = None) -> int:
    """`python -m studies.runner SPEC [-o override ...] [--n-trials N] [--storage URL] [--worker-id ID]`."""
    ap = argparse.ArgumentParser(prog="python -m studies.runner", description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("-o", "--override", action="append", default=[], help="experiment override or study.<field>=v")
    ap.add_argument("--n-trials", type=int, default=None, help="at most this many trials in this process")
    ap.add_argument("--storage", default=None, help="Optuna RDB URL (default sqlite in the work dir)")
    ap.add_argument("--worker-id", default=None)
    ap.add_argument("--objective", default=None, help=argparse.SUPPRESS)  # module:function, for tests
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)
    run_study(args.spec, args.override, n_trials=args.n_trials, storage=args.storage, worker_id=args.worker_id,
              objective_fn=load_objective(args.objective) if args.objective else None,
              progress="trials" if args.quiet else True, track=not args.no_track)
    return 0


if __name__ == "__main__":
    sys.exit(main())
