"""Uncertainty for FuseLab's scores: bootstrap confidence intervals, paired tests, intervals over seeds.

Every score of the results table is a mean over *strata* of a ratio of sums over *units*:
- a task score is the mean of its items' scores (units = items, numerator = the item's score, denominator 1);
  a suite average is the mean over its tasks of those task means (strata = tasks);
- bits per byte of a domain is sum(bits) / sum(bytes) over its held-out documents (units = documents,
  numerator = the document's negative log-likelihood in bits, denominator = its UTF-8 bytes); `bpb_avg` is the
  mean over domains (strata = domains).

So one representation serves both: `Strata`, a list of (numerator, denominator) array pairs, one per stratum,
with `estimate(strata) = mean_j sum(num_j) / sum(den_j)`.

- `bootstrap_interval`: percentile bootstrap, units resampled with replacement within each stratum (a stratified
  bootstrap: each task keeps its number of items, each domain its number of documents).
- `paired_test`: two models scored on the same units (same items, same documents: same denominators).
  The difference of estimates is `sum_i w_i d_i` with d_i the per-unit difference of numerators and
  w_i = 1 / (n_strata * sum(den of i's stratum)); under the null hypothesis "no difference" each d_i is
  symmetric around 0, so the two-sided p-value is the share of sign flips s (s_i = +-1) with
  |sum_i s_i w_i d_i| >= |observed|: enumerated exactly when at most `exact_max_units` d_i are non-zero,
  else estimated from `n_permutations` random flips as (1 + hits) / (1 + n_permutations). Its interval is a
  paired bootstrap (the same resampled units for both models).
- `seed_interval`: mean and Student-t interval over seeds (a study's settings).

All functions are pure and seeded: the same inputs and seed give the same numbers.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Strata = Sequence[tuple[np.ndarray, np.ndarray]]  # per stratum: (numerator [n_units], denominator [n_units])

CONFIDENCE = 0.95
N_BOOTSTRAP = 2000
N_PERMUTATIONS = 10000
EXACT_MAX_UNITS = 16  # 2^16 sign patterns enumerated exactly; more units: Monte Carlo
# Share of `n` resamples (units per resample summed over strata) drawn in one numpy call (memory bound).
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided `confidence` interval [lo, hi]; n = units (items, documents)."""

    estimate: float
    lo: float
    hi: float
    n: int
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


@dataclass(frozen=True)
class PairedTest:
    """A - B on the same units: difference of estimates, its paired-bootstrap interval, the two-sided sign-flip
    p-value; `exact` when every sign pattern was enumerated; n = paired units."""

    difference: float
    lo: float
    hi: float
    p_value: float
    n: int
    exact: bool


def _as_strata(strata: Strata) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for j, (num, den) in enumerate(strata):
        num = np.asarray(num, dtype=np.float64).reshape(-1)
        den = np.asarray(den, dtype=np.float64).reshape(-1)
        if num.shape != den.shape:
            raise ValueError(f"stratum {j}: {num.size} numerators but {den.size} denominators")
        if not num.size:
            raise ValueError(f"stratum {j} has no units; leave empty strata (tasks not run) out")
        if not np.isfinite(num).all() or not np.isfinite(den).all():
            raise ValueError(f"stratum {j}: non-finite numerator or denominator (a unit without a score)")
        out.append((num, den))
    if not out:
        raise ValueError("no strata: nothing to estimate")
    return out


def mean_scores(values_by_stratum: Sequence[Sequence[float]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Strata for means: each stratum's values over denominators 1 (a task's item scores)."""
    return [(np.asarray(v, dtype=np.float64), np.ones(len(v))) for v in values_by_stratum]


def estimate(strata: Strata) -> float:
    """mean over strata of sum(numerator) / sum(denominator)."""
    s = _as_strata(strata)
    return float(np.mean([num.sum() / den.sum() for num, den in s]))


def _resampled(strata: list[tuple[np.ndarray, np.ndarray]], n_resamples: int, rng: np.random.Generator,
               numerators: list[np.ndarray] | None = None) -> np.ndarray:
    """[n_resamples] statistic of stratified resamples: indices drawn per stratum, then mean_j of ratio sums.
    `numerators` (optional) replaces each stratum's numerator (the paired differences), same indices."""
    total = np.zeros(n_resamples)
    for j, (num, den) in enumerate(strata):
        top = num if numerators is None else numerators[j]
        n = num.size
        rows = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, n_resamples, rows):
            stop = min(n_resamples, start + rows)
            idx = rng.integers(0, n, size=(stop - start, n))
            total[start:stop] += top[idx].sum(axis=1) / den[idx].sum(axis=1)
    return total / len(strata)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


