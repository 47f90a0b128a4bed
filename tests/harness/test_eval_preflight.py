"""Evaluation problems that used to surface only after all training (issue 19) are found before any stage runs:
suite data missing offline, and MultiPL-E without a code jail."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.config import ConfigError, load_config
from harness.evaluation import sandbox
from harness.pipeline import check_evaluation, run_experiment

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "micro_quickstart.yaml"


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(QUICKSTART, [f"workdir={tmp_path / 'work'}", *overrides])


def test_missing_suite_data_offline_stops_the_run_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FUSELAB_DATA", raising=False)
    empty = tmp_path / "no-data"
    empty.mkdir()
    cfg = _cfg(tmp_path, "evaluation.suites=[micro, bbh]", f"evaluation.data_dir={empty}")
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        run_experiment(cfg, progress=False, track=False)
    assert time.monotonic() - start < 30
    lines = str(err.value).splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("evaluation.suites: bbh: no data for evaluation suite 'bbh': offline")
    assert f"{empty} lacks 54 of 54 files" in lines[0] and "evaluation.data_dir" in lines[0]
    # Nothing was built: no stage folder in the cache, no run folder.
    cache = tmp_path / "work" / "cache"
    assert not cache.exists() or not any(p.is_dir() and not p.name.startswith(".") for p in cache.iterdir())
    assert not (tmp_path / "work" / "runs").exists()


def test_suites_with_their_data_pass(shared_data):
    cfg = load_config(QUICKSTART, ["evaluation.suites=[micro, bbh, commonsense]",
                                   f"evaluation.data_dir={shared_data}"])
    assert check_evaluation(cfg) == []


@pytest.fixture
def fresh_jail_probe():
    sandbox.jail_problem.cache_clear()
    yield
    sandbox.jail_problem.cache_clear()


def test_multipl_e_without_a_jail_is_a_problem_at_start(shared_data, tmp_path, monkeypatch, fresh_jail_probe):
    cfg = load_config(QUICKSTART, ["evaluation.suites=[multipl_e]", f"evaluation.data_dir={shared_data}"])
    assert check_evaluation(cfg) == []
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without bubblewrap
    sandbox.jail_problem.cache_clear()
    problems = check_evaluation(cfg)
    assert len(problems) == 1
    assert problems[0].startswith("evaluation.suites: multipl_e: the code-execution jail needs bubblewrap")
    assert "FUSELAB_SANDBOX=unjailed" in problems[0]
    monkeypatch.setenv("FUSELAB_SANDBOX", "unjailed")
    assert check_evaluation(cfg) == []


def test_evaluate_refuses_multipl_e_without_a_jail_before_loading_the_model(shared_data, tmp_path, monkeypatch,
                                                                           fresh_jail_probe):
    from harness.evaluation import EvalSettings, evaluate
    from harness.evaluation.multipl_e import toolchain_problem

    assert toolchain_problem("python") is None  # probed with the real PATH (cached), before it is taken away
    monkeypatch.setenv("PATH", str(tmp_path))
    # The model folder does not exist: loading it would fail differently, so the refusal comes first.
    with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap"):
        evaluate(tmp_path / "no-model", ["multipl_e"], EvalSettings(multipl_e_languages=("python",)),
                 data_dir=shared_data)


def test_plan_prints_the_problem(tmp_path):
    import os
    import subprocess
    import sys

    empty = tmp_path / "no-data"
    empty.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("FUSELAB_DATA", None)
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "plan", str(QUICKSTART), f"workdir={tmp_path / 'w'}",
                           "evaluation.suites=[micro, commonsense]", f"evaluation.data_dir={empty}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    problems = [line for line in proc.stderr.splitlines() if line.startswith("fuselab: problem: ")]
    assert len(problems) == 1 and "evaluation.suites: commonsense: no data" in problems[0]
