"""Paper-style tables and plots for one experiment or one ablation study; `fuselab report` (`report_main`).

Tables are pandas DataFrames (CSV + markdown on disk, artifacts in MLflow); plots are PNG (matplotlib Agg).
Scores: suite averages are fractions in [0, 1] (each task's primary metric, averaged over the suite's tasks:
`harness.evaluation.suites.primary_scores`);
`bpb_<domain>` are bits per byte on held-out text (lower is better). Relative gains are percentages:
for scores `(x - ref) / ref * 100`, for bits per byte the reduction `(ref - x) / ref * 100`, so a
positive gain is always an improvement.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from harness.tracking import ATTR_ERROR, ATTR_OBJECTIVE, ATTR_RUNS, ATTR_SEARCH_SPACE, ATTR_SETTING

METHOD_ORDER = ("source", "target", "CLM-only", "FuseLLM", "ensemble", "merge", "domain expert")
SEED_PARAM = "seed"  # the study param that holds a grid trial's seed (studies.spec.SEED_PARAM)
TARGET_METHOD = "target"
CLM_METHOD = "CLM-only"


# --------------------------------------------------------------------------------------------- data
@dataclass
class ExperimentData:
    """What an experiment report needs; built from an `ExperimentResult` or read back from MLflow."""

    name: str
    results: pd.DataFrame  # one row per model: model, method, suite averages, bpb_<domain>, bpb_avg
    eval_long: pd.DataFrame = field(default_factory=pd.DataFrame)  # model, suite, task, metric, value, stderr
    losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # method -> [(step, loss)]
    stage_times: pd.DataFrame = field(default_factory=pd.DataFrame)  # stage, seconds (build time), cached
    intervals: pd.DataFrame = field(default_factory=pd.DataFrame)  # harness.stats.INTERVAL_COLUMNS
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)  # harness.stats.COMPARISON_COLUMNS


def _as_data(obj: Any) -> ExperimentData:
    if isinstance(obj, ExperimentData):
        return obj
    if hasattr(obj, "results") and hasattr(obj, "config"):  # harness.pipeline.ExperimentResult
        return ExperimentData(obj.config.name, obj.results, obj.eval_long, dict(obj.losses),
                              getattr(obj, "stage_times", pd.DataFrame()),
                              getattr(obj, "intervals", pd.DataFrame()), getattr(obj, "comparisons", pd.DataFrame()))
    if isinstance(obj, pd.DataFrame):
        if "run_id" in obj.columns:
            return ExperimentData("runs", results_from_runs(obj))
        return ExperimentData("results", obj)
    raise TypeError(f"experiment_table: expected an ExperimentResult, a results DataFrame or an MLflow runs "
                    f"DataFrame (mlflow.search_runs), got {type(obj).__name__}")


def results_from_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The results table from the pipeline's per-model MLflow runs (`mlflow.search_runs` rows tagged
    `fuselab.model` / `fuselab.method`): columns = metrics without a `/` (suite averages, bpb)."""
    if "tags.fuselab.model" not in runs.columns:
        raise ValueError("results_from_runs: no run has a fuselab.model tag (pass the per-model runs of an "
                         "experiment, i.e. the children of its run)")
    rows = runs[runs["tags.fuselab.model"].notna()]
    if "start_time" in rows.columns:  # the pipeline logs models in table order; search_runs returns newest first
        rows = rows.sort_values("start_time", kind="stable")
    # Per-model runs also hold the training-loss history (`train_loss`); the table takes the scores only.
    metric_cols = [c for c in rows.columns if c.startswith("metrics.") and "/" not in c[len("metrics."):]
                   and not c.endswith("loss")]
    out = pd.DataFrame({"model": rows["tags.fuselab.model"].values, "method": rows["tags.fuselab.method"].values})
    for c in metric_cols:
        out[c[len("metrics."):]] = rows[c].values
    out = out.dropna(axis=1, how="all")
    out = _order_rows(out)
    score = [c for c in out.columns[2:] if not c.startswith("bpb_")]
    bpb = sorted(c for c in out.columns[2:] if c.startswith("bpb_") and c != "bpb_avg")
    return out[["model", "method", *score, *bpb, *(["bpb_avg"] if "bpb_avg" in out.columns else [])]]


def _method_rank(method: str) -> int:
    for i, m in enumerate(METHOD_ORDER):
        if str(method).lower().startswith(m.lower()):
            return i
    return len(METHOD_ORDER)


def _order_rows(df: pd.DataFrame) -> pd.DataFrame:
    # Paper order: sources, target, CLM-only, FuseLLM, ensemble, merges; stable within a group.
    key = df["method"].map(_method_rank)
    return df.assign(_k=key).sort_values("_k", kind="stable").drop(columns="_k").reset_index(drop=True)


