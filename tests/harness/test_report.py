"""Reports: paper-style tables with exact gains, per-task scores and suite stderr, ablation mean/std over
seeds, plots on disk, and the same tables read back from a real MLflow store (`fuselab report RUN`)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution

from harness.config import validate_config
from harness.results import ExperimentResult
from harness.runlog import track_result
from harness.report import experiment_from_mlflow, experiment_table, per_task_scores, suite_stderr
from harness.tracking import Tracker
from studies.attrs import ATTR_OBJECTIVE, ATTR_RUNS, ATTR_SEARCH_SPACE
from studies.report import ablation_table, report_main, write_study_report

# The pipeline's row order (sources incl. the target, then baselines); bpb values are exact binary fractions.
RESULTS = pd.DataFrame({
    "model": ["llama-docs", "neox-code", "gpt2-arithmetic", "clm", "fusellm", "ensemble", "merge:linear"],
    "method": ["target", "source", "source", "CLM-only", "FuseLLM", "ensemble", "merge"],
    "micro": [0.5, 0.25, 0.375, 0.625, 0.75, 0.5625, 0.4375],
    "bpb_code": [2.5, 1.5, 3.0, 2.25, 2.0, float("nan"), 2.5],
    "bpb_docs": [1.5, 2.5, 3.0, 1.25, 1.0, float("nan"), 1.5],
    "bpb_avg": [2.0, 2.0, 3.0, 1.75, 1.5, float("nan"), 2.0],
})
EVAL_LONG = pd.DataFrame([
    # model, suite, task, metric, value, stderr, n
    ("fusellm", "micro", "arith", "acc", 0.75, 0.03, 40),
    ("fusellm", "micro", "arith", "acc_norm", 0.5, 0.05, 40),
    ("fusellm", "micro", "docs_qa", "acc", 0.75, 0.04, 40),
    ("llama-docs", "micro", "arith", "acc", 0.5, 0.06, 40),
    ("llama-docs", "micro", "docs_qa", "acc", 0.5, 0.08, 40),
    ("fusellm", "perplexity", "docs", "bits_per_byte", 1.0, float("nan"), 3),
], columns=["model", "suite", "task", "metric", "value", "stderr", "n"])


def test_experiment_table_keeps_the_contestant_order_and_computes_exact_gains():
    table = experiment_table(RESULTS)
    assert list(table.index) == list(RESULTS["model"])  # the plan's contestant order, never re-sorted by name
    assert list(table.columns[:5]) == ["method", "micro", "bpb_code", "bpb_docs", "bpb_avg"]
    f = table.loc["fusellm"]
    assert f["micro vs target (%)"] == pytest.approx(50.0, rel=1e-12)  # (0.75 - 0.5) / 0.5
    assert f["micro vs CLM-only (%)"] == pytest.approx(20.0, rel=1e-12)  # (0.75 - 0.625) / 0.625
    assert f["bpb_avg vs target (%)"] == pytest.approx(25.0, rel=1e-12)  # (2.0 - 1.5) / 2.0, a reduction
    assert f["bpb_avg vs CLM-only (%)"] == pytest.approx(100 * 0.25 / 1.75, rel=1e-12)
    assert table.loc["llama-docs", "micro vs target (%)"] == 0.0
    assert table.loc["neox-code", "micro vs target (%)"] == pytest.approx(-50.0, rel=1e-12)
    assert math.isnan(table.loc["ensemble", "bpb_avg vs target (%)"])


def test_per_task_scores_and_suite_stderr():
    tasks = per_task_scores(EVAL_LONG)
    assert tasks.loc["fusellm", "micro/arith"] == 0.75  # acc is primary (acc_norm: a row of its own in the report)
    assert tasks.loc["llama-docs", "micro/docs_qa"] == 0.5
    assert "perplexity/docs" not in tasks.columns
    se = suite_stderr(EVAL_LONG)
    assert se.loc["fusellm", "micro"] == pytest.approx(0.025, rel=1e-12)  # sqrt(0.03^2 + 0.04^2) / 2
    assert se.loc["llama-docs", "micro"] == pytest.approx(0.05, rel=1e-12)  # sqrt(0.06^2 + 0.08^2) / 2
    table = experiment_table(_result(), per_task=True)
    assert table.loc["fusellm", "micro/docs_qa"] == 0.75 and math.isnan(table.loc["clm", "micro/arith"])


# The micro suite as the pipeline stores it (evaluate's rows): 3 multiple-choice tasks (acc primary, acc_norm
# not) and 3 generation tasks whose exact match goes through the task's "strip" filter; a BBH chain-of-thought
# suite whose answers are read by the "get-answer" filter; lm-eval's group rows. Values are binary fractions.
_MICRO_ROWS = [
    # task, metric, value, primary, level
    ("micro_arithmetic_mc", "acc", 0.25, True, "task"),
    ("micro_arithmetic_mc", "acc_norm", 0.75, False, "task"),
    ("micro_arithmetic_gen", "exact_match_strip", 0.0, True, "task"),
    ("micro_code_mc", "acc", 0.25, True, "task"),
    ("micro_code_mc", "acc_norm", 0.5, False, "task"),
    ("micro_code_gen", "exact_match_strip", 0.0, True, "task"),
    ("micro_docs_mc", "acc", 0.0, True, "task"),
    ("micro_docs_mc", "acc_norm", 0.25, False, "task"),
    ("micro_docs_gen", "exact_match_strip", 0.0, True, "task"),
]
_COT_ROWS = [
    ("fuselab_bbh_cot_navigate", "exact_match_get-answer", 0.5, True, "task"),
    ("fuselab_bbh_cot_snarks", "exact_match_get-answer", 0.25, True, "task"),
    ("fuselab_bbh_cot_web_of_lies", "exact_match_get-answer", 0.0, True, "task"),
    ("fuselab_bbh_cot", "exact_match_get-answer", 0.25, False, "group"),  # lm-eval's aggregate, not a task
]
SUITES_LONG = pd.DataFrame(
    [("fusellm", "micro", t, m, v, 0.125, 4, "", p, lvl) for t, m, v, p, lvl in _MICRO_ROWS]
    + [("fusellm", "bbh", t, m, v, 0.125, 4, "", p, lvl) for t, m, v, p, lvl in _COT_ROWS]
    + [("fusellm", "perplexity", "docs", "bits_per_byte", 2.0, float("nan"), 40, "", float("nan"), float("nan"))],
    columns=["model", "suite", "task", "metric", "value", "stderr", "n", "note", "primary", "level"])


@pytest.mark.parametrize("stored", ["with primary/level columns", "written before those columns"])
def test_suite_average_counts_generation_filtered_and_cot_tasks(stored):
    from harness.pipeline import summarize

    long = SUITES_LONG if stored.startswith("with") else SUITES_LONG.drop(columns=["primary", "level"])
    row = summarize(long, ["fusellm"]).iloc[0]
    # (0.25 + 0 + 0.25 + 0 + 0 + 0) / 6 = 0.0833..., not (0.25 + 0.25 + 0) / 3 over the multiple-choice tasks
    assert row["micro"] == pytest.approx(0.5 / 6, rel=1e-12)
    assert row["bbh"] == pytest.approx(0.25, rel=1e-12)  # (0.5 + 0.25 + 0) / 3, the group row not counted
    assert row["bpb_docs"] == 2.0 and row["bpb_avg"] == 2.0
    tasks = per_task_scores(long)
    assert sorted(tasks.columns) == sorted(
        ["micro/micro_arithmetic_mc", "micro/micro_arithmetic_gen", "micro/micro_code_mc", "micro/micro_code_gen",
         "micro/micro_docs_mc", "micro/micro_docs_gen", "bbh/fuselab_bbh_cot_navigate", "bbh/fuselab_bbh_cot_snarks",
         "bbh/fuselab_bbh_cot_web_of_lies"])
    assert tasks.loc["fusellm", "micro/micro_code_gen"] == 0.0
    assert tasks.loc["fusellm", "micro/micro_arithmetic_mc"] == 0.25  # acc, not acc_norm
    assert tasks.loc["fusellm", "bbh/fuselab_bbh_cot_navigate"] == 0.5
    se = suite_stderr(long)  # sqrt(6 * 0.125^2) / 6 over all six tasks
    assert se.loc["fusellm", "micro"] == pytest.approx(0.125 / math.sqrt(6), rel=1e-12)


# Intervals and paired tests as the pipeline computes them (harness.stats), values chosen by hand.
INTERVALS = pd.DataFrame([
    # model, score, estimate, lo, hi, n, n_strata, lmeval_stderr
    ("fusellm", "micro", 0.75, 0.625, 0.875, 80, 2, 0.025),
    ("fusellm", "bpb_avg", 1.5, 1.25, 1.75, 6, 2, float("nan")),
    ("llama-docs", "micro", 0.5, 0.375, 0.625, 80, 2, 0.05),
    ("clm", "micro", 0.625, 0.5, 0.75, 80, 2, 0.04),
], columns=["model", "score", "estimate", "lo", "hi", "n", "n_strata", "lmeval_stderr"])
COMPARISONS = pd.DataFrame([
    # model, reference, reference_model, score, difference, lo, hi, p_value, exact, mark, n
    ("fusellm", "target", "llama-docs", "micro", 0.25, 0.125, 0.375, 0.004, False, "**", 80),
    ("fusellm", "CLM-only", "clm", "micro", 0.125, -0.0625, 0.25, 0.25, False, "", 80),
    ("fusellm", "CLM-only", "clm", "bpb_avg", -0.25, -0.5, -0.125, 0.03125, True, "*", 6),
], columns=["model", "reference", "reference_model", "score", "difference", "lo", "hi", "p_value", "exact", "mark",
            "n"])

# Fusion diagnostics in the long form of harness.stages.diagnostics (one source, one domain, and "all"), by hand.
DIAGNOSTICS = pd.DataFrame([
    # source, domain, figure, value, n
    *[("neox-code", dom, f, v, 8) for dom in ("code", "all") for f, v in (
        ("share_not_one_to_one", 0.5), ("share_token_mismatch", 0.125), ("share_unmapped_ids", 0.0),
        ("share_next_span_differs", 0.125), ("share_usable", 0.25), ("share_carried", 0.375))],
    ("neox-code", "code", "coverage", 0.5, 3), ("neox-code", "code", "target_coverage", 1.0, 3),
    ("neox-code", "code", "mass_kept", 0.875, 3), ("neox-code", "code", "teacher_nll", 1.5, 2),
    ("neox-code", "code", "target_nll", 2.5, 2), ("neox-code", "code", "mix_gain_nats", -0.125, 3),
    ("neox-code", "code", "topk_mass", 0.75, 8), ("llama-docs", "code", "topk_mass", 0.5, 9),
    ("llama-docs", "code", "picked", 1, 4), ("llama-docs", "code", "mean_weight", 0.25, 4),
    ("neox-code", "code", "picked", 3, 4), ("neox-code", "code", "mean_weight", 0.75, 4),
], columns=["source", "domain", "figure", "value", "n"])


def test_diagnostics_pivot_one_row_per_model_and_domain():
    from harness.report import diagnostics_table

    t = diagnostics_table(DIAGNOSTICS)
    assert list(t.index) == [("neox-code", "code"), ("neox-code", "all"), ("llama-docs", "code")]
    assert list(t.columns[:6]) == ["positions", "usable", "next span differs", "not 1-1", "token mismatch",
                                   "unmapped ids"]
    row = t.loc[("neox-code", "code")]
    assert (row["positions"], row["coverage"], row["teacher nats"], row["target nats"], row["mix gain"]) == \
        (8, 0.5, 1.5, 2.5, -0.125)
    assert row["picked"] == 0.75 and t.loc[("llama-docs", "code"), "picked"] == 0.25  # 3 and 1 of 4 documents
    assert t.loc[("llama-docs", "code"), "top-k mass"] == 0.5 and math.isnan(t.loc[("llama-docs", "code"), "usable"])
    assert math.isnan(t.loc[("neox-code", "all"), "coverage"])  # not in the long table: missing, not zero


def test_uncertainty_and_comparison_tables():
    from harness.report import ExperimentData, comparison_table, uncertainty_table

    data = ExperimentData("x", RESULTS, EVAL_LONG, intervals=INTERVALS, comparisons=COMPARISONS)
    t = uncertainty_table(data)
    assert list(t.columns) == ["method", "micro (n=80)", "micro lm-eval se", "bpb_code", "bpb_docs",
                               "bpb_avg (n=6)"]
    assert t.loc["fusellm", "micro (n=80)"] == "0.75 [0.625, 0.875]*"  # vs target p = 0.004; vs CLM-only 0.25
    assert t.loc["fusellm", "bpb_avg (n=6)"] == "1.5 [1.25, 1.75]†"  # vs CLM-only p = 0.031
    assert t.loc["fusellm", "micro lm-eval se"] == "0.025"
    assert t.loc["neox-code", "micro (n=80)"] == "0.25"  # no interval: the value alone
    assert t.loc["ensemble", "bpb_avg (n=6)"] == ""  # missing stays missing
    c = comparison_table(data)
    assert list(c.index) == [("fusellm", "target (llama-docs)"), ("fusellm", "CLM-only (clm)")]
    assert c.loc[("fusellm", "target (llama-docs)"), "micro"] == "+0.25 [+0.125, +0.375] p=0.004**"
    assert c.loc[("fusellm", "CLM-only (clm)"), "bpb_avg"] == "-0.25 [-0.5, -0.125] p=0.031*"
    assert c.loc[("fusellm", "target (llama-docs)"), "bpb_avg"] == ""



def test_report_states_the_windows_of_its_bits_per_byte(tmp_path):
    from harness.report import ExperimentData, bpb_windows_line, write_report

    rolling = "lm-eval rolling windows (max length 512)"
    labelled = EVAL_LONG.assign(windows=[None] * 5 + [rolling])
    assert bpb_windows_line(labelled) == [f"Bits per byte scored with {rolling}.\n"]
    # results from before the column: every figure then came from FuseLab's strided windows
    assert bpb_windows_line(EVAL_LONG) == ["Bits per byte scored with FuseLab strided windows (window and stride "
                                           "not recorded).\n"]
    assert bpb_windows_line(EVAL_LONG[EVAL_LONG["suite"] != "perplexity"]) == []
    text = write_report(tmp_path, ExperimentData("x", RESULTS, labelled)).read_text()
    table_end = text.index("| merge:linear")
    assert text.index(f"Bits per byte scored with {rolling}.") > table_end > text.index("## Results")
    assert text.index(f"Bits per byte scored with {rolling}.") < text.index("## Relative gain")

def _result(tmp: Path = Path("/nonexistent")) -> ExperimentResult:
    cfg = validate_config({"name": "report-test", "world": {"kind": "micro"}, "target": {"ref": "micro:llama-docs"},
                           "sources": [{"ref": "micro:llama-docs"}, {"ref": "micro:neox-code"}]})
    metrics = {f"{r.model}/{c}": getattr(r, c) for r in RESULTS.itertuples() for c in ("micro", "bpb_avg")
               if not math.isnan(getattr(r, c))}
    return ExperimentResult(cfg, RESULTS.copy(), EVAL_LONG.copy(), metrics,
                            {"fusellm": [(5, 4.0), (10, 3.5)], "clm": [(5, 4.25), (10, 3.75)]},
                            {"fused": 1.5, "train/fusellm": 2.0}, tmp,
                            stage_times=pd.DataFrame({"stage": ["corpus", "fused", "train/fusellm"],
                                                      "seconds": [0.5, 1.5, 2.0], "cached": [True, False, False]}),
                            intervals=INTERVALS.copy(), comparisons=COMPARISONS.copy(),
                            diagnostics=DIAGNOSTICS.copy())


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A finished experiment logged the way the pipeline logs it (harness.runlog.track_result of its saved
    results folder)."""
    wd = tmp_path_factory.mktemp("report-store")
    tracker = Tracker(None, "report-test", wd)
    result = _result(wd / "run")
    result.save(result.run_dir)
    with tracker.run("report-test", tags={"fuselab.kind": "experiment"}) as run:
        tracker.log_config(result.config)
        track_result(tracker, result, contestants=[])
    return wd, tracker, run.info.run_id, result


