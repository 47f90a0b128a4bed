"""Paper-style tables and plots for one experiment; study reports build on these in `studies.report`, which
also holds `fuselab report` (`report_main`).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.figures import plot_losses, plot_methods


METHOD_ORDER = ("source", "target", "CLM-only", "FuseLLM", "ensemble", "merge", "domain expert")
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
    diagnostics: pd.DataFrame = field(default_factory=pd.DataFrame)  # source, domain, figure, value, n


def _as_data(obj: Any) -> ExperimentData:
    if isinstance(obj, ExperimentData):
        return obj
    if hasattr(obj, "results") and hasattr(obj, "config"):  # harness.results.ExperimentResult
        name = obj.config.name if obj.config is not None else Path(obj.run_dir).name
        return ExperimentData(name, obj.results, obj.eval_long, dict(obj.losses),
                              getattr(obj, "stage_times", pd.DataFrame()),
                              getattr(obj, "intervals", pd.DataFrame()), getattr(obj, "comparisons", pd.DataFrame()),
                              getattr(obj, "diagnostics", pd.DataFrame()))
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
    score = [c for c in out.columns[2:] if not c.startswith("bpb_")]
    bpb = sorted(c for c in out.columns[2:] if c.startswith("bpb_") and c != "bpb_avg")
    return out[["model", "method", *score, *bpb, *(["bpb_avg"] if "bpb_avg" in out.columns else [])]]


def _method_rank(method: str) -> int:
    for i, m in enumerate(METHOD_ORDER):
        if str(method).lower().startswith(m.lower()):
            return i
    return len(METHOD_ORDER)


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
    res = data.results.copy()  # in contestant order (harness.contestants)
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
    order = {m: i for i, m in enumerate(data.results["model"])}
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
    res = data.results.copy()  # in contestant order (harness.contestants)
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


# ------------------------------------------------------------------------------------------ reports
def _fmt(df: pd.DataFrame, digits: int = 4) -> str:
    return df.to_markdown(floatfmt=f".{digits}g") + "\n"


def bpb_windows_line(eval_long: pd.DataFrame) -> list[str]:
    """The line under the results table naming the windows its bits per byte were scored with: the long format's
    `windows` column (fusion.windows.describe_windows); results made before that column had FuseLab's strided
    windows. [] when there is no bits per byte."""
    if not len(eval_long) or "suite" not in eval_long.columns:
        return []
    bpb = eval_long[(eval_long["suite"] == "perplexity") & (eval_long["metric"] == "bits_per_byte")]
    if not len(bpb):
        return []
    labels = list(dict.fromkeys(bpb["windows"].dropna())) if "windows" in bpb.columns else []
    said = "; ".join(labels) if labels else "FuseLab strided windows (window and stride not recorded)"
    return [f"Bits per byte scored with {said}.\n"]


def write_report(out_dir: Path, result: Any = None, *, tracker=None, run_id: str | None = None,
                 title: str | None = None, per_task: bool = True, sections: list[str] = ()) -> Path:
    """Write `report.md` + tables (CSV) + plots (PNG) into `out_dir` for an experiment (`result`:
    ExperimentResult / ExperimentData), followed by `sections` (markdown lines, e.g. a study's: studies.report);
    with `tracker` the folder is logged to MLflow as artifacts under `report/` of `run_id` (default: the tracker's
    open run). Returns the markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = _experiment_sections(_as_data(result), out_dir, title, per_task) if result is not None else []
    md += list(sections)
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    if tracker is not None:
        tracker.log_artifact(out_dir, "report", run_id=run_id)
    return path


def _experiment_sections(data: ExperimentData, out_dir: Path, title: str | None, per_task: bool) -> list[str]:
    """The markdown of one experiment's report (tables written beside it): results with intervals, gains, paired
    tests, per task, plots, fusion diagnostics, stage times."""
    md = [f"# {title or data.name}\n"]
    table = experiment_table(data, per_task=False)
    table.to_csv(out_dir / "results.csv")
    md += _results_section(data, table, out_dir)
    gain_cols = ["method", *[c for c in table.columns if "(%)" in c]]
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
        md += _per_task_section(data.eval_long, out_dir)
    plot_methods(table, out_dir / "methods.png", suite_stderr(data.eval_long), intervals=data.intervals)
    md.append("![methods](methods.png)\n")
    if any(data.losses.values()):
        plot_losses(data.losses, out_dir / "losses.png")
        md.append("## Training loss\n\n![losses](losses.png)\n")
    if len(data.diagnostics):
        md += _diagnostics_section(data.diagnostics, out_dir)
    if len(data.stage_times):
        md += _stage_times_section(data.stage_times, out_dir)
    return md


def _results_section(data: ExperimentData, table: pd.DataFrame, out_dir: Path) -> list[str]:
    md = ["## Results\n", "Suite averages are fractions (0-1): each task's primary metric averaged over the "
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
        md.append(_fmt(table[[c for c in table.columns if "(%)" not in c]]))
    return md + bpb_windows_line(data.eval_long)


# metrics shown beside a task's primary one in the per-task table (lm-eval's length-normalised accuracy)
SECONDARY_METRICS = ("acc_norm",)


def per_task_cells(eval_long: pd.DataFrame) -> pd.DataFrame:
    """`suite/task` (and `suite/task (acc_norm)` beside tasks that have it) x model: "value ± se (n)" with
    lm-eval's standard error of the task's score and its number of items."""
    from harness.evaluation.suites import primary_scores

    rows = primary_scores(eval_long)
    ev = eval_long[eval_long["suite"] != "perplexity"]
    extra = ev[ev["metric"].isin(SECONDARY_METRICS)]
    if "level" in extra.columns:
        extra = extra[extra["level"] != "group"]
    cells: dict[str, dict[str, str]] = {}
    for frame, suffix in ((rows, False), (extra, True)):
        for r in frame.itertuples():
            if pd.isna(pd.to_numeric(r.value, errors="coerce")):
                continue
            key = f"{r.suite}/{r.task}" + (f" ({r.metric})" if suffix else "")
            se = pd.to_numeric(r.stderr, errors="coerce")
            n = pd.to_numeric(r.n, errors="coerce")
            cells.setdefault(key, {})[r.model] = (f"{float(r.value):.3g}" + ("" if pd.isna(se) else f" ± {se:.2g}")
                                                  + ("" if pd.isna(n) else f" ({int(n)})"))
    order = sorted(cells, key=lambda k: (k.split(" (")[0], k))  # a task's acc_norm row right after it
    return pd.DataFrame.from_dict({k: cells[k] for k in order}, orient="index")


def _per_task_section(eval_long: pd.DataFrame, out_dir: Path) -> list[str]:
    tasks = per_task_scores(eval_long)
    if not len(tasks):
        return []
    tasks.index.name = "model"
    tasks.to_csv(out_dir / "per_task.csv")
    # one row per task (suite/task), one column per model: dozens of tasks stay readable
    shown = per_task_cells(eval_long)[list(tasks.index)]
    shown.index.name = "task"
    return ["## Per task\n", "Each task's primary metric (fractions) ± lm-eval's standard error (items scored); "
            "`(acc_norm)` rows: lm-eval's length-normalised accuracy of the same items, beside `acc`.\n",
            shown.fillna("").to_markdown() + "\n"]


# figure of harness.stages.diagnostics -> its column in the report's pivot, in reading order
DIAGNOSTIC_COLUMNS = {"share_usable": "usable", "share_next_span_differs": "next span differs",
                      "share_not_one_to_one": "not 1-1", "share_token_mismatch": "token mismatch",
                      "share_unmapped_ids": "unmapped ids", "coverage": "coverage",
                      "target_coverage": "target coverage",
                      "teacher_nll": "teacher nats", "target_nll": "target nats", "mix_gain_nats": "mix gain",
                      "topk_mass": "top-k mass", "picked": "picked", "mean_weight": "mean weight"}
DIAGNOSTICS_HOWTO = (
    "One row per model and corpus domain of the training documents (`all`: every domain); the sources' rows "
    "describe what their aligned distributions bring, the target's row its own top-k and how often it is picked. "
    "`positions` counts the target positions that predict a token; the next five columns split them: `usable` "
    "and `next span differs` carry the source's distribution into the fusion loss (the second about another unit "
    "of text than the target's next token), the other three fall back. Many `not 1-1` positions point to the "
    "**alignment** (the tokenizations cut the text differently); many `token mismatch` or `unmapped ids` to the "
    "**vocabulary map** (the aligned source token maps to another target token, or none of its top-k does). "
    "`coverage` is how often the gold next token is in the source's aligned row (`target coverage`: in the "
    "target's own top-k), over the carried positions; `teacher nats` beside `target nats` compare the two on the "
    "positions where both hold the gold token (the teacher renormalised over its row, as the loss uses it), and "
    "`mix gain` is the change in the target's nats per token from mixing 10% of the teacher in (negative: the "
    "teacher adds information). `picked` (share of the domain's documents whose lowest score is this model, "
    "MinCE's choice) and `mean weight` point to the **candidate choice**: a source strong on its domain but "
    "rarely picked there is lost by the score. `top-k mass` (each model on its own tokenization) points to "
    "**truncation**: the fusion renormalises the top-k, so a low mass makes the teacher overconfident. When these "
    "look healthy and FuseLLM still does not beat CLM-only, suspect the **training budget**.\n")


def diagnostics_table(diagnostics: pd.DataFrame) -> pd.DataFrame:
    """The fusion diagnostics' long table (harness.stages.diagnostics) as a pivot: rows (model, domain) in
    the table's order, columns `positions` then DIAGNOSTIC_COLUMNS (`picked` as a share of the documents)."""
    d = diagnostics.copy()
    picked = d["figure"] == "picked"
    d.loc[picked, "value"] = d.loc[picked, "value"] / d.loc[picked, "n"].where(d.loc[picked, "n"] > 0)
    rows = list(dict.fromkeys(zip(d["source"], d["domain"])))
    models = list(dict.fromkeys(m for m, _ in rows))
    rows.sort(key=lambda r: (models.index(r[0]), r[1] == "all"))  # stable: domains in table order, "all" last
    index = pd.MultiIndex.from_tuples(rows, names=["model", "domain"])
    table = d.set_index(["source", "domain", "figure"])["value"].unstack("figure").reindex(index)
    positions = d[d["figure"] == "share_usable"].set_index(["source", "domain"])["n"]
    out = pd.DataFrame({"positions": positions.reindex(table.index).astype("Int64").values}, index=table.index)
    for figure, column in DIAGNOSTIC_COLUMNS.items():
        out[column] = table[figure] if figure in table.columns else float("nan")
    return out


def _diagnostics_section(diagnostics: pd.DataFrame, out_dir: Path) -> list[str]:
    diagnostics.to_csv(out_dir / "diagnostics.csv", index=False)
    shown = diagnostics_table(diagnostics)
    shown = shown.reset_index().astype(object)
    shown = shown.where(shown.notna(), None)  # a figure with no positions to count is blank, not "nan"
    return ["## Fusion diagnostics\n", DIAGNOSTICS_HOWTO,
            shown.to_markdown(index=False, floatfmt=".3g", missingval="") + "\n"]


def _stage_times_section(stage_times: pd.DataFrame, out_dir: Path) -> list[str]:
    times = stage_times[["stage", "seconds", "cached"]].copy()
    times.to_csv(out_dir / "stage_times.csv", index=False)
    total = float(times["seconds"].sum(skipna=True))
    built_here = float(times.loc[~times["cached"].astype(bool), "seconds"].sum())
    note = (f"Build time of every stage (s), also of stages this run found cached (timed when they were built). "
            f"Sum {total:.1f} s; built in this run {built_here:.1f} s.\n")
    shown = times.assign(cached=times["cached"].map(lambda c: "cached" if bool(c) else "built"))
    return ["## Stage times\n", note, shown.to_markdown(index=False, floatfmt=".1f") + "\n"]


# ------------------------------------------------------------------------------------------- MLflow
def experiment_from_mlflow(client, run_id: str) -> ExperimentData:
    """Read an experiment run back from its results folder (artifacts `results/`, harness.results: the table,
    the long format, intervals, paired tests, training curves, stage times), as the pipeline logged it."""
    import tempfile

    from harness.results import RESULTS_DIR, ExperimentResult

    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, RESULTS_DIR, tmp)
            res = ExperimentResult.load(Path(local))
        except Exception as exc:
            raise ValueError(f"MLflow run {run_id} ({run.info.run_name}) has no `{RESULTS_DIR}/` artifact folder "
                             f"with a results.csv ({type(exc).__name__}); it is not an experiment run of the "
                             "pipeline (use the run of `fuselab run`, or a study), or it was logged by FuseLab "
                             "before 0.3 (rerun it: the stages are cached)") from None
    return ExperimentData(run.info.run_name or run_id, res.results, res.eval_long, res.losses, res.stage_times,
                          res.intervals, res.comparisons, res.diagnostics)


def experiment_report(client, uri: str, workdir: Path, exp_name: str, run, out: Path | None) -> Path:
    """The report of one experiment run, written to `out` (default `<workdir>/reports/<name>-<run id>`) and
    logged to the run (artifacts `report/`); prints and returns the markdown path."""
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