# ------------------------------------------------------------------------------------------- tables
def score_columns(results: pd.DataFrame) -> list[str]:
    return [c for c in results.columns if c not in ("model", "method") and not c.startswith("bpb_")
            and pd.api.types.is_numeric_dtype(results[c])]


def bpb_columns(results: pd.DataFrame) -> list[str]:
    return [c for c in results.columns if c.startswith("bpb_")]


def per_task_scores(eval_long: pd.DataFrame) -> pd.DataFrame:
    """model x `suite/task`: each task's primary metric (`harness.evaluation.suites.primary_scores`: the first
    metric of the task's metric list under its first declared filter), every task of every suite, group
    aggregates left out (the suite averages are in the results table)."""
    from harness.evaluation.suites import primary_scores

    rows: dict[str, dict[str, float]] = {}
    for r in primary_scores(eval_long).itertuples():
        rows.setdefault(r.model, {})[f"{r.suite}/{r.task}"] = float(r.value)
    return pd.DataFrame.from_dict(rows, orient="index")


def suite_stderr(eval_long: pd.DataFrame) -> pd.DataFrame:
    """model x suite: standard error of the suite average, sqrt(sum se_task^2) / n_tasks (tasks independent),
    from lm-eval's stderr of each task's primary metric (a task without one counts 0); tasks without a value
    are left out, as in the suite average."""
    from harness.evaluation.suites import primary_scores

    if eval_long is None or not len(eval_long) or "stderr" not in eval_long.columns:
        return pd.DataFrame()
    out: dict[str, dict[str, float]] = {}
    primary = primary_scores(eval_long)
    primary = primary[pd.to_numeric(primary["value"], errors="coerce").notna()]
    for (model, suite), g in primary.groupby(["model", "suite"], sort=False):
        ses = [0.0 if pd.isna(se) else float(se) for se in pd.to_numeric(g["stderr"], errors="coerce")]
        out.setdefault(model, {})[suite] = math.sqrt(sum(s * s for s in ses)) / len(ses)
    return pd.DataFrame.from_dict(out, orient="index")


MARK_VS_TARGET = "*"   # differs from the target: paired test p < 0.05
MARK_VS_CLM = "†"      # differs from CLM-only: paired test p < 0.05
SIGNIFICANCE = 0.05


def _num(x: float, digits: int = 4) -> str:
    return "" if x is None or pd.isna(x) else f"{x:.{digits}g}"


def uncertainty_table(result_or_data: Any) -> pd.DataFrame:
    """The results table as text cells: index = model, columns `method`, then per score column
    `<col> (n=<units>)` with `value [lo, hi]` (95% bootstrap interval over items / documents) followed by
    `MARK_VS_TARGET` / `MARK_VS_CLM` when the paired test against the target / CLM-only gives p < 0.05, and
    per suite `<suite> lm-eval se` (lm-eval's stderr of the suite average). Values without an interval (no
    per-unit scores) are shown alone; missing values are empty."""
    data = _as_data(result_or_data)
    res = _order_rows(data.results.copy())
    iv = data.intervals.set_index(["model", "score"]) if len(data.intervals) else None
    cmp = data.comparisons
    scores = [c for c in res.columns if c not in ("model", "method") and pd.api.types.is_numeric_dtype(res[c])]
    out = pd.DataFrame({"method": res["method"].values}, index=pd.Index(res["model"].values, name="model"))
    for col in scores:
        cells, units, se = [], 0, []
        for model, value in zip(res["model"], res[col]):
            cell = _num(value)
            row = iv.loc[(model, col)] if iv is not None and (model, col) in iv.index else None
            if cell and row is not None and not pd.isna(row["lo"]):
                cell += f" [{_num(row['lo'], 3)}, {_num(row['hi'], 3)}]"
                units = max(units, int(row["n"]))
            if cell and len(cmp):
                mine = cmp[(cmp["model"] == model) & (cmp["score"] == col)]
                for ref, mark in (("target", MARK_VS_TARGET), ("CLM-only", MARK_VS_CLM)):
                    p = mine.loc[mine["reference"] == ref, "p_value"]
                    if len(p) and p.iloc[0] < SIGNIFICANCE:
                        cell += mark
            cells.append(cell)
            se.append(_num(row["lmeval_stderr"], 3) if row is not None and "lmeval_stderr" in row.index else "")
        out[f"{col} (n={units})" if units else col] = cells
        if any(se):
            out[f"{col} lm-eval se"] = se
    return out