def bootstrap_interval(strata: Strata, *, n_resamples: int = N_BOOTSTRAP, confidence: float = CONFIDENCE,
                       seed: int = 0) -> Interval:
    """Percentile bootstrap interval of `estimate(strata)`, units resampled within strata (seeded)."""
    s = _as_strata(strata)
    stats = _resampled(s, n_resamples, np.random.default_rng(seed))
    lo, hi = _percentiles(stats, confidence)
    point = estimate(s)
    if np.ptp(stats) == 0:  # a constant statistic: a zero-width interval at the estimate (no float drift)
        lo = hi = point
    return Interval(point, lo, hi, sum(num.size for num, _ in s), confidence)


def sign_flip_p_value(contributions: np.ndarray, *, n_permutations: int = N_PERMUTATIONS,
                      exact_max_units: int = EXACT_MAX_UNITS, seed: int = 0) -> tuple[float, bool]:
    """Two-sided p-value of H0 "each contribution c_i is symmetric around 0" for the statistic sum_i c_i:
    P(|sum_i s_i c_i| >= |sum_i c_i|) over independent uniform signs s_i. Zeros do not change the sum and are
    dropped; the rest is enumerated exactly (2^m patterns) when m <= exact_max_units, else sampled
    ((1 + hits) / (1 + n_permutations)). Returns (p, exact). No non-zero contribution: (1.0, True)."""
    c = np.asarray(contributions, dtype=np.float64).reshape(-1)
    c = c[c != 0]
    observed = abs(c.sum())
    # ties (e.g. equal item differences) must count as "as extreme": compare with a relative tolerance
    threshold = observed - 1e-9 * max(observed, np.abs(c).sum()) - 1e-300
    m = c.size
    if m == 0:
        return 1.0, True
    if m <= exact_max_units:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=m)))
        hits = int((np.abs(signs @ c) >= threshold).sum())
        return hits / len(signs), True
    rng = np.random.default_rng(seed)
    hits = 0
    rows = max(1, _CHUNK_ELEMENTS // m)
    for start in range(0, n_permutations, rows):
        k = min(rows, n_permutations - start)
        signs = rng.integers(0, 2, size=(k, m)) * 2.0 - 1.0
        hits += int((np.abs(signs @ c) >= threshold).sum())
    return (1 + hits) / (1 + n_permutations), False


def paired_test(strata_a: Strata, strata_b: Strata, *, n_resamples: int = N_BOOTSTRAP,
                n_permutations: int = N_PERMUTATIONS, exact_max_units: int = EXACT_MAX_UNITS,
                confidence: float = CONFIDENCE, seed: int = 0) -> PairedTest:
    """A vs B scored on the same units, stratum by stratum in the same order (same denominators: the same items,
    the same documents). Difference estimate(A) - estimate(B), paired-bootstrap interval, sign-flip p-value."""
    a, b = _as_strata(strata_a), _as_strata(strata_b)
    if len(a) != len(b):
        raise ValueError(f"paired_test: {len(a)} strata for A but {len(b)} for B; pair the same tasks/domains")
    diffs, weights = [], []
    for j, ((na, da), (nb, db)) in enumerate(zip(a, b)):
        if na.size != nb.size or not np.allclose(da, db, rtol=0, atol=1e-9):
            raise ValueError(f"paired_test: stratum {j} does not hold the same units for A and B "
                             f"({na.size} vs {nb.size} units, or different denominators)")
        diffs.append(na - nb)
        weights.append(np.full(na.size, 1.0 / (len(a) * da.sum())))
    difference = estimate(a) - estimate(b)
    p, exact = sign_flip_p_value(np.concatenate(diffs) * np.concatenate(weights), n_permutations=n_permutations,
                                 exact_max_units=exact_max_units, seed=seed)
    stats = _resampled(a, n_resamples, np.random.default_rng(seed), numerators=diffs)
    lo, hi = _percentiles(stats, confidence)
    if np.ptp(stats) == 0:
        lo = hi = difference
    return PairedTest(float(difference), lo, hi, float(p), sum(d.size for d in diffs), exact)


def significance_mark(p_value: float) -> str:
    """'***' p < 0.001, '**' p < 0.01, '*' p < 0.05, '' otherwise or NaN (no correction for multiple tests)."""
    if p_value is None or not p_value == p_value:
        return ""
    return "***" if p_value < 0.001 else "**" if p_value < 0.01 else "*" if p_value < 0.05 else ""


def seed_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean over seeds and its Student-t interval mean -+ t_{(1+c)/2, n-1} * s / sqrt(n) (s: sample std,
    ddof=1); n = seeds. One seed: lo = hi = NaN (no spread to estimate)."""
    x = np.asarray([v for v in values if v == v], dtype=np.float64)
    if not x.size:
        return Interval(math.nan, math.nan, math.nan, 0, confidence)
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, int(x.size), confidence)
    from scipy.stats import t

    half = float(t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, int(x.size), confidence)


# ------------------------------------------------------------------------------------- results tables
# Per-unit frames kept by the evaluation stage (see harness.pipeline):
#   items: model, suite, task, metric, doc_id, value   (lm-eval's per-sample score of every metric)
#   docs:  model, domain, doc, n_tokens, n_bytes, nll_nats   (held-out documents, `doc` = index in the domain)
ITEM_COLUMNS = ["model", "suite", "task", "metric", "doc_id", "value"]
DOC_COLUMNS = ["model", "domain", "doc", "n_tokens", "n_bytes", "nll_nats"]
INTERVAL_COLUMNS = ["model", "score", "estimate", "lo", "hi", "n", "n_strata", "lmeval_stderr"]
COMPARISON_COLUMNS = ["model", "reference", "reference_model", "score", "difference", "lo", "hi", "p_value",
                      "exact", "mark", "n"]


def _task_units(eval_long, items, model: str) -> dict[str, dict[str, "object"]]:
    """suite -> task -> pandas Series (doc_id -> item score of the task's primary metric), for the tasks whose
    primary value is the mean of its item scores (lm-eval's mean aggregation); a suite with a task that has a
    value but no such items maps to None (no interval: the items would describe another quantity)."""
    import pandas as pd

    from harness.evaluation.suites import primary_scores

    primary = primary_scores(eval_long[eval_long["model"] == model])
    primary = primary[pd.to_numeric(primary["value"], errors="coerce").notna()]
    mine = items[items["model"] == model] if items is not None and len(items) else None
    out: dict[str, dict | None] = {}
    for r in primary.itertuples():
        suite = out.setdefault(r.suite, {})
        if suite is None:
            continue
        units = None
        if mine is not None:
            rows = mine[(mine["suite"] == r.suite) & (mine["task"] == r.task) & (mine["metric"] == r.metric)]
            vals = pd.to_numeric(rows["value"], errors="coerce")
            if len(rows) and vals.notna().all() and abs(vals.mean() - float(r.value)) <= 1e-9 * max(1.0, abs(r.value)):
                units = pd.Series(vals.values, index=rows["doc_id"].values).sort_index()
        if units is None:
            out[r.suite] = None
        else:
            suite[r.task] = units
    return out


def _doc_units(docs, model: str) -> dict[str, "object"]:
    """domain -> DataFrame indexed by `doc` with columns bits (nll in bits) and n_bytes."""
    if docs is None or not len(docs):
        return {}
    out = {}
    for domain, g in docs[docs["model"] == model].groupby("domain", sort=False):
        g = g.set_index("doc").sort_index()
        out[str(domain)] = g.assign(bits=g["nll_nats"].astype(float) / math.log(2))[["bits", "n_bytes"]]
    return out


def _strata_of(model_units: dict, score: str, units_docs: dict) -> tuple[list, list] | None:
    """(stratum names, strata) of one results column: a suite (tasks) or bpb_<domain> / bpb_avg (domains)."""
    if score.startswith("bpb_"):
        names = sorted(units_docs) if score == "bpb_avg" else [score[len("bpb_"):]]
        if not names or any(n not in units_docs for n in names):
            return None
        return names, [(units_docs[n]["bits"].to_numpy(), units_docs[n]["n_bytes"].to_numpy(float)) for n in names]
    tasks = model_units.get(score)
    if not tasks:
        return None
    return list(tasks), [(s.to_numpy(float), np.ones(len(s))) for s in tasks.values()]


def score_intervals(eval_long, items, docs, models: Sequence[str], *, n_resamples: int = N_BOOTSTRAP,
                    confidence: float = CONFIDENCE, seed: int = 0):
    """One row per (model, results column): suite averages (strata = tasks, units = items) and bits per byte
    (`bpb_<domain>`, `bpb_avg`; units = documents) with their bootstrap interval. Columns: `INTERVAL_COLUMNS`;
    n = units, n_strata = tasks or domains, lmeval_stderr = the suite average's standard error from lm-eval's
    per-task stderr (sqrt(sum se^2) / n_tasks; NaN for bits per byte). A column without per-unit scores (an
    evaluation cached before they were kept, a metric that is not a mean over items) gets NaN bounds."""
    import pandas as pd

    from harness.report import suite_stderr

    se = suite_stderr(eval_long)
    rows = []
    for model in models:
        tasks = _task_units(eval_long, items, model)
        units_docs = _doc_units(docs, model)
        ev = eval_long[eval_long["model"] == model]
        scores = list(dict.fromkeys(ev.loc[ev["suite"] != "perplexity", "suite"]))
        domains = list(dict.fromkeys(ev.loc[(ev["suite"] == "perplexity") & (ev["metric"] == "bits_per_byte"),
                                            "task"]))
        scores += [f"bpb_{d}" for d in domains] + (["bpb_avg"] if domains else [])
        for score in scores:
            got = _strata_of(tasks, score, units_docs)
            lm_se = float(se.loc[model, score]) if model in se.index and score in se.columns else math.nan
            if got is None:
                rows.append({"model": model, "score": score, "estimate": math.nan, "lo": math.nan, "hi": math.nan,
                             "n": 0, "n_strata": 0, "lmeval_stderr": lm_se})
                continue
            names, strata = got
            iv = bootstrap_interval(strata, n_resamples=n_resamples, confidence=confidence, seed=seed)
            rows.append({"model": model, "score": score, "estimate": iv.estimate, "lo": iv.lo, "hi": iv.hi,
                         "n": iv.n, "n_strata": len(names), "lmeval_stderr": lm_se})
    return pd.DataFrame(rows, columns=INTERVAL_COLUMNS)


def _paired_strata(a_units: dict, b_units: dict, a_docs: dict, b_docs: dict, score: str):
    """The strata of A and B on their common units (common tasks and doc_ids; common domains and documents)."""
    got_a, got_b = _strata_of(a_units, score, a_docs), _strata_of(b_units, score, b_docs)
    if got_a is None or got_b is None:
        return None
    if score.startswith("bpb_"):
        names = [n for n in got_a[0] if n in got_b[0]]
        sa, sb = [], []
        for n in names:
            common = a_docs[n].index.intersection(b_docs[n].index)
            da, db = a_docs[n].loc[common], b_docs[n].loc[common]
            if not len(common) or not np.array_equal(da["n_bytes"].to_numpy(), db["n_bytes"].to_numpy()):
                return None  # not the same documents
            sa.append((da["bits"].to_numpy(), da["n_bytes"].to_numpy(float)))
            sb.append((db["bits"].to_numpy(), db["n_bytes"].to_numpy(float)))
        return (sa, sb) if names and len(names) == len(got_a[0]) == len(got_b[0]) else None
    ta, tb = a_units[score], b_units[score]
    if list(ta) != list(tb):
        return None  # not the same tasks: the averages are not comparable item by item
    sa, sb = [], []
    for task in ta:
        common = ta[task].index.intersection(tb[task].index)
        if not len(common):
            return None
        sa.append((ta[task].loc[common].to_numpy(float), np.ones(len(common))))
        sb.append((tb[task].loc[common].to_numpy(float), np.ones(len(common))))
    return sa, sb


def paired_comparisons(eval_long, items, docs, models: Sequence[str], references: dict[str, str], *,
                       n_resamples: int = N_BOOTSTRAP, n_permutations: int = N_PERMUTATIONS,
                       confidence: float = CONFIDENCE, seed: int = 0):
    """Every model against each reference (`references`: label -> model, e.g. {"target": "llama-docs",
    "CLM-only": "clm"}) on every results column both have per-unit scores for, paired on the same items /
    documents (`paired_test`). difference = model - reference (for bits per byte negative is better);
    mark = `significance_mark(p_value)`. Columns: `COMPARISON_COLUMNS`."""
    import pandas as pd

    units = {m: _task_units(eval_long, items, m) for m in models}
    doc_units = {m: _doc_units(docs, m) for m in models}
    rows = []
    for label, ref in references.items():
        if ref not in units:
            continue
        for model in models:
            if model == ref:
                continue
            ev = eval_long[eval_long["model"] == model]
            scores = list(dict.fromkeys(ev.loc[ev["suite"] != "perplexity", "suite"]))
            domains = list(dict.fromkeys(ev.loc[(ev["suite"] == "perplexity")
                                                & (ev["metric"] == "bits_per_byte"), "task"]))
            scores += [f"bpb_{d}" for d in domains] + (["bpb_avg"] if domains else [])
            for score in scores:
                pair = _paired_strata(units[model], units[ref], doc_units[model], doc_units[ref], score)
                if pair is None:
                    continue
                t = paired_test(pair[0], pair[1], n_resamples=n_resamples, n_permutations=n_permutations,
                                confidence=confidence, seed=seed)
                rows.append({"model": model, "reference": label, "reference_model": ref, "score": score,
                             "difference": t.difference, "lo": t.lo, "hi": t.hi, "p_value": t.p_value,
                             "exact": t.exact, "mark": significance_mark(t.p_value), "n": t.n})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