def test_table_from_mlflow_matches_the_stored_metrics(logged_run):
    wd, tracker, run_id, result = logged_run
    data = experiment_from_mlflow(MlflowClient(tracker.uri), run_id)
    from_store = experiment_table(data)
    in_memory = experiment_table(result)
    pd.testing.assert_frame_equal(from_store, in_memory[from_store.columns], check_exact=True)
    assert data.losses == {"fusellm": [(5, 4.0), (10, 3.5)], "clm": [(5, 4.25), (10, 3.75)]}
    # every number of the table is the metric MLflow holds for that model's run
    children = MlflowClient(tracker.uri).search_runs([tracker.experiment_id],
                                                     f"tags.mlflow.parentRunId = '{run_id}'")
    stored = {r.data.tags["fuselab.model"]: r.data.metrics for r in children}
    for model, row in from_store.iterrows():
        for col in ("micro", "bpb_avg"):
            if not math.isnan(row[col]):
                assert stored[model][col] == row[col]


def test_report_main_on_run_id_and_experiment_name(logged_run, tmp_path):
    wd, tracker, run_id, _ = logged_run
    md = report_main(run_id, wd, tmp_path / "by-id")
    text = md.read_text()
    # the results with intervals and marks, read back from the run's artifacts
    assert re.search(r"\| fusellm +\| FuseLLM +\| 0\.75 \[0\.625, 0\.875\]\* +\| +0\.025 +\| +2 +\| +1 +\| "
                     r"1\.5 \[1\.25, 1\.75\]† +\|", text)
    assert "## Paired tests" in text and "+0.25 [+0.125, +0.375] p=0.004**" in text
    assert "## Relative gain (%)" in text
    assert re.search(r"\| fusellm +\| FuseLLM +\| +50 +\| +25 +\| +20 +\| +14\.3 +\|", text)
    # per task: one row per task, one column per model
    per_task = text[text.index("## Per task"):]
    assert re.search(r"\| task +\| +fusellm +\| +llama-docs +\|", per_task)
    assert re.search(r"\| micro/arith +\| +0\.75 ± 0\.03 \(40\) +\| +0\.5 ± 0\.06 \(40\) +\|", per_task)
    # acc_norm beside acc, on the next row; llama-docs has none
    assert re.search(r"\| micro/arith \(acc_norm\) +\| +0\.5 ± 0\.05 \(40\) +\| +\|", per_task)
    assert per_task.index("micro/arith (acc_norm)") < per_task.index("micro/docs_qa")
    # the fusion diagnostics come back from the run's results folder, as a pivot with its reading guide
    diag = text[text.index("## Fusion diagnostics"):text.index("## Stage times")]
    assert "**alignment**" in diag and "**vocabulary map**" in diag and "**truncation**" in diag
    assert re.search(r"\| neox-code +\| code +\| +8 +\| +0\.25 +\| +0\.125 +\| +0\.5 +\| +0\.125 +\| +0 +\| +0\.5 +\| "
                     r"+1 +\| +1\.5 +\| +2\.5 +\| +-0\.125 +\| +0\.75 +\| +0\.75 +\| +0\.75 +\|", diag)
    # stage times come back from MLflow: build times of cached stages too, and their sum
    assert "Sum 4.0 s; built in this run 3.5 s." in text
    assert re.search(r"\| corpus +\| +0\.5 +\| cached +\|", text)
    assert re.search(r"\| train/fusellm +\| +2\.0 +\| built +\|", text)
    for f in ("results.csv", "per_task.csv", "methods.png", "losses.png", "stage_times.csv", "results_ci.csv",
              "comparisons.csv", "intervals.csv", "diagnostics.csv"):
        assert (tmp_path / "by-id" / f).stat().st_size > 0
    saved = pd.read_csv(tmp_path / "by-id" / "results.csv", index_col="model")
    assert saved.loc["fusellm", "micro vs target (%)"] == pytest.approx(50.0)
    arts = {a.path for a in MlflowClient(tracker.uri).list_artifacts(run_id, "report")}
    assert {"report/report.md", "report/methods.png", "report/results.csv"} <= arts
    md2 = report_main("report-test", wd, tmp_path / "by-name")
    assert md2.read_text() == text
    with pytest.raises(ValueError, match="not a study spec file, not a run id .* not an MLflow experiment name"):
        report_main("no-such-thing", wd, tmp_path / "x")


