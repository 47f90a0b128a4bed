"""Every contestant of a study over its seeds (the paper's tables, e.g. Table 7's shape): per setting, each model's
scores as mean and Student-t interval over the seeds, and paired comparisons over the seeds against the target
(the base), CLM-only and the best merge.

A study's trials record, per seed, every `<model>/<score>` metric of the experiment's results table and each
model's method kind (`studies.runner`: ATTR_RUNS). A paired comparison takes, seed by seed, the model's score minus
the reference's (same seed, same held-out documents and items), and reports the mean difference, its Student-t
interval over the seeds, a two-sided one-sample t-test of the differences (p; none with fewer than 2 seeds) and in
how many seeds the model was better. With 3 seeds a t-test has little power: the per-seed bootstrap intervals and
paired tests over documents are in each trial's experiment report.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness.report import CLM_METHOD, TARGET_METHOD
from studies.attrs import ATTR_HELDOUT, ATTR_RUNS, ATTR_SEARCH_SPACE

MERGE_METHOD = "merge"
BEST_MERGE = "best merge"


def seed_runs(study, heldout: bool = False) -> tuple[list[str], pd.DataFrame]:
    """(the searched params, one row per (setting, seed, model): params, seed, model, method, and every score
    column of the results table for that model). `heldout`: the chosen setting's runs on the test split
    (studies.heldout) instead of the trials'."""
    from optuna.trial import TrialState

    params = list(study.user_attrs.get(ATTR_SEARCH_SPACE) or [])
    if heldout:
        record = study.user_attrs.get(ATTR_HELDOUT) or {}
        settings = [(record.get("params") or {}, record.get("runs") or [])]
    else:
        trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.number)
        settings = [(t.params, t.user_attrs.get(ATTR_RUNS) or []) for t in trials]
    rows, seen = [], set()
    for point, runs in settings:
        setting = {k: v for k, v in point.items() if k in params}
        for r in runs:
            key = (tuple(setting.items()), r["seed"])
            if key in seen:  # a point re-run after a dead worker counts once (the latest)
                continue
            seen.add(key)
            for model, method in (r.get("methods") or {}).items():
                scores = {m.split("/", 1)[1]: v for m, v in r["metrics"].items() if m.startswith(f"{model}/")}
                rows.append({**setting, "seed": r["seed"], "model": model, "method": method, **scores})
    return params, pd.DataFrame(rows)


def score_columns(frame: pd.DataFrame, params: list[str]) -> list[str]:
    return [c for c in frame.columns if c not in (*params, "seed", "model", "method")
            and pd.api.types.is_numeric_dtype(frame[c])]


def contestant_table(study, heldout: bool = False) -> pd.DataFrame:
    """Rows: (params..., model, method, n_seeds) in the order the trials list the models; per score column
    `<col> mean`, `<col> lo`, `<col> hi` (95% Student-t interval over the seeds, NaN for one seed)."""
    from harness.stats import seed_interval

    params, runs = seed_runs(study, heldout)
    if not len(runs):
        return pd.DataFrame()
    cols = score_columns(runs, params)
    out = []
    for key, g in runs.groupby([*params, "model"], sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip([*params, "model"], key))
        row["method"], row["n_seeds"] = g["method"].iloc[0], int(g["seed"].nunique())
        for c in cols:
            iv = seed_interval(list(g[c].astype(float)))
            row[f"{c} mean"], row[f"{c} lo"], row[f"{c} hi"] = iv.estimate, iv.lo, iv.hi
        out.append(row)
    return pd.DataFrame(out)


def _references(g: pd.DataFrame, rank_by: str) -> dict[str, str]:
    """{reference name: model} of one setting: the target, CLM-only and the merge with the lowest mean
    `rank_by` (bits per byte: lower is better)."""
    refs = {}
    for name in (TARGET_METHOD, CLM_METHOD):
        hit = g.loc[g["method"] == name, "model"]
        if len(hit):
            refs[name] = str(hit.iloc[0])
    merges = g[g["method"] == MERGE_METHOD]
    if len(merges) and rank_by in merges.columns:
        refs[BEST_MERGE] = str(merges.groupby("model")[rank_by].mean().idxmin())
    return refs


def _paired(diffs: list[float], lower_is_better: bool) -> dict[str, Any]:
    from scipy.stats import ttest_1samp

    from harness.stats import seed_interval

    iv = seed_interval(diffs)
    p = float(ttest_1samp(diffs, 0.0).pvalue) if len(diffs) >= 2 and pd.Series(diffs).std() > 0 else math.nan
    better = sum((d < 0) if lower_is_better else (d > 0) for d in diffs)
    return {"difference": iv.estimate, "lo": iv.lo, "hi": iv.hi, "p_value": p, "better_in": f"{better}/{len(diffs)}"}


def seed_comparisons(study, rank_by: str = "bpb_avg", heldout: bool = False) -> pd.DataFrame:
    """Paired over seeds: rows (params..., model, vs, reference_model, score, difference, lo, hi, p_value,
    better_in) for every model against the target, CLM-only and the best merge (by mean `rank_by`) of its
    setting; difference = model - reference (bits per byte: negative is better)."""
    params, runs = seed_runs(study, heldout)
    if not len(runs):
        return pd.DataFrame()
    cols = score_columns(runs, params)
    out = []
    groups = runs.groupby(params, sort=False, dropna=False) if params else [((), runs)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        by_model = {m: s.set_index("seed") for m, s in g.groupby("model", sort=False)}
        for vs, ref in _references(g, rank_by).items():
            for model, mine in by_model.items():
                if model == ref:
                    continue
                theirs = by_model[ref]
                for c in cols:
                    seeds = [s for s in mine.index if s in theirs.index and not pd.isna(mine.at[s, c])
                             and not pd.isna(theirs.at[s, c])]
                    if seeds:
                        diffs = [float(mine.at[s, c] - theirs.at[s, c]) for s in seeds]
                        out.append({**dict(zip(params, key)), "model": model, "vs": vs, "reference_model": ref,
                                    "score": c, **_paired(diffs, c.startswith("bpb_"))})
    return pd.DataFrame(out)
