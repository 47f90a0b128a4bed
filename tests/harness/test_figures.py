"""Report figures as a reader sees them: the matplotlib objects `harness.figures` and `studies.report` build
(axis limits, bars, error bars, "n/a" marks, legends, loss-curve styles), checked against values worked out by
hand from the rules in `harness.figures`' docstring."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from harness.figures import INTERVAL_LABEL, MISSING, STDERR_LABEL, axis_limits, ema, losses_figure, methods_figure
from harness.report import experiment_table
from studies.report import ablation_bars_figure, ablation_heatmap_figure

NAN = float("nan")
# Rows in the order experiment_table puts them (sources, target, CLM-only, FuseLLM, ensemble, merge).
RESULTS = pd.DataFrame({
    "model": ["neox-code", "gpt2-arithmetic", "llama-docs", "clm", "fusellm", "ensemble", "merge:linear"],
    "method": ["source", "source", "target", "CLM-only", "FuseLLM", "ensemble", "merge"],
    "micro": [0.25, 0.375, 0.5, 0.625, 0.75, 0.5625, 0.4375],
    "bpb_avg": [2.0, 3.0, 2.0, 1.75, 1.5, NAN, 2.0],
})
ROW = {m: i for i, m in enumerate(RESULTS["model"])}  # y position of each model's bar (first on top)
# Bootstrap intervals (harness.stats.INTERVAL_COLUMNS) for clm and fusellm only; the ensemble's micro interval
# could not be computed (NaN ends) and must draw nothing.
INTERVALS = pd.DataFrame([
    ("clm", "micro", 0.625, 0.5, 0.75, 40, 2, NAN),
    ("fusellm", "micro", 0.75, 0.625, 0.875, 40, 2, NAN),
    ("ensemble", "micro", 0.5625, NAN, NAN, 0, 0, NAN),
    ("clm", "bpb_avg", 1.75, 1.625, 1.875, 20, 2, NAN),
    ("fusellm", "bpb_avg", 1.5, 1.25, 1.625, 20, 2, NAN),
], columns=["model", "score", "estimate", "lo", "hi", "n", "n_strata", "lmeval_stderr"])


def _panel(fig, title_start: str):
    (ax,) = [a for a in fig.axes if a.get_title().startswith(title_start)]
    return ax


def _bars(ax) -> dict[float, tuple[float, float]]:
    """y centre -> (left, right) of every bar drawn."""
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    return {p.get_y() + p.get_height() / 2: (p.get_x(), p.get_x() + p.get_width()) for p in bars.patches}


def _error_bars(ax, label: str) -> dict[float, tuple[float, float]]:
    """y -> (x low, x high) of each error bar of the given legend label ({} when none was drawn)."""
    found = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.get_label() == label]
    if not found:
        return {}
    (segments,) = [lc.get_segments() for lc in found[0].lines[2]]
    return {float(s[0][1]): (float(s[0][0]), float(s[1][0])) for s in segments}


def _texts_at(ax, y: float) -> list[str]:
    return [t.get_text() for t in ax.texts if t.get_position()[1] == pytest.approx(y)]


@pytest.fixture(scope="module")
def figure():
    fig = methods_figure(experiment_table(RESULTS), INTERVALS)
    yield fig
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_bpb_axis_is_around_the_data_and_labelled(figure):
    ax = _panel(figure, "bpb_avg")
    # finite values and interval ends span 1.25 (fusellm lo) .. 3.0 (gpt2): span 1.75, pad 0.175;
    # left = 1.075, right = 3.175 + 15% of (3.175 - 1.075) for the value labels = 3.49
    assert ax.get_xlim() == pytest.approx((1.075, 3.49), abs=1e-12)
    assert ax.get_xlim()[0] > 0
    assert "bits per byte" in ax.get_xlabel() and "not from 0" in ax.get_xlabel()
    assert "lower is better" in ax.get_title()
    # every bar starts at the axis edge and ends at its value
    assert _bars(ax)[ROW["fusellm"]] == pytest.approx((1.075, 1.5), abs=1e-12)
    assert _bars(ax)[ROW["gpt2-arithmetic"]] == pytest.approx((1.075, 3.0), abs=1e-12)


def test_accuracy_axis_starts_at_zero(figure):
    ax = _panel(figure, "micro")
    # 0 .. 0.875 (fusellm hi), pad 0.0875 -> 0.9625; + 15% for labels = 1.106875
    assert ax.get_xlim() == pytest.approx((0.0, 1.106875), abs=1e-12)
    assert _bars(ax)[ROW["neox-code"]] == pytest.approx((0.0, 0.25), abs=1e-12)


def test_equal_values_look_equal_and_close_values_differ():
    same = axis_limits([2.59, 2.59], from_zero=False)
    assert same == pytest.approx((2.59 - 0.0259, 2.59 + 0.0259), abs=1e-12)  # 1% of the value each side
    table = pd.DataFrame({"method": ["target", "FuseLLM"], "bpb_avg": [2.59, 2.60]}, index=["a", "b"])
    ax = methods_figure(table).axes[0]
    bars = _bars(ax)
    # span 0.01, pad 0.001: left 2.589, bar widths 0.001 and 0.011 (11x apart; from 0 they would be 2.59 vs 2.60)
    assert bars[1][1] - bars[1][0] == pytest.approx(11 * (bars[0][1] - bars[0][0]), rel=1e-6)


def test_missing_value_has_no_bar_and_reads_na(figure):
    ax = _panel(figure, "bpb_avg")
    bars = _bars(ax)
    assert ROW["ensemble"] not in bars and len(bars) == 6
    assert _texts_at(ax, ROW["ensemble"]) == [MISSING]
    assert _texts_at(ax, ROW["fusellm"]) == ["1.500"]
    micro = _panel(figure, "micro")
    assert len(_bars(micro)) == 7 and MISSING not in [t.get_text() for t in micro.texts]


def test_error_bars_only_where_an_interval_exists(figure):
    micro = _error_bars(_panel(figure, "micro"), INTERVAL_LABEL)
    assert micro == {ROW["clm"]: pytest.approx((0.5, 0.75)), ROW["fusellm"]: pytest.approx((0.625, 0.875))}
    bpb = _error_bars(_panel(figure, "bpb_avg"), INTERVAL_LABEL)
    assert bpb == {ROW["clm"]: pytest.approx((1.625, 1.875)), ROW["fusellm"]: pytest.approx((1.25, 1.625))}
    assert _error_bars(_panel(figure, "micro"), STDERR_LABEL) == {}


def test_no_intervals_no_error_bars_and_lmeval_se_is_secondary():
    table = experiment_table(RESULTS)
    stderr = pd.DataFrame({"micro": [0.03]}, index=["fusellm"])
    fig = methods_figure(table, None, stderr)
    micro = _panel(fig, "micro")
    assert _error_bars(micro, INTERVAL_LABEL) == {}
    # lm-eval's se of fusellm only, drawn 0.22 below the bar's centre line, 0.75 +- 0.03
    assert _error_bars(micro, STDERR_LABEL) == {ROW["fusellm"] + 0.22: pytest.approx((0.72, 0.78))}
    assert _error_bars(_panel(fig, "bpb_avg"), STDERR_LABEL) == {}
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert STDERR_LABEL in labels and INTERVAL_LABEL not in labels


def test_legend_names_every_method_kind_and_the_interval(figure):
    (legend,) = figure.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["source", "target", "CLM-only", "FuseLLM", "ensemble", "merge", INTERVAL_LABEL]
    colors = {t.get_text(): h.get_facecolor() for t, h in zip(legend.get_texts()[:6], legend.legend_handles)}
    ax = _panel(figure, "micro")
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    by_y = {p.get_y() + p.get_height() / 2: p.get_facecolor() for p in bars.patches}
    assert by_y[ROW["fusellm"]] == colors["FuseLLM"] and by_y[ROW["neox-code"]] == colors["source"]
    assert by_y[ROW["gpt2-arithmetic"]] == colors["source"] != colors["target"]


def test_overlaid_loss_curves_differ_in_style_and_have_a_legend():
    same = [(1, 2.0), (2, 1.5), (3, 1.25)]
    fig = losses_figure({"fusellm": same, "clm": same, "empty": []})
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"fusellm", "clm"}
    assert lines["fusellm"].get_linestyle() != lines["clm"].get_linestyle()
    assert lines["fusellm"].get_marker() != lines["clm"].get_marker()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fusellm", "clm"]
    assert "nats/token" in ax.get_ylabel() and "EMA" not in ax.get_ylabel()  # 3 points: no smoothing


def test_long_loss_curves_are_smoothed_over_the_faint_raw_curve():
    pts = [(s, 2.0 if s % 2 else 1.0) for s in range(30)]
    ax = losses_figure({"clm": pts}).axes[0]
    raw, smooth = ax.lines
    assert list(raw.get_ydata()) == [v for _, v in pts] and raw.get_alpha() == 0.25
    assert smooth.get_label() == "clm" and "EMA 0.8" in ax.get_ylabel()
    # s_0 = 1, s_1 = 0.8 * 1 + 0.2 * 2 = 1.2, s_2 = 0.8 * 1.2 + 0.2 * 1 = 1.16
    assert list(smooth.get_ydata()[:3]) == pytest.approx([1.0, 1.2, 1.16])
    assert list(ema([4.0, 0.0], 0.5)) == [4.0, 2.0]


# An ablation over 3 settings: two with 3 seeds (Student-t interval), one with a single seed (no interval);
# a fourth setting whose runs lack the metric.
ABLATION = pd.DataFrame({
    "fusion": ["min_ce", "avg_ce", "avg_ce", "min_ce"],
    "align": ["dtw", "dtw", "offsets", "offsets"],
    "n_seeds": [3, 3, 1, 2],
    "fusellm/bpb_avg mean": [2.5, 2.25, 2.75, NAN],
    "fusellm/bpb_avg std": [0.125, 0.25, NAN, NAN],
    "fusellm/bpb_avg lo": [2.25, 2.0, NAN, NAN],
    "fusellm/bpb_avg hi": [2.75, 2.5, NAN, NAN],
})
BASELINES = pd.DataFrame({
    "method": ["target", "CLM-only"], "model": ["llama-docs", "clm"], "n_seeds": [3, 3],
    "fusellm/bpb_avg mean": [3.0, 2.625], "fusellm/bpb_avg lo": [2.875, NAN], "fusellm/bpb_avg hi": [3.125, NAN],
})
RUNS = pd.DataFrame({"fusion": ["min_ce", "min_ce", "avg_ce"], "align": ["dtw", "dtw", "offsets"],
                     "seed": [0, 1, 0], "fusellm/bpb_avg": [2.375, 2.625, 2.75]})


def test_ablation_bars_show_intervals_seeds_and_baselines():
    params = ["fusion", "align"]
    fig = ablation_bars_figure(ABLATION, params, "fusellm/bpb_avg", BASELINES, RUNS)
    ax = fig.axes[0]
    # around the data incl. baselines: 2.0 (avg_ce/dtw lo) .. 3.125 (target hi): pad 0.1125
    left = 2.0 - 0.1125
    assert ax.get_xlim() == pytest.approx((left, 3.2375 + 0.15 * (3.2375 - left)), abs=1e-12)
    assert _error_bars(ax, INTERVAL_LABEL) == {0: pytest.approx((2.25, 2.75)), 1: pytest.approx((2.0, 2.5))}
    assert set(_bars(ax)) == {0, 1, 2} and _texts_at(ax, 3) == [MISSING]
    vlines = {line.get_label(): line.get_xdata()[0] for line in ax.lines if not line.get_label().startswith("_")}
    assert vlines == {"target (llama-docs, 3 seeds)": 3.0, "CLM-only (clm, 3 seeds)": 2.625}
    (seeds,) = ax.collections[-1:]  # one dot per seed on its setting's row
    assert [tuple(p) for p in seeds.get_offsets()] == [(2.375, 0), (2.625, 0), (2.75, 2)]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["FuseLLM, mean over seeds", "95% interval over seeds", "one seed",
                      "target (llama-docs, 3 seeds)", "CLM-only (clm, 3 seeds)"]
    assert "bits per byte" in ax.get_xlabel() and ax.get_xlim()[0] > 0


def test_ablation_heatmap_marks_missing_cells():
    fig = ablation_heatmap_figure(ABLATION, ["fusion", "align"], "fusellm/bpb_avg")
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["2.25\n± 0.25", "2.5\n± 0.12", "2.75", MISSING]
    cells = np.ma.filled(fig.axes[0].images[0].get_array().astype(float), np.nan)
    assert np.isnan(cells[0, 1]) and cells[1, 0] == 2.25  # min_ce x offsets: no colour, no 0