def _grid_study() -> optuna.Study:
    """2 settings x 3 seeds, recorded as the runner records them."""
    study = optuna.create_study(direction="maximize", study_name="grid")
    study.set_user_attr(ATTR_OBJECTIVE, {"metric": "fusellm/micro", "direction": "maximize"})
    study.set_user_attr(ATTR_SEARCH_SPACE, ["fusion.fusion"])
    dists = {"fusion.fusion": CategoricalDistribution(["mince", "avgce"]), "seed": CategoricalDistribution([0, 1, 2])}
    for fusion, base in (("mince", 0.5), ("avgce", 0.25)):
        for seed in (0, 1, 2):
            value = base + 0.125 * seed
            study.add_trial(optuna.create_trial(
                params={"fusion.fusion": fusion, "seed": seed}, distributions=dists, value=value,
                user_attrs={ATTR_RUNS: [{"seed": seed, "metrics": {
                    "fusellm/micro": value, "fusellm/bpb_avg": 2 - value,
                    # the baselines: the same in every setting of a seed
                    "llama-docs/micro": 0.25, "llama-docs/bpb_avg": 2.0,
                    "clm/micro": 0.375 + 0.125 * seed, "clm/bpb_avg": 1.75},
                    "methods": {"llama-docs": "target", "clm": "CLM-only", "fusellm": "FuseLLM"}}]}))
    return study