def comparison_table(result_or_data: Any) -> pd.DataFrame:
    """Paired tests as text: index (model, vs), one column per score: `difference [lo, hi] p=<p><mark>`
    (difference = model - reference; for bits per byte negative is better; marks: * p < 0.05, ** p < 0.01,
    *** p < 0.001, two-sided, no correction for multiple tests)."""
    data = _as_data(result_or_data)
    cmp = data.comparisons
    if not len(cmp):
        return pd.DataFrame()
    order = {m: i for i, m in enumerate(_order_rows(data.results.copy())["model"])}
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for r in cmp.itertuples():
        mark = r.mark if isinstance(r.mark, str) else ""
        rows.setdefault((r.model, f"{r.reference} ({r.reference_model})"), {})[r.score] = \
            f"{r.difference:+.3g} [{r.lo:+.3g}, {r.hi:+.3g}] p={r.p_value:.2g}{mark}"
    keys = sorted(rows, key=lambda k: (order.get(k[0], len(order)), not k[1].startswith("target")))
    out = pd.DataFrame([rows[k] for k in keys], index=pd.MultiIndex.from_tuples(keys, names=["model", "vs"]))
    return out.fillna("")


def _gain(x: float, ref: float, lower_is_better: bool) -> float:
    if ref is None or pd.isna(ref) or pd.isna(x) or ref == 0:
        return float("nan")
    return ((ref - x) if lower_is_better else (x - ref)) / abs(ref) * 100.0


def experiment_table(result_or_runs: Any, *, per_task: bool = False, gains: bool = True) -> pd.DataFrame:
    """The paper's main table: index = model; columns `method`, suite averages (accuracy, 0-1),
    optional per-task scores (`suite/task`), `bpb_<domain>` and `bpb_avg` (bits per byte), then relative
    gains in % over the target (`<col> vs target (%)`) and over CLM-only (`<col> vs CLM-only (%)`) for
    every suite average and `bpb_avg`. Rows: sources, target, CLM-only, FuseLLM, ensemble, merges.

    `result_or_runs`: an `ExperimentResult`, its `results` DataFrame, or the `mlflow.search_runs` rows of
    the pipeline's per-model runs."""
    data = _as_data(result_or_runs)
    res = _order_rows(data.results.copy())
    table = res.set_index("model")
    scores, bpbs = score_columns(res), bpb_columns(res)
    cols = ["method", *scores]
    if per_task:
        tasks = per_task_scores(data.eval_long)
        if len(tasks):
            table = table.join(tasks, how="left")
            cols += list(tasks.columns)
    cols += bpbs
    out = table[cols].copy()
    if gains:
        gain_cols = scores + (["bpb_avg"] if "bpb_avg" in bpbs else [])
        for ref_method, label in ((TARGET_METHOD, "target"), (CLM_METHOD, "CLM-only")):
            ref_rows = out[out["method"] == ref_method]
            if not len(ref_rows):
                continue
            ref = ref_rows.iloc[0]
            for c in gain_cols:
                out[f"{c} vs {label} (%)"] = [_gain(x, ref[c], c.startswith("bpb_")) for x in out[c]]
    out.index.name = "model"
    return out


def study_runs(study) -> pd.DataFrame:
    """One row per (trial, seed) of an Optuna study's complete trials: `trial`, the setting's params,
    `seed`, and every metric the run reported. A point re-run after a dead worker counts once (latest)."""
    from optuna.trial import TrialState

    names = study.user_attrs.get(ATTR_SEARCH_SPACE)
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        params = {k: v for k, v in t.params.items() if k != SEED_PARAM}
        runs = t.user_attrs.get(ATTR_RUNS) or [{"seed": t.params.get(SEED_PARAM), "metrics": {"objective": t.value}}]
        for r in runs:
            rows.append({"trial": t.number, **params, "seed": r["seed"], **r["metrics"]})
    df = pd.DataFrame(rows)
    if not len(df):
        return df
    param_cols = names or [c for c in df.columns if c not in ("trial", "seed") and not _is_metric(c)]
    df = df.sort_values("trial").drop_duplicates(subset=[*param_cols, "seed"], keep="last")
    return df.reset_index(drop=True)


def _is_metric(name: str) -> bool:
    return "/" in name or name == "objective"


