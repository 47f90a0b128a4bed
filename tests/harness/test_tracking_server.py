"""Tracking against a real MLflow tracking server (SQLite backend, `--serve-artifacts`) that `fuselab ui` starts on
a free port and stops: experiments take the server's artifact root, a run's artifacts reach the server's artifact
folder (never the client's work dir), and a second `fuselab ui` on the server's port is refused without touching
the server's log."""
from __future__ import annotations

import os

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.processes import free_port
from harness.tracking import Tracker
from harness.ui import stop_ui, ui_main

pytestmark = pytest.mark.slow  # one server start: ~15 s idle, a minute on a busy machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(server work dir, URL, port) of `ui_main`'s server: store `<root>/mlflow.db`, artifacts `<root>/mlartifacts`."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the server's own store is the work dir's
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    proc = ui_main(root, port=port, block=False)
    yield root, f"http://127.0.0.1:{port}", port
    stop_ui(proc)
    with pytest.raises(ProcessLookupError):  # nothing of the server outlives stop_ui
        os.killpg(proc.pid, 0)


def test_a_runs_artifacts_reach_the_servers_artifact_folder(server, tmp_path, monkeypatch):
    root, url, _ = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # what a user on another machine sets
    client_wd = tmp_path / "client"
    tracker = Tracker(None, "remote-artifacts", client_wd)
    assert tracker.uri == url
    exp_id = tracker.experiment_id
    assert MlflowClient(url).get_experiment(exp_id).artifact_location == f"mlflow-artifacts:/{exp_id}"
    with tracker.run("r") as run:
        tracker.log_text("fused 3 models\n", "notes/summary.txt")
        tracker.log_table(pd.DataFrame({"model": ["a", "b"], "micro": [0.5, 0.25]}), "results.csv")
    run_id = run.info.run_id
    assert MlflowClient(url).get_run(run_id).info.artifact_uri == f"mlflow-artifacts:/{exp_id}/{run_id}/artifacts"
    on_server = root / "mlartifacts" / exp_id / run_id / "artifacts"
    assert (on_server / "notes" / "summary.txt").read_text() == "fused 3 models\n"
    assert (on_server / "results.csv").read_text() == "model,micro\na,0.5\nb,0.25\n"
    assert not (client_wd / "mlartifacts").exists()


def test_an_experiment_with_a_client_path_on_a_server_is_named_in_a_warning(server, tmp_path):
    _, url, _ = server
    MlflowClient(url).create_experiment("made-by-old-fuselab", artifact_location=(tmp_path / "local").as_uri())
    with pytest.warns(UserWarning, match="'made-by-old-fuselab' on .* keeps its artifacts at file://.*other "
                                         "machines never see them"):
        Tracker(url, "made-by-old-fuselab", tmp_path / "client")


def test_ui_on_the_servers_busy_port_is_refused_and_leaves_its_log_alone(server, capsys):
    root, _, port = server
    log = root / f"mlflow-ui-{port}.log"
    before = log.read_bytes()
    assert main(["ui", "--workdir", str(root), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fuselab: error: port {port} on 127.0.0.1 is in use (another MLflow UI or server?): "
                          "pass a free port, e.g. --port ")
    assert err.count("\n") == 1
    assert log.read_bytes() == before


def test_ui_on_a_server_uri_points_at_the_server(server, capsys, monkeypatch):
    _, url, _ = server
    assert main(["ui", "--tracking-uri", url]) == 0
    assert capsys.readouterr().out == f"{url} is a tracking server: its MLflow UI is at {url}\n"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # the same from the environment
    assert main(["ui"]) == 0
    assert capsys.readouterr().out == f"{url} is a tracking server: its MLflow UI is at {url}\n"

