"""Report figures (matplotlib, Agg): scores per model and training-loss curves; the study figures in
`studies.report` draw with the same helpers.

Rules every figure keeps, so that a reader can trust what they see:
- bits per byte is drawn on an axis around the data (never from 0: 2.36 vs 2.37 must be told apart), its
  bars starting at the axis edge and the axis label saying so; accuracies (fractions) start at 0;
- colours are method kinds (source, target, CLM-only, FuseLLM, ensemble, merge, domain expert) with a legend;
- an error bar is drawn only where an interval exists (95% bootstrap interval of `harness.stats`), never a 0
  error bar for a missing one; lm-eval's standard error is a secondary grey mark;
- a missing value has no bar and reads "n/a";
- overlaid loss curves differ in line style and marker as well as colour, with a legend.
`*_figure` functions return the matplotlib Figure (tests inspect it); `plot_*` save it as PNG.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

MISSING = "n/a"
INTERVAL_LABEL = "95% bootstrap interval"
STDERR_LABEL = "lm-eval ±1 se"
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return out


def is_bpb(column: str) -> bool:
    """Bits-per-byte scores (`bpb_<domain>`, `bpb_avg`, `<model>/bpb_avg`): lower is better, never from 0."""
    return str(column).rsplit("/", 1)[-1].startswith("bpb")


def method_color(method: str) -> str:
    """The colour of a method kind: `C<i>` for its position in `harness.report.METHOD_ORDER`."""
    from harness.report import _method_rank

    return f"C{_method_rank(method)}"


def axis_limits(values: Sequence[float], lows: Sequence[float] = (), highs: Sequence[float] = (), *,
                from_zero: bool) -> tuple[float, float]:
    """Value-axis limits covering every finite value and interval end, padded by 10% of their span (by 1% of
    the largest magnitude, at least 0.01, when all are equal). `from_zero` (fractions): the axis starts at 0.
    (0, 1) when nothing is finite."""
    pts = np.asarray([*values, *lows, *highs], dtype=float)
    pts = pts[np.isfinite(pts)]
    if not len(pts):
        return 0.0, 1.0
    lo, hi = (min(0.0, pts.min()) if from_zero else pts.min()), pts.max()
    span = hi - lo
    pad = 0.1 * span if span > 0 else max(0.01 * abs(hi), 0.01)
    return (lo if from_zero else lo - pad), hi + pad


def _interval(intervals: pd.DataFrame | None, rows: Sequence[str], score: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row the interval's (lo, hi) from an `INTERVAL_COLUMNS` frame (model, score, lo, hi); NaN if none."""
    lo, hi = np.full(len(rows), np.nan), np.full(len(rows), np.nan)
    if intervals is None or not len(intervals) or not {"model", "score", "lo", "hi"} <= set(intervals.columns):
        return lo, hi
    mine = intervals[intervals["score"] == score].drop_duplicates("model", keep="last").set_index("model")
    for i, row in enumerate(rows):
        if row in mine.index:
            lo[i], hi[i] = float(mine.at[row, "lo"]), float(mine.at[row, "hi"])
    return lo, hi


def draw_bars(ax, labels: Sequence[str], values: Sequence[float], colors: Sequence[str], *,
              lo: Sequence[float] | None = None, hi: Sequence[float] | None = None,
              stderr: Sequence[float] | None = None, from_zero: bool, extra: Sequence[float] = ()) -> None:
    """Horizontal bars, first label on top. Missing values (NaN): no bar, "n/a". Error bars (`INTERVAL_LABEL`)
    only on rows whose `lo`/`hi` are both finite; `stderr` (grey, `STDERR_LABEL`) only where finite. Bars start
    at 0 (`from_zero`) or at the left edge of an axis around the data (and `extra` values, e.g. baselines)."""
    n = len(labels)
    v = np.asarray(values, dtype=float)
    lo = np.full(n, np.nan) if lo is None else np.asarray(lo, dtype=float)
    hi = np.full(n, np.nan) if hi is None else np.asarray(hi, dtype=float)
    left, right = axis_limits([*v, *extra], lo, hi, from_zero=from_zero)
    right += 0.15 * (right - left)  # room for the value labels right of the bars
    y = np.arange(n)
    have = np.isfinite(v)
    ax.barh(y[have], v[have] - left, left=left, color=[c for c, h in zip(colors, have) if h], height=0.7)
    ci = have & np.isfinite(lo) & np.isfinite(hi)
    if ci.any():
        ax.errorbar(v[ci], y[ci], xerr=[np.clip(v[ci] - lo[ci], 0, None), np.clip(hi[ci] - v[ci], 0, None)],
                    fmt="none", ecolor="black", elinewidth=1.2, capsize=3, label=INTERVAL_LABEL)
    if stderr is not None:
        se = np.asarray(stderr, dtype=float)
        ok = have & np.isfinite(se)
        if ok.any():
            ax.errorbar(v[ok], y[ok] + 0.22, xerr=se[ok], fmt="none", ecolor="0.55", elinewidth=0.9, capsize=2,
                        label=STDERR_LABEL)
    ends = np.fmax(v, hi)  # a label goes right of its bar and interval
    for i in range(n):
        x = ends[i] if have[i] else left
        ax.text(x + 0.015 * (right - left), y[i], f"{v[i]:.3f}" if have[i] else MISSING, va="center",
                fontsize=7, color="0.15" if have[i] else "0.45")
    ax.set_xlim(left, right)
    ax.set_yticks(y, [str(x) for x in labels], fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)