def _seed_stats(row: dict, metric: str, vals: pd.Series) -> None:
    from harness.stats import seed_interval

    vals = vals.astype(float)
    iv = seed_interval(list(vals))
    row[f"{metric} mean"] = float(vals.mean())
    row[f"{metric} std"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
    row[f"{metric} lo"], row[f"{metric} hi"] = iv.lo, iv.hi


def _ablation_metrics(study, df: pd.DataFrame, params: list[str], metrics: Iterable[str] | None) -> list[str]:
    objective = (study.user_attrs.get(ATTR_OBJECTIVE) or {}).get("metric")
    shared = [c for c in df.columns if c not in ("trial", "seed", *params) and df[c].notna().all()]
    if metrics is None:
        metrics = [c for c in shared if c.startswith("fusellm/")]
    return list(dict.fromkeys([m for m in [objective, *metrics] if m and m in df.columns]))


def ablation_table(study, metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN for one seed) and 95% Student-t interval (`harness.stats.seed_interval`;
    NaN for one seed) over seeds per setting.

    Rows: settings in the order the study first ran them; columns: the searched params, `n_seeds`, and
    `<metric> mean` / `<metric> std` / `<metric> lo` / `<metric> hi` for the objective metric first, then the
    other `metrics` (default: every `fusellm/*` metric all runs share)."""
    df = study_runs(study)
    if not len(df):
        raise ValueError(f"study {study.study_name!r} has no complete trial yet; nothing to tabulate")
    params = study.user_attrs.get(ATTR_SEARCH_SPACE) or [
        c for c in df.columns if c not in ("trial", "seed") and not _is_metric(c)]
    metrics = _ablation_metrics(study, df, params, metrics)
    rows = []
    for key, g in df.groupby(params, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(params, key))
        row["n_seeds"] = int(g["seed"].nunique())
        for m in metrics:
            _seed_stats(row, m, g[m])
        rows.append(row)
    return pd.DataFrame(rows)


BASELINE_METHODS = (TARGET_METHOD, CLM_METHOD)


def ablation_baselines(study, metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """The target and CLM-only over the same seeds as the ablation: for every `fusellm/<x>` metric of
    `ablation_table` the same statistics of `<model>/<x>`, where <model> is the run's target / CLM-only model
    (the `methods` each trial run recorded; the baselines do not depend on the fusion settings, so each seed
    counts once). Rows: `method` ("target", "CLM-only"), `model`, `n_seeds`, `<fusellm metric> mean/std/lo/hi`.
    Empty when the runs did not record their methods (studies run before they were kept)."""
    from optuna.trial import TrialState

    df = study_runs(study)
    if not len(df):
        return pd.DataFrame()
    params = study.user_attrs.get(ATTR_SEARCH_SPACE) or [
        c for c in df.columns if c not in ("trial", "seed") and not _is_metric(c)]
    metrics = [m for m in _ablation_metrics(study, df, params, metrics) if m.startswith("fusellm/")]
    per_seed: dict[str, dict[int, dict]] = {}  # method -> seed -> (model, metrics)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        for r in t.user_attrs.get(ATTR_RUNS) or []:
            for model, method in (r.get("methods") or {}).items():
                if method in BASELINE_METHODS:
                    per_seed.setdefault(method, {}).setdefault(r["seed"], {"model": model, **r["metrics"]})
    rows = []
    for method in BASELINE_METHODS:
        seeds = per_seed.get(method)
        if not seeds:
            continue
        runs = pd.DataFrame(list(seeds.values()))
        model = str(runs["model"].iloc[0])
        row: dict[str, Any] = {"method": method, "model": model, "n_seeds": len(seeds)}
        for m in metrics:
            key = f"{model}/{m[len('fusellm/'):]}"
            if key in runs.columns:
                _seed_stats(row, m, runs[key])
        rows.append(row)
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_methods(table: pd.DataFrame, out: Path, stderr: pd.DataFrame | None = None) -> Path:
    """Bars per model for each suite average (error bars: suite stderr) and for bpb_avg."""
    plt = _plt()
    scores = [c for c in table.columns if c != "method" and "(%)" not in c and "/" not in c
              and not c.startswith("bpb_")]
    panels = scores + (["bpb_avg"] if "bpb_avg" in table.columns else [])
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 4), squeeze=False)
    for ax, col in zip(axes[0], panels):
        vals = table[col].astype(float)
        err = None
        if stderr is not None and col in getattr(stderr, "columns", []):
            err = [float(stderr.loc[m, col]) if m in stderr.index else 0.0 for m in table.index]
        colors = [f"C{_method_rank(m)}" for m in table["method"]]
        ax.bar(range(len(vals)), vals.fillna(0).values, yerr=err, capsize=3, color=colors)
        ax.set_xticks(range(len(vals)), [str(m) for m in table.index], rotation=45, ha="right", fontsize=8)
        ax.set_title(col + (" (bits/byte, lower is better)" if col.startswith("bpb") else " (accuracy)"), fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_losses(losses: dict[str, list[tuple[int, float]]], out: Path) -> Path:
    """Training loss (nats/token) per optimizer step, one line per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in losses.items():
        if pts:
            steps, vals = zip(*pts)
            ax.plot(steps, vals, marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, out)


def plot_ablation_heatmap(ablation: pd.DataFrame, params: list[str], metric: str, out: Path) -> Path:
    """Mean `metric` over seeds on a grid of the first two params (one row for a single param); other
    params are averaged. Cells show mean +- std."""
    plt = _plt()
    mean_col, std_col = f"{metric} mean", f"{metric} std"
    rows_p = params[0]
    cols_p = params[1] if len(params) > 1 else None
    df = ablation.copy()
    df[rows_p] = df[rows_p].astype(str)
    if cols_p is None:
        df["_"] = metric
        cols_p = "_"
    df[cols_p] = df[cols_p].astype(str)
    mean = df.pivot_table(index=rows_p, columns=cols_p, values=mean_col, aggfunc="mean", sort=False)
    std = df.pivot_table(index=rows_p, columns=cols_p, values=std_col, aggfunc="mean", sort=False, dropna=False)
    fig, ax = plt.subplots(figsize=(1.8 * mean.shape[1] + 2.5, 0.9 * mean.shape[0] + 1.8))
    im = ax.imshow(mean.values.astype(float), cmap="viridis", aspect="auto")
    for i in range(mean.shape[0]):
        for j in range(mean.shape[1]):
            m = mean.values[i, j]
            s = std.reindex(index=mean.index, columns=mean.columns).values[i, j]
            text = f"{m:.4g}" + ("" if pd.isna(s) else f"\n± {s:.2g}")
            ax.text(j, i, text, ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(mean.shape[1]), list(mean.columns), fontsize=8)
    ax.set_yticks(range(mean.shape[0]), list(mean.index), fontsize=8)
    ax.set_xlabel("" if cols_p == "_" else cols_p)
    ax.set_ylabel(rows_p)
    ax.set_title(f"{metric} (mean ± std over seeds)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, out)


def plot_ablation_bars(ablation: pd.DataFrame, params: list[str], metric: str, out: Path,
                       baselines: pd.DataFrame | None = None) -> Path:
    """One bar per setting: mean `metric` over seeds with its 95% interval over seeds as error bars (none with
    one seed); `baselines` (`ablation_baselines`): the target and CLM-only as horizontal lines with their
    interval as a band, on the same axes."""
    plt = _plt()
    labels = [", ".join(str(r[p]) for p in params) for _, r in ablation.iterrows()]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels)), 4))
    mean = ablation[f"{metric} mean"].astype(float)
    if f"{metric} lo" in ablation.columns and ablation[f"{metric} lo"].notna().any():
        err = [(mean - ablation[f"{metric} lo"]).fillna(0).clip(lower=0).values,
               (ablation[f"{metric} hi"] - mean).fillna(0).clip(lower=0).values]
    else:
        err = ablation[f"{metric} std"].fillna(0).values
    ax.bar(range(len(labels)), mean, yerr=err, capsize=4, color="C3", label="FuseLLM (setting)")
    if baselines is not None and len(baselines) and f"{metric} mean" in baselines.columns:
        for _, row in baselines.iterrows():
            color = "C1" if row["method"] == TARGET_METHOD else "C2"
            ax.axhline(row[f"{metric} mean"], color=color, linestyle="--",
                       label=f"{row['method']} ({row['model']})")
            if not pd.isna(row.get(f"{metric} lo")):
                ax.axhspan(row[f"{metric} lo"], row[f"{metric} hi"], color=color, alpha=0.15)
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(" x ".join(params), fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def param_importances(study) -> dict[str, float]:
    """Optuna's fANOVA importances over complete trials (sums to 1); {} when they cannot be computed
    (fewer than two complete trials, or no param varies)."""
    import optuna

    try:
        return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError):
        return {}


