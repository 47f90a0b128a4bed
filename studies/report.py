"""Study reports: the ablation over an Optuna study's trials (mean ± std and intervals over seeds, heatmap, bars,
parameter importances, failed trials), and `fuselab report TARGET` for any target (study or experiment run).

The experiment part (tables, plots, gains, intervals) is `harness.report`; this module adds what only studies
have, so that `harness` never imports `studies`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from harness.figures import INTERVAL_LABEL, _plt, _save, draw_bars, is_bpb, method_color
from harness.report import CLM_METHOD, TARGET_METHOD, _fmt, _num, experiment_report, write_report
from studies.attrs import ATTR_ERROR, ATTR_HELDOUT, ATTR_OBJECTIVE, ATTR_RUNS, ATTR_SEARCH_SPACE, ATTR_SETTING
from studies.spec import SEED_PARAM, load_spec


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
        raise ReportError(f"study {study.study_name!r} has no complete trial yet; nothing to tabulate")
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



def ablation_heatmap_figure(ablation: pd.DataFrame, params: list[str], metric: str):
    """Mean `metric` over seeds on a grid of the first two params (one row for a single param); other
    params are averaged. Cells show mean ± std ("n/a" where no run has the metric); for bits per byte the
    colour scale is reversed so that brighter is better for every metric. Returns the Figure."""
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
    mean = df.pivot_table(index=rows_p, columns=cols_p, values=mean_col, aggfunc="mean", sort=False, dropna=False)
    std = df.pivot_table(index=rows_p, columns=cols_p, values=std_col, aggfunc="mean", sort=False, dropna=False)
    std = std.reindex(index=mean.index, columns=mean.columns)
    fig, ax = plt.subplots(figsize=(1.8 * mean.shape[1] + 2.5, 0.9 * mean.shape[0] + 1.8), layout="constrained")
    im = ax.imshow(mean.values.astype(float), cmap="viridis_r" if is_bpb(metric) else "viridis", aspect="auto")
    for i in range(mean.shape[0]):
        for j in range(mean.shape[1]):
            m, sd = mean.values[i, j], std.values[i, j]
            text = "n/a" if pd.isna(m) else f"{m:.4g}" + ("" if pd.isna(sd) else f"\n± {sd:.2g}")
            ax.text(j, i, text, ha="center", va="center", color=_text_color(im, m), fontsize=8)
    ax.set_xticks(range(mean.shape[1]), list(mean.columns), fontsize=8)
    ax.set_yticks(range(mean.shape[0]), list(mean.index), fontsize=8)
    ax.set_xlabel("" if cols_p == "_" else cols_p)
    ax.set_ylabel(rows_p)
    ax.set_title(f"{metric} (mean ± std over seeds)", fontsize=9)
    fig.colorbar(im, ax=ax, label=metric + (" (lower is better)" if is_bpb(metric) else " (higher is better)"))
    return fig


def _text_color(im, value: float) -> str:
    """Black on light cells, white on dark ones (relative luminance of the cell's colour), grey for n/a."""
    if pd.isna(value):
        return "0.3"
    r, g, b, _ = im.cmap(im.norm(value))
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def plot_ablation_heatmap(ablation: pd.DataFrame, params: list[str], metric: str, out: Path) -> Path:
    """`ablation_heatmap_figure` saved as PNG at `out`."""
    return _save(ablation_heatmap_figure(ablation, params, metric), out)


def _setting_labels(frame: pd.DataFrame, params: list[str]) -> list[str]:
    return [", ".join(str(r[p]) for p in params) for _, r in frame.iterrows()]


def _draw_baselines(ax, baselines: pd.DataFrame | None, metric: str) -> list:
    """The target and CLM-only as vertical lines at their mean over seeds, their interval as a band where one
    exists; returns the legend handles."""
    handles = []
    if baselines is None or not len(baselines) or f"{metric} mean" not in baselines.columns:
        return handles
    for _, row in baselines.iterrows():
        mean = row.get(f"{metric} mean")
        if pd.isna(mean):
            continue
        color = method_color(row["method"])
        label = f"{row['method']} ({row['model']}, {int(row['n_seeds'])} seeds)"
        handles.append(ax.axvline(mean, color=color, linestyle="--", linewidth=1.5, label=label))
        lo, hi = row.get(f"{metric} lo"), row.get(f"{metric} hi")
        if not (pd.isna(lo) or pd.isna(hi)):
            ax.axvspan(lo, hi, color=color, alpha=0.15)
    return handles


def _baseline_values(baselines: pd.DataFrame | None, metric: str) -> list[float]:
    cols = [f"{metric} {s}" for s in ("mean", "lo", "hi")]
    if baselines is None or not len(baselines):
        return []
    return [float(v) for c in cols if c in baselines.columns for v in baselines[c]]


def _draw_seeds(ax, runs: pd.DataFrame | None, ablation: pd.DataFrame, params: list[str], metric: str) -> list:
    """Each seed's value of `metric` as a small dot on its setting's row; returns the legend handle."""
    if runs is None or metric not in getattr(runs, "columns", []):
        return []
    rows = {label: i for i, label in enumerate(_setting_labels(ablation, params))}
    pts = [(float(v), rows[label]) for label, v in zip(_setting_labels(runs, params), runs[metric])
           if label in rows and not pd.isna(v)]
    if not pts:
        return []
    x, y = zip(*pts)
    return [ax.scatter(x, y, s=18, facecolors="white", edgecolors="black", linewidths=0.8, zorder=3,
                       label="one seed")]


def ablation_bars_figure(ablation: pd.DataFrame, params: list[str], metric: str,
                         baselines: pd.DataFrame | None = None, runs: pd.DataFrame | None = None):
    """One horizontal bar per setting: mean `metric` over seeds, its 95% interval over seeds as an error bar
    where it exists (none for one seed), "n/a" where missing; each seed's value as a dot (`runs`:
    `study_runs`); `baselines` (`ablation_baselines`): the target and CLM-only as dashed lines with their
    interval as a band, on the same axes. Bits per byte on an axis around the data. Returns the Figure."""
    plt = _plt()
    from matplotlib.patches import Patch

    labels = _setting_labels(ablation, params)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 2.2), layout="constrained")
    lo, hi = (ablation.get(f"{metric} {end}") for end in ("lo", "hi"))
    draw_bars(ax, labels, ablation[f"{metric} mean"].astype(float).values, [method_color("FuseLLM")] * len(labels),
              lo=lo, hi=hi, from_zero=not is_bpb(metric), extra=_baseline_values(baselines, metric))
    handles = [Patch(color=method_color("FuseLLM"), label="FuseLLM, mean over seeds")]
    if any(c.get_label() == INTERVAL_LABEL for c in ax.containers):
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="black", marker="|", markersize=10, label="95% interval over seeds"))
    handles += _draw_seeds(ax, runs, ablation, params, metric) + _draw_baselines(ax, baselines, metric)
    fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncol=2)
    ax.set_xlabel(metric + (" (bits per byte, lower is better; axis not from 0)" if is_bpb(metric)
                            else " (higher is better)"), fontsize=8)
    ax.set_ylabel(" x ".join(params), fontsize=8)
    return fig


