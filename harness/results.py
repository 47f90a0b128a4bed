"""The one results schema of an experiment.

- long format (`eval_long.csv`): one row per (model, suite, task, metric): model (a contestant's label, or one
  expert of a pool), suite, task, metric, value, stderr (lm-eval's), n; bits per byte are suite `perplexity`
  (task: the domain), their rows with a `windows` column naming the windows (fusion.windows.describe_windows).
- table (`results.csv`): `summarize(long)`, one row per model in contestant order: model, method, each suite's
  average of its tasks' primary metric (0-1), `bpb_<domain>` bits per byte on held-out text and `bpb_avg`.
- `intervals.csv` (every score's bootstrap interval) and `comparisons.csv` (paired tests vs the target and
  CLM-only): harness.stats.
- losses (`losses.json`): {curve: [[step, nats/token]]}; stage times (`stage_times.csv`): stage, seconds, cached.
- `diagnostics.csv`: the fusion diagnostics of the FuseLLM set, long form (source, domain, figure, value, n:
  harness.stages.diagnostics); empty when the experiment has none.

`ExperimentResult.save(folder)` writes these files and `ExperimentResult.load(folder)` reads them back; the
pipeline writes them to the run folder and logs that folder to MLflow once (artifact folder `results/`), and
`fuselab report` reads them back from there.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

LONG_COLUMNS = ["model", "suite", "task", "metric", "value", "stderr", "n"]  # every long-format row has these
RESULTS_DIR = "results"  # the MLflow artifact folder of an experiment run's results
TABLES = ("results", "eval_long", "intervals", "comparisons", "stage_times", "diagnostics")
DIAGNOSTICS_COLUMNS = ["source", "domain", "figure", "value", "n"]  # harness.stages.diagnostics


def summarize(long: pd.DataFrame, models: list[str] | None = None) -> pd.DataFrame:
    """One row per model (default: in order of first appearance in `long`): each suite's average over its tasks
    of the task's primary metric (every task with a value counts, filtered generation metrics included:
    `harness.evaluation.suites.primary_scores`) and bits per byte per domain (`bpb_<domain>`) with their mean
    over domains (`bpb_avg`)."""
    from harness.evaluation.suites import primary_scores

    if models is None:
        models = list(dict.fromkeys(long["model"])) if len(long) else []
    primary = primary_scores(long)
    rows = []
    for model in models:
        sub = long[long["model"] == model]
        row: dict[str, Any] = {"model": model}
        mine = primary[primary["model"] == model]
        for suite in dict.fromkeys(sub.loc[sub["suite"] != "perplexity", "suite"]):
            vals = pd.to_numeric(mine.loc[mine["suite"] == suite, "value"], errors="coerce").dropna()
            row[suite] = float(vals.mean()) if len(vals) else float("nan")
        bpb = sub[(sub["suite"] == "perplexity") & (sub["metric"] == "bits_per_byte")]
        for _, r in bpb.iterrows():
            row[f"bpb_{r['task']}"] = float(r["value"])
        if len(bpb):
            row["bpb_avg"] = float(bpb["value"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def metrics_of(table: pd.DataFrame) -> dict[str, float]:
    """{`<model>/<column>`: value} of every finite number in a results table (what studies optimise)."""
    out: dict[str, float] = {}
    for _, row in table.iterrows():
        for col in table.columns:
            if col in ("model", "method"):
                continue
            if isinstance(row[col], (int, float)) and not math.isnan(row[col]):
                out[f"{row['model']}/{col}"] = float(row[col])
    return out


def uncertainty_tables(long: pd.DataFrame, items: pd.DataFrame, docs: pd.DataFrame, results: pd.DataFrame, *,
                       seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(intervals, comparisons) of a results table: every score's bootstrap interval (`harness.stats.
    score_intervals`) and every model's paired tests against the target and against CLM-only
    (`harness.stats.paired_comparisons`), seeded with the evaluation seed."""
    from harness.stats import paired_comparisons, score_intervals

    models = list(results["model"]) if len(results) else []
    refs = {}
    for label in ("target", "CLM-only"):
        hit = results.loc[results["method"] == label, "model"] if len(results) else []
        if len(hit):
            refs[label] = str(hit.iloc[0])
    if not len(long):
        return score_intervals(long, items, docs, []), paired_comparisons(long, items, docs, [], {})
    return (score_intervals(long, items, docs, models, seed=seed),
            paired_comparisons(long, items, docs, models, refs, seed=seed))


def result_files(folder: Path) -> list[Path]:
    """The files `ExperimentResult.save` writes, as they are in `folder`."""
    names = [f"{t}.csv" for t in TABLES] + ["losses.json", "timings.json"]
    return [Path(folder) / n for n in names if (Path(folder) / n).is_file()]


def _empty_times() -> pd.DataFrame:
    return pd.DataFrame(columns=["stage", "seconds", "cached"])


def _empty_diagnostics() -> pd.DataFrame:
    return pd.DataFrame(columns=DIAGNOSTICS_COLUMNS)


@dataclass
class ExperimentResult:
    """An experiment's results: what the report is made from, in memory, on disk (`save`/`load`) and in MLflow.
    config: the ExperimentConfig (None when read back from files); results: the table; eval_long: the long
    format; metrics: metrics_of(results); losses: training curves; stage_timings: seconds of the stages built in
    this run (and "total"); run_dir: where `save` wrote it."""

    config: Any
    results: pd.DataFrame
    eval_long: pd.DataFrame
    metrics: dict[str, float]
    losses: dict[str, list[tuple[int, float]]]
    stage_timings: dict[str, float]
    run_dir: Path
    cache_hits: int = 0
    stages_run: int = 0
    stage_times: pd.DataFrame = field(default_factory=_empty_times)
    intervals: pd.DataFrame = field(default_factory=pd.DataFrame)
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)
    diagnostics: pd.DataFrame = field(default_factory=_empty_diagnostics)  # fusion diagnostics, long form

    def save(self, folder: Path) -> list[Path]:
        """Write every table (TABLES, as CSV), losses.json and timings.json into `folder`; -> the files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            getattr(self, name).to_csv(folder / f"{name}.csv", index=False)
        (folder / "losses.json").write_text(json.dumps({k: [list(p) for p in v] for k, v in self.losses.items()}))
        (folder / "timings.json").write_text(json.dumps(self.stage_timings, indent=2))
        return result_files(folder)

    @classmethod
    def load(cls, folder: Path) -> "ExperimentResult":
        """Read back what `save` wrote (a missing optional file reads as empty); config is None."""
        folder = Path(folder)
        if not (folder / "results.csv").is_file():
            raise FileNotFoundError(f"{folder}: no results.csv (not the results folder of an experiment run)")

        def csv(name: str) -> pd.DataFrame:
            p = folder / f"{name}.csv"
            return pd.read_csv(p) if p.is_file() and p.stat().st_size > 1 else pd.DataFrame()

        def js(name: str) -> dict:
            p = folder / name
            return json.loads(p.read_text()) if p.is_file() else {}

        losses = {k: [(int(s), float(v)) for s, v in pts] for k, pts in js("losses.json").items()}
        tables = {name: csv(name) for name in TABLES}
        diagnostics = tables["diagnostics"] if len(tables["diagnostics"].columns) else _empty_diagnostics()
        return cls(None, tables["results"], tables["eval_long"], metrics_of(tables["results"]), losses,
                   js("timings.json"), folder, stage_times=tables["stage_times"] if len(tables["stage_times"])
                   else _empty_times(), intervals=tables["intervals"], comparisons=tables["comparisons"],
                   diagnostics=diagnostics)