def plot_importances(importances: dict[str, float], out: Path) -> Path:
    plt = _plt()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA, fraction of objective variance)")
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    _plt().close(fig)
    return out


# ------------------------------------------------------------------------------------------ reports
def _fmt(df: pd.DataFrame, digits: int = 4) -> str:
    return df.to_markdown(floatfmt=f".{digits}g") + "\n"


def _fmt_ablation(ab: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """mean [lo, hi] over seeds per cell (the mean alone for one seed)."""
    out = ab[[*params, "n_seeds"]].copy()
    for c in ab.columns:
        if c.endswith(" mean"):
            m = c[: -len(" mean")]
            lo = ab[f"{m} lo"] if f"{m} lo" in ab.columns else pd.Series(float("nan"), index=ab.index)
            hi = ab[f"{m} hi"] if f"{m} hi" in ab.columns else pd.Series(float("nan"), index=ab.index)
            out[m] = [_num(a) + ("" if pd.isna(l) else f" [{_num(l, 3)}, {_num(h, 3)}]")
                      for a, l, h in zip(ab[c], lo, hi)]
    return out


def write_report(out_dir: Path, result: Any = None, *, study=None, tracker=None, run_id: str | None = None,
                 title: str | None = None, per_task: bool = True) -> Path:
    """Write `report.md` + tables (CSV) + plots (PNG) into `out_dir` for an experiment (`result`:
    ExperimentResult / ExperimentData) and/or a study; with `tracker` the folder is logged to MLflow as
    artifacts under `report/` of `run_id` (default: the tracker's open run). Returns the markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md: list[str] = []
    if result is not None:
        data = _as_data(result)
        md.append(f"# {title or data.name}\n")
        table = experiment_table(data, per_task=False)
        table.to_csv(out_dir / "results.csv")
        score_cols = [c for c in table.columns if "(%)" not in c]
        gain_cols = ["method", *[c for c in table.columns if "(%)" in c]]
        md += ["## Results\n", "Suite averages are fractions (0-1): each task's primary metric averaged over the "
               "suite's tasks; bpb = bits per byte on held-out text (lower is better).\n"]
        if len(data.intervals):
            shown = uncertainty_table(data)
            shown.to_csv(out_dir / "results_ci.csv")
            md += [f"Each score with its 95% bootstrap interval [lo, hi] (seeded; over items for suites, over held-out "
                   f"documents for bpb; n = items or documents). {MARK_VS_TARGET}: differs from the target, "
                   f"{MARK_VS_CLM}: differs from CLM-only (paired sign-flip test on the same items / documents, "
                   f"p < {SIGNIFICANCE}). `lm-eval se`: lm-eval's own standard error of the suite average.\n",
                   shown.to_markdown() + "\n"]
        else:
            md.append(_fmt(table[score_cols]))
        if len(gain_cols) > 1:
            md += ["## Relative gain (%)\n", "Positive = better (for bpb: the reduction).\n", _fmt(table[gain_cols], 3)]
        if len(data.comparisons):
            data.comparisons.to_csv(out_dir / "comparisons.csv", index=False)
            data.intervals.to_csv(out_dir / "intervals.csv", index=False)
            md += ["## Paired tests\n", "Each model minus the reference on the same items / documents: difference "
                   "[95% paired-bootstrap interval], two-sided sign-flip p-value (exact when at most 16 units "
                   "differ), * p < 0.05, ** p < 0.01, *** p < 0.001, no correction for multiple tests. For bpb a "
                   "negative difference is an improvement.\n", comparison_table(data).to_markdown() + "\n"]
        if per_task and len(data.eval_long):
            tasks = per_task_scores(data.eval_long)
            if len(tasks):
                tasks.index.name = "model"
                tasks.to_csv(out_dir / "per_task.csv")
                # one row per task (suite/task), one column per model: dozens of tasks stay readable
                shown = tasks.T
                shown.index.name = "task"
                md += ["## Per task\n", _fmt(shown)]
        plot_methods(table, out_dir / "methods.png", suite_stderr(data.eval_long))
        md.append("![methods](methods.png)\n")
        if any(data.losses.values()):
            plot_losses(data.losses, out_dir / "losses.png")
            md.append("## Training loss\n\n![losses](losses.png)\n")
        if len(data.stage_times):
            md += _stage_times_section(data.stage_times, out_dir)
    if study is not None:
        md += _study_section(study, out_dir, title if result is None else None)
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    if tracker is not None:
        tracker.log_artifact(out_dir, "report", run_id=run_id)
    return path


def _stage_times_section(stage_times: pd.DataFrame, out_dir: Path) -> list[str]:
    times = stage_times[["stage", "seconds", "cached"]].copy()
    times.to_csv(out_dir / "stage_times.csv", index=False)
    total = float(times["seconds"].sum(skipna=True))
    built_here = float(times.loc[~times["cached"].astype(bool), "seconds"].sum())
    note = (f"Build time of every stage (s), also of stages this run found cached (timed when they were built). "
            f"Sum {total:.1f} s; built in this run {built_here:.1f} s.\n")
    shown = times.assign(cached=times["cached"].map(lambda c: "cached" if bool(c) else "built"))
    return ["## Stage times\n", note, shown.to_markdown(index=False, floatfmt=".1f") + "\n"]


def _study_section(study, out_dir: Path, title: str | None) -> list[str]:
    from optuna.trial import TrialState

    md = [f"# {title or 'Study ' + study.study_name}\n"]
    objective = (study.user_attrs.get(ATTR_OBJECTIVE) or {}).get("metric", "objective")
    direction = study.direction.name.lower()
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    md.append(f"Objective: {direction} `{objective}`. Trials: " +
              ", ".join(f"{n.lower()} {c}" for n, c in counts.items() if c) + ".\n")
    runs = study_runs(study)
    if len(runs):
        runs.to_csv(out_dir / "trials.csv", index=False)
        ab = ablation_table(study)
        ab.to_csv(out_dir / "ablation.csv", index=False)
        params = [c for c in (study.user_attrs.get(ATTR_SEARCH_SPACE) or []) if c in ab.columns] or \
                 [c for c in ab.columns if c != "n_seeds" and not c.endswith((" mean", " std", " lo", " hi"))]
        shown = _fmt_ablation(ab, params)
        base = ablation_baselines(study)
        if len(base):
            base.to_csv(out_dir / "ablation_baselines.csv", index=False)
            # the baselines as rows of the same table: their model in the first param column, the fusellm/*
            # metric columns holding the baseline model's same metric
            extra = _fmt_ablation(base.assign(**{params[0]: [f"{m} ({n})" for m, n in zip(base["method"],
                                                                                      base["model"])]},
                                              **{p: "" for p in params[1:]}), params)
            shown = pd.concat([shown, extra[[c for c in shown.columns if c in extra.columns]]], ignore_index=True)
        md += ["## Ablation (mean [95% interval] over seeds)\n",
               "Student-t interval over the seeds of each setting (none with one seed); the target and CLM-only "
               "rows hold the baseline model's value of the same metric (the `fusellm/` columns), over the same "
               "seeds.\n", _fmt(shown.fillna("").set_index(params[0]))]
        if f"{objective} mean" in ab.columns:
            plot_ablation_heatmap(ab, params, objective, out_dir / "ablation_heatmap.png")
            plot_ablation_bars(ab, params, objective, out_dir / "ablation_bars.png", baselines=base)
            md.append("![ablation heatmap](ablation_heatmap.png)\n\n![ablation bars](ablation_bars.png)\n")
        imp = param_importances(study)
        if imp:
            plot_importances(imp, out_dir / "importances.png")
            pd.Series(imp, name="importance").rename_axis("param").to_csv(out_dir / "importances.csv")
            md.append("## Parameter importances\n\n![importances](importances.png)\n")
        else:
            md.append("Parameter importances: not computable (needs >= 2 complete trials with varying params).\n")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        md.append("## Failed trials\n")
        md += [f"- trial {t.number} ({t.user_attrs.get(ATTR_SETTING, '')}): "
               f"{t.user_attrs.get(ATTR_ERROR, 'worker died or was interrupted; re-queued')}" for t in failed]
        md.append("")
    return md


def write_study_report(study, out_dir: Path, *, tracker=None, run_id: str | None = None,
                       objective: str | None = None) -> Path:
    """`write_report` for a study only (the runner logs it to the study's parent run when it completes)."""
    return write_report(out_dir, study=study, tracker=tracker, run_id=run_id)


# ------------------------------------------------------------------------------------------- MLflow
def experiment_from_mlflow(client, run_id: str) -> ExperimentData:
    """Read an experiment run back: the per-model child runs (results), `eval_long.csv` (artifact, for
    per-task scores and error bars) and the `loss/<method>` metric histories."""
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                                  max_results=10000)
    runs_df = _runs_frame(children)
    if not len(runs_df) or "tags.fuselab.model" not in runs_df.columns:
        raise ValueError(f"MLflow run {run_id} ({run.info.run_name}) has no per-model child runs; it is not an "
                         "experiment run of the pipeline (use the run of `fuselab run`, or a study)")
    results = results_from_runs(runs_df)
    eval_long = pd.DataFrame()
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, "eval_long.csv", tmp)
            eval_long = pd.read_csv(local)
    except Exception:  # older runs without the artifact: no per-task columns, no error bars
        pass
    stage_times = pd.DataFrame()
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            stage_times = pd.read_csv(client.download_artifacts(run_id, "stage_times.csv", tmp))
    except Exception:  # runs logged before stage times were kept
        pass
    uncertainty = {}
    for name in ("intervals", "comparisons"):
        try:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                uncertainty[name] = pd.read_csv(client.download_artifacts(run_id, f"{name}.csv", tmp))
        except Exception:  # runs logged before intervals were computed: the report shows bare values
            uncertainty[name] = pd.DataFrame()
    losses = {}
    for key in run.data.metrics:
        # `loss/<method>` (Tracker.log_result and the pipeline); `<method>/train_loss` from older runs
        method = key[len("loss/"):] if key.startswith("loss/") else key[: -len("/train_loss")] \
            if key.endswith("/train_loss") else None
        if method:
            hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            losses[method] = [(m.step, m.value) for m in hist]
    return ExperimentData(run.info.run_name or run_id, results, eval_long, losses, stage_times,
                          uncertainty["intervals"], uncertainty["comparisons"])