def plot_ablation_bars(ablation: pd.DataFrame, params: list[str], metric: str, out: Path,
                       baselines: pd.DataFrame | None = None, runs: pd.DataFrame | None = None) -> Path:
    """`ablation_bars_figure` saved as PNG at `out`."""
    return _save(ablation_bars_figure(ablation, params, metric, baselines, runs), out)


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



def _contestant_section(study, out_dir: Path, heldout: bool = False) -> list[str]:
    """Every contestant over the seeds (studies.seeds): mean [interval] per score, paired differences against
    the target, CLM-only and the best merge. Empty for studies whose runs recorded no methods. `heldout`: the
    chosen setting on the test split (files `heldout_*.csv`)."""
    from studies.seeds import contestant_table, seed_comparisons

    table = contestant_table(study, heldout)
    if not len(table):
        return []
    prefix, split = ("heldout_", "test") if heldout else ("", "validation")
    table.to_csv(out_dir / f"{prefix}contestants.csv", index=False)
    params = [c for c in (study.user_attrs.get(ATTR_SEARCH_SPACE) or []) if c in table.columns]
    shown = _fmt_ablation(table, [*params, "model", "method"]).set_index("model")
    md = [f"{'###' if heldout else '##'} Every contestant over the seeds ({split} split)\n",
          "Mean [95% Student-t interval over the seeds] of each contestant's scores (n_seeds seeds; no interval "
          f"for one seed); suite columns are fractions, `bpb_*` bits per byte on the held-out {split} documents "
          "(lower is better).\n",
          _fmt(shown.drop(columns=[c for c in params if c in shown.columns]))]
    cmp = seed_comparisons(study, heldout=heldout)
    if len(cmp):
        cmp.to_csv(out_dir / f"{prefix}contestant_comparisons.csv", index=False)
        bpb = cmp[cmp["score"].str.startswith("bpb_")]
        cells = bpb.assign(cell=[f"{d:+.4f}" + ("" if pd.isna(lo) else f" [{lo:+.4f}, {hi:+.4f}]")
                                 + ("" if pd.isna(pv) else f" p={pv:.2g}") + f" ({b} better)"
                                 for d, lo, hi, pv, b in zip(bpb["difference"], bpb["lo"], bpb["hi"],
                                                             bpb["p_value"], bpb["better_in"])])
        pivot = cells.pivot_table(index=["model", "vs"], columns="score", values="cell", aggfunc="first", sort=False)
        md += [f"{'####' if heldout else '###'} Paired over the seeds (bits per byte, {split} split)\n",
               "Model minus reference, seed by seed (same held-out documents): mean [95% Student-t interval], "
               "two-sided t-test p over the seeds, and in how many seeds the model had the lower bits per byte. "
               "References: the target (base), CLM-only and the best merge (lowest mean bpb_avg).\n",
               pivot.reset_index().to_markdown(index=False) + "\n"]
    return md


