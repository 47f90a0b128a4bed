"""The study runner on real Optuna (SQLite) and real MLflow (SQLite): a grid over the real micro pipeline,
failing trials, a worker killed with SIGKILL and resumed, two workers on one storage, TPE/random budgets.

Only the robustness tests inject an objective (`study_objectives.py`: exact, fast, controllable);
`test_grid_study_on_the_real_pipeline` runs `harness.pipeline.run_experiment` on the micro world.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import REPO, TINY_PIPELINE
from optuna.trial import TrialState
from study_objectives import expected_micro, failing_on_avgce, fake_experiment, slow_experiment

from harness.config import ConfigError
from studies.report import ablation_table
from harness.tracking import default_tracking_uri
from studies.runner import run_study

HERE = Path(__file__).resolve().parent
GRID_2X2 = {
    "fusion.vocab_map": {"type": "categorical", "choices": ["em", "mined"]},
    "fusion.fusion": {"type": "categorical", "choices": ["mince", "avgce"]},
}


def fast_overrides(wd: Path) -> list[str]:
    # Heartbeat every second, dead after 2 s: a killed worker's trial is detected quickly.
    return [f"workdir={wd}", "study.heartbeat_interval=1", "study.grace_period=2"]


def mlflow_runs(wd: Path, experiment: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(default_tracking_uri(wd))
    return mlflow.search_runs(experiment_names=[experiment])


def setting(t) -> tuple:
    return t.params["fusion.vocab_map"], t.params["fusion.fusion"], t.params.get("seed")


def test_failing_trial_is_recorded_and_the_study_goes_on(write_spec, tmp_path):
    wd = tmp_path / "wd"
    study = run_study(write_spec("failing", search_space=GRID_2X2, seeds=[0]), fast_overrides(wd),
                      objective_fn=failing_on_avgce, progress=False)
    by_setting = {setting(t): t for t in study.trials}
    assert len(study.trials) == 4 and len(by_setting) == 4
    for (vocab, fusion, seed), t in by_setting.items():
        if fusion == "avgce":
            assert t.state == TrialState.FAIL
            assert t.user_attrs["fuselab.error"] == "ValueError: deliberate failure for fusion=avgce"
        else:
            assert t.state == TrialState.COMPLETE and t.value == expected_micro(fusion, vocab, 0)

    runs = mlflow_runs(wd, "failing")
    parent = runs[runs["tags.fuselab.role"] == "study"]
    trials = runs[runs["tags.fuselab.role"] == "trial"]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    assert parent.iloc[0]["metrics.trials_complete"] == 2 and parent.iloc[0]["metrics.trials_fail"] == 2
    assert len(trials) == 4 and set(trials["tags.mlflow.parentRunId"]) == {parent.iloc[0]["run_id"]}
    failed = trials[trials["status"] == "FAILED"]
    assert set(failed["params.fusion.fusion"]) == {"avgce"} and len(failed) == 2
    assert set(failed["tags.fuselab.error"]) == {"ValueError: deliberate failure for fusion=avgce"}
    ok = trials[trials["status"] == "FINISHED"].set_index("params.fusion.vocab_map")
    assert ok.loc["em", "metrics.fusellm/micro"] == 0.5 and ok.loc["mined", "metrics.objective"] == 0.625
    assert (wd / "reports" / "failing" / "report.md").is_file()


def test_random_sampler_budget_runs_every_seed_per_trial(write_spec, tmp_path):
    wd = tmp_path / "wd"
    path = write_spec("rand", search_space=GRID_2X2, sampler="random", n_trials=3, seeds=[0, 1])
    study = run_study(path, fast_overrides(wd), objective_fn=fake_experiment, progress=False)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    for t in study.trials:
        vocab, fusion, _ = setting(t)
        assert [r["seed"] for r in t.user_attrs["fuselab.runs"]] == [0, 1]
        assert t.value == pytest.approx(expected_micro(fusion, vocab, 0) + 0.005, abs=1e-12)  # mean of seeds 0, 1
    ab = ablation_table(study)
    assert set(ab["n_seeds"]) == {2}
    assert ab["fusellm/micro std"].tolist() == pytest.approx([0.01 / 2**0.5] * len(ab))
    # The budget is the study's: a second process finds it spent and runs nothing.
    again = run_study(path, fast_overrides(wd), objective_fn=fake_experiment, progress=False)
    assert len(again.trials) == 3


def test_resuming_with_a_different_spec_is_refused(write_spec, tmp_path):
    wd = tmp_path / "wd"
    run_study(write_spec("same", seeds=[0]), fast_overrides(wd), objective_fn=fake_experiment, progress=False)
    with pytest.raises(ConfigError, match="same.yaml: study 'same' in .* was created from a different spec"):
        run_study(write_spec("same", seeds=[0, 1]), fast_overrides(wd), objective_fn=fake_experiment, progress=False)


def _worker(spec: Path, overrides: list[str], markers: Path, log: Path, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "studies.runner", str(spec), "--objective", "study_objectives:slow_experiment",
           "--quiet", *[x for o in overrides for x in ("-o", o)]]
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)]),
               "FUSELAB_TEST_MARKERS": str(markers), **env}
    return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"worker exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{path.name} never appeared:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def test_killed_study_resumes_and_records_the_killed_trial(write_spec, tmp_path, monkeypatch):
    wd, markers = tmp_path / "wd", tmp_path / "markers"
    spec = write_spec("killed", search_space=GRID_2X2, seeds=[0])
    log = tmp_path / "worker.log"
    proc = _worker(spec, fast_overrides(wd), markers, log, FUSELAB_TEST_SLEEP="2")
    _wait_for(markers / "started-1", proc, log)  # trial 0 is done, trial 1 is mid-way
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    monkeypatch.setenv("FUSELAB_TEST_MARKERS", str(markers))
    monkeypatch.setenv("FUSELAB_TEST_SLEEP", "0.1")
    study = run_study(spec, fast_overrides(wd), objective_fn=slow_experiment, progress=False)
    trials = {t.number: t for t in study.trials}
    assert trials[0].state == TrialState.COMPLETE
    assert trials[1].state == TrialState.FAIL and "fuselab.error" not in trials[1].user_attrs
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == trials[1].params
    complete = [setting(t) for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted((v, f, 0) for v in ("em", "mined") for f in ("mince", "avgce"))
    assert len(study.trials) == 5  # 4 points + the retry of the killed one; nothing ran twice

    runs = mlflow_runs(wd, "killed")
    trial_runs = runs[runs["tags.fuselab.role"] == "trial"].set_index("tags.fuselab.trial")
    assert trial_runs.loc["1", "status"] == "FAILED"
    assert trial_runs.loc["1", "tags.fuselab.error"].endswith("died: no heartbeat for 2 s")
    assert (trial_runs["status"] == "FINISHED").sum() == 4
    assert runs[runs["tags.fuselab.role"] == "study"]["status"].tolist() == ["FINISHED"]


def test_two_workers_share_one_sqlite_study_without_duplicates(write_spec, tmp_path):
    wd, markers = tmp_path / "wd", tmp_path / "markers"
    spec = write_spec("pair", search_space=GRID_2X2, seeds=[0, 1])
    procs = [_worker(spec, fast_overrides(wd), markers, tmp_path / f"w{i}.log", FUSELAB_TEST_SLEEP="0.5",
                     FUSELAB_TEST_WORKERS="2") for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=400) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]

    import optuna

    study = optuna.load_study(study_name="pair", storage=f"sqlite:///{wd.resolve()}/optuna.db")
    assert len(study.trials) == 8 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({setting(t) for t in study.trials}) == 8
    assert len({t.user_attrs["fuselab.worker"] for t in study.trials}) == 2  # both really worked
    runs = mlflow_runs(wd, "pair")
    assert (runs["tags.fuselab.role"] == "trial").sum() == 8
    assert runs[runs["tags.fuselab.role"] == "study"]["status"].tolist() == ["FINISHED"]


@pytest.mark.slow
def test_grid_study_on_the_real_pipeline(write_spec, tmp_path, micro_world):
    wd = tmp_path / "wd"
    path = write_spec("real", search_space=GRID_2X2, seeds=[0])
    study = run_study(path, [f"workdir={wd}", *TINY_PIPELINE], progress=False)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert len({setting(t) for t in study.trials}) == 4

    runs = mlflow_runs(wd, "real")
    parent = runs[runs["tags.fuselab.role"] == "study"]
    trials = runs[runs["tags.fuselab.role"] == "trial"]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    assert len(trials) == 4 and set(trials["tags.mlflow.parentRunId"]) == {parent.iloc[0]["run_id"]}
    assert set(zip(trials["params.fusion.vocab_map"], trials["params.fusion.fusion"])) == {
        (v, f) for v in ("em", "mined") for f in ("mince", "avgce")}
    by_number = {str(t.number): t for t in study.trials}
    for _, row in trials.iterrows():
        t = by_number[row["tags.fuselab.trial"]]
        assert row["metrics.objective"] == t.value == row["metrics.fusellm/micro"]
        assert 0.0 <= t.value <= 1.0 and row["metrics.fusellm/bpb_avg"] > 0
    # Each trial's pipeline run nests under the trial run; later trials reuse the cached prefix stages.
    experiments = runs[runs["tags.fuselab.kind"] == "experiment"]
    assert set(experiments["tags.mlflow.parentRunId"]) == set(trials["run_id"])
    first = min(study.trials, key=lambda t: t.number).user_attrs["fuselab.mlflow_run_id"]
    later = experiments[experiments["tags.mlflow.parentRunId"] != first]
    assert (later["metrics.cache_hits"] > 0).all() and (later["metrics.stages_run"] > 0).all()

    ab = ablation_table(study).set_index(["fusion.vocab_map", "fusion.fusion"])
    for t in study.trials:
        assert ab.loc[(t.params["fusion.vocab_map"], t.params["fusion.fusion"]), "fusellm/micro mean"] == t.value
    assert (wd / "reports" / "real" / "ablation_heatmap.png").stat().st_size > 1000


def test_report_by_name_prefers_the_study_over_its_trials_experiment_runs(write_spec, tmp_path, capsys):
    """The study's MLflow experiment is named like the study and also holds experiment runs (its trials'):
    `fuselab report NAME` must give the study report, and say so."""
    from harness.tracking import Tracker
    from studies.report import report_main

    wd = tmp_path / "wd"
    run_study(write_spec("named", seeds=[0]), fast_overrides(wd), objective_fn=fake_experiment, progress=False)
    tracker = Tracker(None, "named", wd)
    with tracker.run("a trial's experiment", tags={"fuselab.kind": "experiment"}):
        pass
    md = report_main("named", wd, tmp_path / "out").read_text()
    assert md.startswith("# Study named")
    assert "'named' is a study" in capsys.readouterr().out