# t quantile (0.975, 2 degrees of freedom) = 4.3027 (tables): 3 seeds with sample std 0.125 give
# mean -+ 4.3027 * 0.125 / sqrt(3) = mean -+ 0.31052
T_HALF = 4.3027 * 0.125 / math.sqrt(3)


def test_ablation_table_mean_and_std_over_seeds():
    ab = ablation_table(_grid_study())
    assert list(ab.columns) == ["fusion.fusion", "n_seeds", "fusellm/micro mean", "fusellm/micro std",
                                "fusellm/micro lo", "fusellm/micro hi", "fusellm/bpb_avg mean",
                                "fusellm/bpb_avg std", "fusellm/bpb_avg lo", "fusellm/bpb_avg hi"]
    assert ab["fusellm/micro lo"].tolist() == pytest.approx([0.625 - T_HALF, 0.375 - T_HALF], rel=1e-4)
    assert ab["fusellm/micro hi"].tolist() == pytest.approx([0.625 + T_HALF, 0.375 + T_HALF], rel=1e-4)
    assert ab["fusion.fusion"].tolist() == ["mince", "avgce"] and ab["n_seeds"].tolist() == [3, 3]
    assert ab["fusellm/micro mean"].tolist() == [0.625, 0.375]  # 0.5 + 0.125, 0.25 + 0.125
    assert ab["fusellm/micro std"].tolist() == [0.125, 0.125]  # sample std of (x, x+0.125, x+0.25)
    assert ab["fusellm/bpb_avg mean"].tolist() == [1.375, 1.625]