def _heldout_section(study, out_dir: Path) -> list[str]:
    """The chosen setting on the test split (studies.heldout)."""
    record = study.user_attrs.get(ATTR_HELDOUT)
    if record is None:
        return []
    md = ["## Held-out test split: the chosen setting\n"]
    if "skipped" in record:
        return md + [f"Every score above is on the validation split the settings were compared on; no held-out "
                     f"test run: {record['skipped']}.\n"]
    if "failed" in record:
        return md + [f"Every score above is on the validation split the settings were compared on; the held-out "
                     f"test run failed: {record['failed']} (it is tried again the next time the study is run).\n"]
    objective = (study.user_attrs.get(ATTR_OBJECTIVE) or {}).get("metric", "objective")
    test = [r["metrics"][objective] for r in record["runs"] if objective in r["metrics"]]
    md.append(f"Chosen on the validation split: **{record['setting']}** (best mean `{objective}` = "
              f"{record['validation_objective']:.4f} over its seeds). Run again on the test split's documents, "
              f"which no setting was chosen on, with the same trained models (seeds "
              f"{', '.join(str(r['seed']) for r in record['runs'])}): `{objective}` = "
              f"{sum(test) / len(test):.4f} (mean of {len(test)}). The validation figure of the chosen setting is "
              "biased in its favour (the best of several noisy numbers); the test figures below are not.\n")
    return md + _contestant_section(study, out_dir, heldout=True)


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
            plot_ablation_bars(ab, params, objective, out_dir / "ablation_bars.png", baselines=base, runs=runs)
            md.append("![ablation heatmap](ablation_heatmap.png)\n\n![ablation bars](ablation_bars.png)\n")
        imp = param_importances(study)
        if imp:
            plot_importances(imp, out_dir / "importances.png")
            pd.Series(imp, name="importance").rename_axis("param").to_csv(out_dir / "importances.csv")
            md.append("## Parameter importances\n\n![importances](importances.png)\n")
        else:
            md.append("Parameter importances: not computable (needs >= 2 complete trials with varying params).\n")
    md += _contestant_section(study, out_dir)
    md += _heldout_section(study, out_dir)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        md.append("## Failed trials\n")
        md += [f"- trial {t.number} ({t.user_attrs.get(ATTR_SETTING, '')}): "
               f"{t.user_attrs.get(ATTR_ERROR, 'worker died or was interrupted; re-queued')}" for t in failed]
        md.append("")
    return md


def write_study_report(study, out_dir: Path, *, tracker=None, run_id: str | None = None,
                       title: str | None = None) -> Path:
    """The report of a study (the runner logs it to the study's parent run when it completes): ablation table,
    plots, parameter importances, failed trials."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_report(out_dir, tracker=tracker, run_id=run_id, sections=_study_section(study, out_dir, title))



_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ReportError(ValueError):
    """Nothing to report for the target asked for (unknown, or no finished run / complete trial yet)."""


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
        path = write_study_report(study, dest, tracker=tracker if run_id else None, run_id=run_id)
        print(path)
        return path

    # 1. a study spec file
    if str(target).endswith((".yaml", ".yml")) and Path(target).is_file():
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
            return experiment_report(client, uri, workdir, exp_name, run, out)
    # 3. an MLflow experiment name
    exp = client.get_experiment_by_name(str(target))
    if exp is not None:
        studies = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'study'",
                                     order_by=["attributes.start_time DESC"], max_results=50)
        named = [r for r in studies if r.data.tags.get(TAG_STUDY) == str(target)]
        if named:  # a study's experiment (named like the study by default) holds its trials' runs: the study
            t = named[0].data.tags
            print(f"fuselab report: {target!r} is a study (its trials' runs are in the MLflow experiment of that "
                  "name): the study report", flush=True)
            return study_report(t[TAG_STUDY], t.get("fuselab.storage", default_storage), named[0].info.run_id,
                                exp.name)
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`fuselab.kind` = 'experiment'",
                                  order_by=["attributes.start_time DESC"], max_results=50)
        runs = [r for r in runs if r.info.status == "FINISHED"]
        if runs:
            print(f"fuselab report: {target!r} is an MLflow experiment: the report of its latest finished run "
                  f"{runs[0].info.run_id}", flush=True)
            return experiment_report(client, uri, workdir, exp.name, runs[0], out)
        if studies:
            t = studies[0].data.tags
            return study_report(t[TAG_STUDY], t.get("fuselab.storage", default_storage), studies[0].info.run_id,
                                exp.name)
        raise ReportError(f"MLflow experiment {target!r} in {uri} has no finished experiment run and no study run")
    # 4. a study name in the default storage
    if sqlite_exists(default_storage):
        names = [s.study_name for s in optuna.get_all_study_summaries(default_storage, include_best_trial=False)]
        if str(target) in names:
            return study_report(str(target), default_storage, None, None)
    raise ReportError(f"fuselab report {target!r}: not a study spec file, not a run id in {uri}, not an MLflow "
                     f"experiment name, not a study in {default_storage}; list runs with `fuselab ui` or pass "
                     "--workdir of the run")


def sqlite_exists(url: str) -> bool:
    return not url.startswith("sqlite:///") or Path(url[len("sqlite:///"):]).is_file()


