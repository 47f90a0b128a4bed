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
from harness.pipeline import ExperimentResult, _track_result
from harness.report import (
    ablation_table,
    experiment_from_mlflow,
    experiment_table,
    per_task_scores,
    report_main,
    suite_stderr,
    write_report,
)
from harness.tracking import ATTR_OBJECTIVE, ATTR_RUNS, ATTR_SEARCH_SPACE, Tracker

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


def test_experiment_table_orders_rows_and_computes_exact_gains():
    table = experiment_table(RESULTS)
    assert list(table.index) == ["neox-code", "gpt2-arithmetic", "llama-docs", "clm", "fusellm", "ensemble",
                                 "merge:linear"]
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
    assert tasks.loc["fusellm", "micro/arith"] == 0.75  # acc is primary, acc_norm ignored
    assert tasks.loc["llama-docs", "micro/docs_qa"] == 0.5
    assert "perplexity/docs" not in tasks.columns
    se = suite_stderr(EVAL_LONG)
    assert se.loc["fusellm", "micro"] == pytest.approx(0.025, rel=1e-12)  # sqrt(0.03^2 + 0.04^2) / 2
    assert se.loc["llama-docs", "micro"] == pytest.approx(0.05, rel=1e-12)  # sqrt(0.06^2 + 0.08^2) / 2
    table = experiment_table(_result(), per_task=True)
    assert table.loc["fusellm", "micro/docs_qa"] == 0.75 and math.isnan(table.loc["clm", "micro/arith"])


def _result(tmp: Path = Path("/nonexistent")) -> ExperimentResult:
    cfg = validate_config({"name": "report-test", "world": {"kind": "micro"}, "target": {"ref": "micro:llama-docs"},
                           "sources": [{"ref": "micro:llama-docs"}, {"ref": "micro:neox-code"}]})
    metrics = {f"{r.model}/{c}": getattr(r, c) for r in RESULTS.itertuples() for c in ("micro", "bpb_avg")
               if not math.isnan(getattr(r, c))}
    return ExperimentResult(cfg, RESULTS.copy(), EVAL_LONG.copy(), metrics,
                            {"fusellm": [(5, 4.0), (10, 3.5)], "clm": [(5, 4.25), (10, 3.75)]},
                            {"fused": 1.5, "train/fusellm": 2.0}, tmp,
                            stage_times=pd.DataFrame({"stage": ["corpus", "fused", "train/fusellm"],
                                                      "seconds": [0.5, 1.5, 2.0], "cached": [True, False, False]}))


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A finished experiment logged the way the pipeline logs it (its own `_track_result`)."""
    wd = tmp_path_factory.mktemp("report-store")
    tracker = Tracker(None, "report-test", wd)
    result = _result(wd)
    with tracker.run("report-test", tags={"fuselab.kind": "experiment"}) as run:
        tracker.log_config(result.config)
        _track_result(tracker, result, result.config)
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
    assert re.search(r"\| fusellm +\| FuseLLM +\| +0\.75 +\| +2 +\| +1 +\| +1\.5 +\|", text)
    assert "## Relative gain (%)" in text
    assert re.search(r"\| fusellm +\| FuseLLM +\| +50 +\| +25 +\| +20 +\| +14\.3 +\|", text)
    # per task: one row per task, one column per model
    per_task = text[text.index("## Per task"):]
    assert re.search(r"\| task +\| +fusellm +\| +llama-docs +\|", per_task)
    assert re.search(r"\| micro/arith +\| +0\.75 +\| +0\.5 +\|", per_task)
    # stage times come back from MLflow: build times of cached stages too, and their sum
    assert "Sum 4.0 s; built in this run 3.5 s." in text
    assert re.search(r"\| corpus +\| +0\.5 +\| cached +\|", text)
    assert re.search(r"\| train/fusellm +\| +2\.0 +\| built +\|", text)
    for f in ("results.csv", "per_task.csv", "methods.png", "losses.png", "stage_times.csv"):
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
                user_attrs={ATTR_RUNS: [{"seed": seed, "metrics": {"fusellm/micro": value,
                                                                    "fusellm/bpb_avg": 2 - value}}]}))
    return study


def test_ablation_table_mean_and_std_over_seeds():
    ab = ablation_table(_grid_study())
    assert list(ab.columns) == ["fusion.fusion", "n_seeds", "fusellm/micro mean", "fusellm/micro std",
                                "fusellm/bpb_avg mean", "fusellm/bpb_avg std"]
    assert ab["fusion.fusion"].tolist() == ["mince", "avgce"] and ab["n_seeds"].tolist() == [3, 3]
    assert ab["fusellm/micro mean"].tolist() == [0.625, 0.375]  # 0.5 + 0.125, 0.25 + 0.125
    assert ab["fusellm/micro std"].tolist() == [0.125, 0.125]  # sample std of (x, x+0.125, x+0.25)
    assert ab["fusellm/bpb_avg mean"].tolist() == [1.375, 1.625]


def test_study_report_files(tmp_path):
    md = write_report(tmp_path, study=_grid_study())
    text = md.read_text()
    assert "Objective: maximize `fusellm/micro`. Trials: complete 6." in text
    assert re.search(r"\| mince +\| +3 \| 0\.625 ± 0\.12 +\| 1\.375 ± 0\.12 +\|", text)
    for f in ("ablation.csv", "trials.csv", "ablation_heatmap.png", "ablation_bars.png", "importances.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert pd.read_csv(tmp_path / "trials.csv")["seed"].tolist() == [0, 1, 2, 0, 1, 2]