def test_ablation_baselines_over_the_same_seeds():
    from studies.report import ablation_baselines

    base = ablation_baselines(_grid_study()).set_index("method")
    assert list(base.index) == ["target", "CLM-only"] and list(base.model) == ["llama-docs", "clm"]
    assert list(base.n_seeds) == [3, 3]  # each seed once, although 2 settings ran it
    assert base.loc["target", "fusellm/micro mean"] == 0.25 and base.loc["target", "fusellm/micro std"] == 0.0
    assert base.loc["target", "fusellm/micro lo"] == base.loc["target", "fusellm/micro hi"] == 0.25
    assert base.loc["CLM-only", "fusellm/micro mean"] == 0.5  # 0.375, 0.5, 0.625
    assert base.loc["CLM-only", "fusellm/micro hi"] == pytest.approx(0.5 + T_HALF, rel=1e-4)
    assert base.loc["CLM-only", "fusellm/bpb_avg mean"] == 1.75


def test_study_report_files(tmp_path):
    md = write_study_report(_grid_study(), tmp_path)
    text = md.read_text()
    assert "Objective: maximize `fusellm/micro`. Trials: complete 6." in text
    # mean [lo, hi] over seeds: 0.625 -+ 0.31052, bpb 1.375 -+ 0.31052
    assert re.search(r"\| mince +\| +3 \| 0\.625 \[0\.314, 0\.936\] +\| 1\.375 \[1\.06, 1\.69\] +\|", text)
    assert re.search(r"\| target \(llama-docs\) +\| +3 \| 0\.25 \[0\.25, 0\.25\] +\| 2 \[2, 2\] +\|", text)
    assert re.search(r"\| CLM-only \(clm\) +\| +3 \| 0\.5 \[0\.189, 0\.811\] +\|", text)
    assert (tmp_path / "ablation_baselines.csv").stat().st_size > 0
    for f in ("ablation.csv", "trials.csv", "ablation_heatmap.png", "ablation_bars.png", "importances.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert pd.read_csv(tmp_path / "trials.csv")["seed"].tolist() == [0, 1, 2, 0, 1, 2]


def test_diagnostics_table_saved_and_loaded_with_the_results(tmp_path):
    from harness.stages.diagnostics import read_diagnostics

    result = _result(tmp_path)
    result.save(tmp_path)
    back = ExperimentResult.load(tmp_path)
    pd.testing.assert_frame_equal(back.diagnostics, DIAGNOSTICS, check_dtype=False)
    (tmp_path / "diagnostics.csv").unlink()  # results written before the diagnostics existed
    old = ExperimentResult.load(tmp_path).diagnostics
    assert list(old.columns) == ["source", "domain", "figure", "value", "n"] and not len(old)
    assert list(read_diagnostics(None).columns) == list(old.columns) and not len(read_diagnostics(tmp_path))
