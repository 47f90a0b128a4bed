"""Tracker against a real MLflow SQLite store in a temp dir: what is logged is what search_runs returns."""
from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from harness.tracking import (
    MAX_PARAM_VALUE_CHARS,
    Tracker,
    default_tracking_uri,
    flatten,
    sanitize_name,
)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    # One SQLite store for the module: creating the schema costs seconds on a shared 2-core machine.
    return tmp_path_factory.mktemp("mlflow-store")


@pytest.fixture()
def tracker(store_dir, request):
    return Tracker(None, request.node.name, store_dir)


def _runs(tracker: Tracker) -> pd.DataFrame:
    mlflow.set_tracking_uri(tracker.uri)
    return mlflow.search_runs(experiment_ids=[tracker.experiment_id])


def test_default_uri_is_absolute_sqlite_in_workdir(tmp_path):
    uri = default_tracking_uri(tmp_path / "wd")
    assert uri == f"sqlite:///{(tmp_path / 'wd').resolve()}/mlflow.db"
    assert (tmp_path / "wd").is_dir()


def test_sanitize_and_flatten():
    assert sanitize_name("eval/bbh (3-shot)") == "eval/bbh _3-shot_"
    assert sanitize_name("a//b/./c/..") == "a/b/c"
    assert sanitize_name("/lead") == "lead"
    assert sanitize_name("x" * 300) == "x" * 250
    assert flatten({"a": {"b": 1, "c": [2, {"d": 3}]}, "e": [], "f": None}) == {
        "a.b": 1, "a.c.0": 2, "a.c.1.d": 3, "e": [], "f": None,
    }


def test_params_metrics_curves_tables_roundtrip(tracker, tmp_path):
    long_value = "y" * (MAX_PARAM_VALUE_CHARS + 100)
    with tracker.run("exp", tags={"fuselab.role": "experiment"}) as parent:
        tracker.log_params({"fusion": {"lam": 0.9, "alignment": "dtw"}, "sources": ["a", "b"], "blob": long_value})
        tracker.log_params({"fusion": {"lam": 0.9}})  # same value again: no error
        with pytest.raises(ValueError, match="fusion.lam.*already '0.9'"):
            tracker.log_params({"fusion": {"lam": 0.8}})
        tracker.log_metrics({"fusellm/micro": 0.5, "fusellm/bpb code(py)": 1.25, "skipped": None})
        tracker.log_curve("loss/fusellm", [(0, 3.0), (5, 2.5), (10, 2.0)])
        table = pd.DataFrame({"model": ["t", "f"], "micro": [0.25, 0.5]})
        tracker.log_table(table, "results/results.csv")
        with tracker.run("child", nested=True) as child:
            tracker.log_metrics({"x": 1})
        with pytest.raises(TypeError, match="metric 'bad'.*'high'"):
            tracker.log_metrics({"bad": "high"})

    df = _runs(tracker)
    assert len(df) == 2
    top = df[df["run_id"] == parent.info.run_id].iloc[0]
    assert top["status"] == "FINISHED"
    assert top["params.fusion.lam"] == "0.9"
    assert top["params.fusion.alignment"] == "dtw"
    assert top["params.sources.1"] == "b"
    assert len(top["params.blob"]) == MAX_PARAM_VALUE_CHARS and top["params.blob"].endswith("...[truncated]")
    assert top["metrics.fusellm/micro"] == 0.5
    assert top["metrics.fusellm/bpb code_py_"] == 1.25
    assert top["tags.fuselab.role"] == "experiment"
    low = df[df["run_id"] == child.info.run_id].iloc[0]
    assert low["tags.mlflow.parentRunId"] == parent.info.run_id
    assert low["metrics.x"] == 1.0

    client = MlflowClient(tracker.uri)
    hist = client.get_metric_history(parent.info.run_id, "loss/fusellm")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 3.0), (5, 2.5), (10, 2.0)]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert arts == {"results/results.csv", "results/results.md"}
    local = client.download_artifacts(parent.info.run_id, "results/results.csv", str(tmp_path / "dl"))
    pd.testing.assert_frame_equal(pd.read_csv(local), table)
    md = client.download_artifacts(parent.info.run_id, "results/results.md", str(tmp_path / "dl"))
    assert "| t       |    0.25 |" in open(md).read()


def test_failed_run_gets_status_and_traceback(tracker, tmp_path):
    with pytest.raises(ZeroDivisionError):
        with tracker.run("boom"):
            tracker.log_metrics({"before": 1.0})
            1 / 0  # noqa: B018
    df = _runs(tracker)
    row = df.iloc[0]
    assert row["status"] == "FAILED"
    assert row["metrics.before"] == 1.0
    assert row["tags.fuselab.error"] == "ZeroDivisionError: division by zero"
    client = MlflowClient(tracker.uri)
    path = client.download_artifacts(row["run_id"], "traceback.txt", str(tmp_path / "tb"))
    text = open(path).read()
    assert "ZeroDivisionError: division by zero" in text and "test_failed_run_gets_status_and_traceback" in text
    assert tracker.active_run_id is None


def test_nested_needs_open_run(tracker):
    with pytest.raises(RuntimeError, match="no open run to nest under"):
        with tracker.run("orphan", nested=True):
            pass


def test_log_config_params_tags_and_yaml(tracker, tmp_path):
    from harness.config import validate_config

    cfg = validate_config({
        "name": "cfg-test", "world": {"kind": "micro"}, "target": {"ref": "micro:target"},
        "sources": [{"ref": "micro:gpt2-arith"}, {"ref": "micro:llama-text"}], "fusion": {"lam": 0.8},
    })
    with tracker.run("cfg") as run:
        tracker.log_config(cfg)
    data = MlflowClient(tracker.uri).get_run(run.info.run_id).data
    assert data.params["fusion.lam"] == "0.8"
    assert data.params["sources.1.ref"] == "micro:llama-text"
    assert data.params["baselines.merges"] == "[]"
    assert data.tags["fuselab.config_hash"] == cfg.content_hash()
    assert data.tags["fuselab.sources"] == "gpt2-arith,llama-text"
    local = MlflowClient(tracker.uri).download_artifacts(run.info.run_id, "config/resolved.yaml", str(tmp_path / "c"))
    import yaml

    assert yaml.safe_load(open(local)) == cfg.model_dump(mode="json")


def test_ensure_run_returns_one_run_per_tag_set(tracker):
    tags = {"fuselab.role": "study", "fuselab.study": "s1"}
    a = tracker.ensure_run("study s1", tags)
    b = Tracker(tracker.uri, tracker.experiment_name, tracker.workdir).ensure_run("study s1", tags)
    assert a == b
    assert len(tracker.find_runs(tags)) == 1
    assert tracker.ensure_run("study s2", {**tags, "fuselab.study": "s2"}) != a


def test_experiment_name_config_then_env_then_name(monkeypatch):
    from harness.tracking import resolve_experiment_name

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert resolve_experiment_name(None, "exp") == "exp"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert resolve_experiment_name(None, "exp") == "from-env"
    assert resolve_experiment_name("configured", "exp") == "configured"