def _runs_frame(runs) -> pd.DataFrame:
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "status": r.info.status, "start_time": r.info.start_time}
        row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
        row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def report_main(target: str, workdir: Path, out: Path | None = None, *, tracking_uri: str | None = None,
                storage: str | None = None) -> Path:
    """`fuselab report TARGET`: TARGET is an MLflow run id (experiment or study run), an MLflow experiment
    name (its latest top-level run), a study spec path (`studies/x.yaml`) or a study name in the work
    dir's Optuna storage. Writes `report.md`, CSVs and PNGs to `out` (default `<workdir>/reports/<name>`),
    logs them to the run, prints and returns the markdown path."""
    import optuna
    from mlflow.tracking import MlflowClient

    from harness.tracking import TAG_ROLE, TAG_STUDY, Tracker, default_tracking_uri

    workdir = Path(workdir).expanduser().resolve()
    uri = tracking_uri or default_tracking_uri(workdir)
    client = MlflowClient(uri)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    default_storage = storage or f"sqlite:///{workdir / 'optuna.db'}"

    def study_report(name: str, url: str, run_id: str | None, experiment: str | None) -> Path:
        study = optuna.load_study(study_name=name, storage=url)
        dest = Path(out) if out else workdir / "reports" / name
        tracker = Tracker(uri, experiment, workdir) if experiment else None
        path = write_report(dest, study=study, tracker=tracker if run_id else None, run_id=run_id)
        print(path)
        return path

    # 1. a study spec file
    if str(target).endswith((".yaml", ".yml")) and Path(target).is_file():
        from studies.spec import load_spec

        spec = load_spec(target, check=False)
        url = storage or spec.storage or default_storage
        tracker = Tracker(uri, spec.experiment_name(), workdir)
        parents = tracker.find_runs({TAG_ROLE: "study", TAG_STUDY: spec.study_name})
        return study_report(spec.study_name, url, parents[0].info.run_id if parents else None, spec.experiment_name())
    # 2. an MLflow run id
    if _RUN_ID.match(str(target)):
        try:
            run = client.get_run(target)
        except Exception:
            run = None
        if run is not None:
            exp_name = client.get_experiment(run.info.experiment_id).name
            tags = run.data.tags
            if tags.get(TAG_ROLE) == "study":
                return study_report(tags[TAG_STUDY], tags.get("fuselab.storage", default_storage), target, exp_name)
            return _experiment_report(client, uri, workdir, exp_name, run, out)
    # 3. an MLflow experiment name
    exp = client.get_experiment_by_name(str(target))
    if exp is not None:
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`fuselab.kind` = 'experiment'",
                                  order_by=["attributes.start_time DESC"], max_results=50)
        runs = [r for r in runs if r.info.status == "FINISHED"]
        if runs:
            return _experiment_report(client, uri, workdir, exp.name, runs[0], out)
        studies = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'study'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if studies:
            t = studies[0].data.tags
            return study_report(t[TAG_STUDY], t.get("fuselab.storage", default_storage), studies[0].info.run_id,
                                exp.name)
        raise ValueError(f"MLflow experiment {target!r} in {uri} has no finished experiment run and no study run")
    # 4. a study name in the default storage
    if sqlite_exists(default_storage):
        names = [s.study_name for s in optuna.get_all_study_summaries(default_storage, include_best_trial=False)]
        if str(target) in names:
            return study_report(str(target), default_storage, None, None)
    raise ValueError(f"fuselab report {target!r}: not a study spec file, not a run id in {uri}, not an MLflow "
                     f"experiment name, not a study in {default_storage}; list runs with `fuselab ui` or pass "
                     "--workdir of the run")


def sqlite_exists(url: str) -> bool:
    return not url.startswith("sqlite:///") or Path(url[len("sqlite:///"):]).is_file()


def _experiment_report(client, uri: str, workdir: Path, exp_name: str, run, out: Path | None) -> Path:
    from harness.tracking import Tracker

    data = experiment_from_mlflow(client, run.info.run_id)
    dest = Path(out) if out else workdir / "reports" / f"{data.name}-{run.info.run_id[:8]}"
    tracker = Tracker(uri, exp_name, workdir)
    path = write_report(dest, data, tracker=tracker, run_id=run.info.run_id)
    print(path)
    return path


def to_json(table: pd.DataFrame) -> str:
    """A table as JSON records (NaN -> null), e.g. for a CI summary."""
    return json.dumps(json.loads(table.reset_index().to_json(orient="records")), indent=1)
