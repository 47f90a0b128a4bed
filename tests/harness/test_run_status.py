"""Killed runs do not stay RUNNING in MLflow (issue 19, item 6): SIGTERM/SIGHUP end them KILLED on the way out;
after kill -9 the next Tracker on the host ends them KILLED."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from local_models import save_model, write_config, write_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("status-models")
    return (save_model(root / "llama", "llama", tiny.sentencepiece_style(), 0),
            save_model(root / "gpt2", "gpt2", tiny.byte_level(), 1), write_corpus(root / "corpus"))


def start_and_signal(tmp_path: Path, models, sig: int) -> tuple[subprocess.Popen, str]:
    target, source, corpus = models
    cfg = write_config(tmp_path / "exp.yaml", tmp_path / "wd", target, [("tgt", target), ("src", source)], corpus)
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "[run]    distributions/tgt" in line:
            os.kill(proc.pid, sig)
            break
    rest, _ = proc.communicate(timeout=120)
    return proc, "".join(seen) + rest


def runs(workdir: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("local")
    return client.search_runs([exp.experiment_id])


def test_sigterm_ends_the_run_killed(tmp_path, models):
    proc, out = start_and_signal(tmp_path, models, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert out.strip().splitlines()[-1] == "fuselab: stopped by SIGTERM"
    statuses = {r.info.run_name: r.info.status for r in runs(tmp_path / "wd")}
    assert statuses["local"] == "KILLED"


def test_run_killed_with_sigkill_is_ended_killed_by_the_next_tracker(tmp_path, models):
    from harness.tracking import Tracker

    proc, out = start_and_signal(tmp_path, models, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    before = {r.info.run_id: r.info.status for r in runs(tmp_path / "wd")}
    assert "RUNNING" in before.values()  # nothing could end it
    tracker = Tracker(None, "local", tmp_path / "wd")  # what the next run or study does first
    after = {r.info.run_id: r for r in runs(tmp_path / "wd")}
    for run_id, status in before.items():
        if status == "RUNNING":
            assert after[run_id].info.status == "KILLED"
            assert after[run_id].data.tags["fuselab.error"].startswith(f"process {proc.pid} on ")
    # a live process's run is left alone
    with tracker.run("alive"):
        assert Tracker(None, "local", tmp_path / "wd").close_dead_runs() == []
