"""What an experiment logs to MLflow, through harness.tracking: one child run per contestant row (its params,
the figures of the stages that make it, its scores, its training curve) streamed as stages finish, and at the
end the results folder (harness.results) once, plus the summary metrics of the experiment's own run.

Everything iterates the plan's contestants: a stage's figures go to the contestants that list it in
`figures_from`, an evaluation's rows to the contestant whose eval stage it is.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

from harness.contestants import Contestant
from harness.results import RESULTS_DIR, ExperimentResult, result_files, summarize
from harness.stages.base import Stage

log = logging.getLogger(__name__)


def stage_metrics(stage: Stage, folder: Path) -> dict[str, float]:
    """A finished stage's own figures, named `<kind>/<figure>` (child-run metrics with a "/" stay out of the
    results table read back from MLflow)."""
    from harness.tracking import flatten

    try:
        data = stage.figures(folder)
    except (OSError, ValueError):
        return {}
    return {f"{stage.kind}/{k}": float(v) for k, v in flatten(data).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def score_metrics(long: pd.DataFrame, model: str) -> tuple[dict[str, float], dict[str, float]]:
    """(suite averages and bits per byte as in the results table, every per-task metric `suite/task/metric`)."""
    sub = long[long["model"] == model]
    row = summarize(long, [model]).iloc[0]
    scores = {c: float(row[c]) for c in row.index[1:] if isinstance(row[c], (int, float)) and not math.isnan(row[c])}
    per_task = {f"{r.suite}/{r.task}/{r.metric}": float(r.value) for r in sub.itertuples()
                if isinstance(r.value, (int, float)) and not math.isnan(r.value)}
    return scores, per_task


class LiveLog:
    """Streams a running experiment to MLflow (harness.tracking.ExperimentRuns `live`): an Executor listener
    (`on_stage`) and training-curve sinks (`curve_sink`). A tracking error is reported and the experiment goes
    on (the summary logged at the end still fails loudly)."""

    def __init__(self, live, plan):
        self.live = live
        self.plan = plan
        self.by_label = {c.label: c for c in plan.contestants}
        self.figures_of: dict[str, list[Contestant]] = {}
        for c in plan.contestants:
            for st in c.figures_from:
                self.figures_of.setdefault(st.name, []).append(c)
        self.row_params: dict[str, tuple[Contestant, dict]] = {c.label: (c, {}) for c in plan.contestants}

    def run_of(self, label: str) -> str:
        """The child run of a results row (created with its contestant's params on first use)."""
        contestant, extra = self.row_params[label]
        return self.live.child(label, method=contestant.method, params={**contestant.params, **extra})

    def on_stage(self, stage: Stage, folder: Path, seconds: float, cached: bool) -> None:
        if stage.kind == "world":
            return
        try:
            if not cached:
                self.live.log_stage(stage.name, seconds)
            contestant = getattr(stage, "contestant", None)
            if contestant is not None:
                self._evaluated(contestant, folder)
                return
            for c in self.figures_of.get(stage.name, []):
                self.live.log_new(self.run_of(c.label), stage_metrics(stage, folder))
        except Exception as exc:
            log.warning("MLflow: could not log stage %s as it finished (%s: %s); the run goes on", stage.name,
                        type(exc).__name__, exc)

    def _evaluated(self, contestant: Contestant, folder: Path) -> None:
        """Log each row's scores (to its run and, as `<row>/<score>`, to the experiment's run); end its run."""
        from harness.stages.evaluate import read_eval

        rows_file = folder / "rows.json"
        rows = json.loads(rows_file.read_text()) if rows_file.is_file() else {}
        for label, extra in rows.items():
            self.row_params[label] = (contestant, extra)
        long = read_eval(folder)
        for model in dict.fromkeys(long["model"]) if len(long) else []:
            self.row_params.setdefault(model, (contestant, {}))
            scores, per_task = score_metrics(long, model)
            self.live.log_new(self.run_of(model), {**scores, **per_task})
            self.live.log_new(self.live.parent_run_id, {f"{model}/{k}": v for k, v in scores.items()})
            self.live.logged.add(f"eval:{model}")
            self.live.finish(model)

    def curve_sink(self, label: str):
        """The training-curve sink of contestant `label` (`fusion.trainer.train_target(on_log=...)`), or None."""
        if label not in self.row_params:
            return None
        try:
            self.run_of(label)
            return self.live.curve_sink(label)
        except Exception as exc:
            log.warning("MLflow: no live training curve for %s (%s: %s)", label, type(exc).__name__, exc)
            return None


def track_result(tracker, result: ExperimentResult, contestants: list[Contestant], live: LiveLog | None = None) -> None:
    """Log a finished experiment to the open run of `tracker`: one nested run per results row with its params,
    scores and training curve (only what did not go out live, with `live`); the summary metrics; the results
    folder once (artifact folder `results/`, read back by `fuselab report`)."""
    params = {c.label: c.params for c in contestants}
    for _, row in result.results.iterrows():
        model = str(row["model"])
        scores, per_task = score_metrics(result.eval_long, model) if len(result.eval_long) else ({}, {})
        scores.update({c: float(row[c]) for c in result.results.columns[2:]
                       if isinstance(row[c], (int, float)) and not math.isnan(row[c])})
        if live is not None:
            run_id = live.run_of(model) if model in live.row_params else None
            if run_id is not None:
                live.live.log_new(run_id, {**scores, **per_task})
                if model in result.losses and f"curve:{model}" not in live.live.logged:
                    tracker.log_curve("train_loss", result.losses[model], run_id=run_id)
                live.live.finish(model)
                continue
        with tracker.run(model, nested=True, tags={"fuselab.method": row["method"], "fuselab.model": model}):
            tracker.log_params(params.get(model) or {"method": row["method"]})
            tracker.log_metrics({**scores, **per_task})
            if model in result.losses:
                tracker.log_curve("train_loss", result.losses[model])
    _log_summary(tracker, result, live)


def _log_summary(tracker, result: ExperimentResult, live: LiveLog | None) -> None:
    logged = live.live.logged if live is not None else set()
    if live is not None:
        live.live.log_new(live.live.parent_run_id, result.metrics)
    else:
        tracker.log_metrics(result.metrics)
    tracker.log_metrics({f"stage_seconds/{k}": v for k, v in result.stage_timings.items()
                         if f"stage:{k}" not in logged})
    tracker.log_metrics({"cache_hits": result.cache_hits, "stages_run": result.stages_run})
    for name, pts in result.losses.items():
        if f"curve:{name.split('/')[0]}" not in logged:
            tracker.log_curve(f"loss/{name}", pts)
    for f in result_files(result.run_dir):  # the results folder, once: `fuselab report` reads it back
        tracker.log_artifact(f, RESULTS_DIR)