def _panel_title(col: str) -> tuple[str, str]:
    if is_bpb(col):
        return f"{col} (lower is better)", "bits per byte (axis not from 0)"
    return f"{col} (higher is better)", "score (fraction, 0-1)"


def methods_figure(table: pd.DataFrame, intervals: pd.DataFrame | None = None, stderr: pd.DataFrame | None = None):
    """One panel per suite average and per `bpb_*` column of an `experiment_table` (index = model, column
    `method`): a bar per model coloured by method kind, its 95% interval from `intervals`
    (`harness.stats.INTERVAL_COLUMNS`) where one exists, lm-eval's se of the suite average from `stderr`
    (model x suite, `harness.report.suite_stderr`) as a grey mark. Returns the Figure."""
    plt = _plt()
    from matplotlib.patches import Patch

    panels = [c for c in table.columns if c != "method" and "(%)" not in c and "/" not in c
              and pd.api.types.is_numeric_dtype(table[c])]
    models = [str(m) for m in table.index]
    colors = [method_color(m) for m in table["method"]]
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, (0.3 * len(models) + 1.3) * nrows),
                             squeeze=False, layout="constrained")
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        col = panels[k]
        lo, hi = _interval(intervals, models, col)
        se = None
        if stderr is not None and col in getattr(stderr, "columns", []):
            se = [float(stderr.at[m, col]) if m in stderr.index else float("nan") for m in models]
        draw_bars(ax, models, table[col].astype(float).values, colors, lo=lo, hi=hi, stderr=se,
                  from_zero=not is_bpb(col))
        title, xlabel = _panel_title(col)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        if k % ncols:
            ax.tick_params(labelleft=False)
    kinds = list(dict.fromkeys(str(m) for m in table["method"]))
    handles = [Patch(color=method_color(m), label=m) for m in kinds]
    handles += _mark_handles(fig)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8,
               title="method kind", title_fontsize=8)
    return fig


def _mark_handles(fig) -> list:
    """One legend handle per error-bar kind drawn anywhere in `fig` (interval, lm-eval se)."""
    from matplotlib.lines import Line2D

    labels = {c.get_label() for ax in fig.axes for c in ax.containers}
    return [Line2D([], [], color=color, marker="|", markersize=10, linestyle="-", label=label)
            for label, color in ((INTERVAL_LABEL, "black"), (STDERR_LABEL, "0.55")) if label in labels]


def plot_methods(table: pd.DataFrame, out: Path, stderr: pd.DataFrame | None = None, *,
                 intervals: pd.DataFrame | None = None) -> Path:
    """`methods_figure` saved as PNG at `out`."""
    return _save(methods_figure(table, intervals, stderr), out)


def ema(values: Sequence[float], weight: float) -> np.ndarray:
    """Exponential moving average: s_0 = x_0, s_t = weight * s_{t-1} + (1 - weight) * x_t."""
    out = np.asarray(values, dtype=float).copy()
    for t in range(1, len(out)):
        out[t] = weight * out[t - 1] + (1 - weight) * out[t]
    return out


AUTO_SMOOTHING = 0.8  # EMA weight `losses_figure` uses by default for curves of at least 20 points


def losses_figure(losses: dict[str, list[tuple[int, float]]], smoothing: float | None = None):
    """Training loss (nats/token) per optimizer step, one line per method: its own colour, line style and
    marker (about 12 markers per line, staggered between lines), a legend entry per method. `smoothing` in
    [0, 1): the raw curve faint and its `ema` drawn over it; None: `AUTO_SMOOTHING` when the longest curve has
    20 points or more, else 0. Returns the Figure."""
    plt = _plt()
    curves = {k: sorted(p) for k, p in losses.items() if p}
    if smoothing is None:
        smoothing = AUTO_SMOOTHING if max(map(len, curves.values()), default=0) >= 20 else 0.0
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    for i, (name, pts) in enumerate(curves.items()):
        steps, vals = zip(*pts)
        every = max(1, len(steps) // 12)
        style = dict(color=f"C{i % 10}", linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                     marker=MARKERS[i % len(MARKERS)], markevery=((i * every) // 3 % every, every), markersize=5)
        if smoothing:
            ax.plot(steps, vals, color=style["color"], alpha=0.25, linewidth=0.8)
            vals = ema(vals, smoothing)
        ax.plot(steps, vals, label=name, linewidth=1.4, **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)" + (f", EMA {smoothing:g}" if smoothing else ""))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return fig


def plot_losses(losses: dict[str, list[tuple[int, float]]], out: Path, smoothing: float | None = None) -> Path:
    """`losses_figure` saved as PNG at `out`."""
    return _save(losses_figure(losses, smoothing), out)
