"""Live tracking: contestant child runs with their params, metrics and training curves streamed to MLflow while
an experiment runs (a real `mlflow server` process in the slow test), MLFLOW_TRACKING_URI honoured, third-party
notices off."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.processes import free_port
from harness.tracking import ExperimentRuns, Tracker, default_tracking_uri, quiet_third_party
from harness.ui import stop_ui

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def tracker(tmp_path):
    return Tracker(None, "live", tmp_path)


def test_mlflow_tracking_uri_is_honoured_and_the_config_wins(tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_tracking_uri(other))
    assert Tracker(None, "e", tmp_path / "wd").uri == f"sqlite:///{other.resolve() / 'mlflow.db'}"
    explicit = default_tracking_uri(tmp_path / "cfg")
    assert Tracker(explicit, "e", tmp_path / "wd").uri == explicit
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert Tracker(None, "e", tmp_path / "wd").uri == f"sqlite:///{(tmp_path / 'wd').resolve() / 'mlflow.db'}"


def test_contestant_runs_params_order_curves_and_no_repeats(tracker):
    client = MlflowClient(tracker.uri)
    with tracker.run("exp") as parent:
        live = ExperimentRuns(tracker, parent.info.run_id, tags={"fuselab.experiment": "exp"})
        a = live.child("fusellm", method="FuseLLM", params={"lam": 0.9, "fusion": {"fusion": "mince"}})
        b = live.child("clm", method="CLM-only", params={"lam": 1.0})
        assert live.child("fusellm") == a                       # get, not create again
        sink = live.curve_sink("fusellm")
        for step, loss in ((2, 3.5), (4, 3.25)):
            sink(step, {"loss": loss, "clm_loss": loss + 0.25, "fusion_loss": loss - 0.5, "learning_rate": 1e-3,
                        "grad_norm": 0.5, "epoch": 0.1})
        sink(4, {"train_runtime": 12.0, "train_loss": 3.4})     # the run summary: not a curve point
        live.log_new(a, {"micro": 0.25})
        live.log_new(a, {"micro": 0.25, "bpb_avg": 2.5})         # micro is not sent twice
        live.log_stage("train/fusellm", 1.5, {"train/tokens": 100.0}, label="fusellm")
        live.finish("fusellm")
        assert client.get_run(a).info.status == "FINISHED" and client.get_run(b).info.status == "RUNNING"
        live.close("FAILED")
    run_a, run_b = client.get_run(a), client.get_run(b)
    assert run_b.info.status == "FAILED"                        # still open when the experiment failed
    assert run_a.info.start_time < run_b.info.start_time        # the results table's row order
    assert run_a.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run_a.data.tags["fuselab.model"] == "fusellm" and run_a.data.tags["fuselab.method"] == "FuseLLM"
    assert run_a.data.tags["fuselab.experiment"] == "exp"
    assert run_a.data.params == {"lam": "0.9", "fusion.fusion": "mince"} and run_b.data.params == {"lam": "1.0"}

    def curve(run_id, key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    assert curve(a, "train_loss") == [(2, 3.5), (4, 3.25)]
    assert curve(a, "train_clm_loss") == [(2, 3.75), (4, 3.5)]
    assert curve(a, "train_fusion_loss") == [(2, 3.0), (4, 2.75)]
    assert curve(a, "train/learning_rate") == [(2, 1e-3), (4, 1e-3)]
    assert curve(parent.info.run_id, "loss/fusellm") == [(2, 3.5), (4, 3.25)]
    assert curve(parent.info.run_id, "loss/fusellm/clm_loss") == [(2, 3.75), (4, 3.5)]
    assert "epoch" not in run_a.data.metrics and "train_runtime" not in run_a.data.metrics
    assert len(client.get_metric_history(a, "micro")) == 1 and run_a.data.metrics["bpb_avg"] == 2.5
    assert run_a.data.metrics["train/tokens"] == 100.0
    assert client.get_run(parent.info.run_id).data.metrics["stage_seconds/train/fusellm"] == 1.5
    assert live.logged == {"curve:fusellm", "stage:train/fusellm"}


def test_a_dead_workers_shared_study_run_stays_open(tracker):
    # the study's parent run carries the pid of whichever worker created it; the other workers go on with it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = {"fuselab.pid": str(dead.pid), "fuselab.pid_start": "1"}
    study = tracker.start_run("study s", tags={"fuselab.role": "study", **gone})
    trial = tracker.start_run("trial 0", tags={"fuselab.role": "trial", **gone}, parent_run_id=study)
    assert tracker.close_dead_runs() == [trial]
    client = MlflowClient(tracker.uri)
    assert client.get_run(study).info.status == "RUNNING" and client.get_run(trial).info.status == "KILLED"


def test_third_party_notices_are_dropped_and_nothing_else(caplog):
    quiet_third_party()
    ds = logging.getLogger("DeepSpeed")
    # once imported (by earlier tests), DeepSpeed's logger stops propagating to the root, where caplog listens,
    # and may carry a level: open it for this test, the filters under test stay in place
    saved = [(lg, lg.propagate, lg.level) for lg in (ds, logging.getLogger("lm_eval.models.huggingface"))]
    for lg, _, _ in saved:
        lg.propagate, lg.level = True, logging.NOTSET
    with caplog.at_level(logging.INFO):
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        ds.warning("ZeRO stage 3 offload is slow")
        logging.getLogger("lm_eval.models.huggingface").warning(
            "`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored.")
    for lg, propagate, level in saved:
        lg.propagate, lg.level = propagate, level
    # (after DeepSpeed's import its records can reach caplog twice: count kinds, not records)
    assert {r.getMessage() for r in caplog.records} == {"ZeRO stage 3 offload is slow"}
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


# ------------------------------------------------------------------------------ against a real server
SMALL = ["corpus.max_docs_per_domain=10", "training.per_device_batch_size=4", "training.max_steps=12",
         "training.logging_steps=1", "baselines.ensemble.enabled=false", "baselines.domain_pool.enabled=false",
         "baselines.merges=[]", "evaluation.settings.limit=6", "evaluation.settings.max_gen_toks=8",
         "evaluation.perplexity.max_docs_per_domain=3"]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a SQLite store with served artifacts, flags that start it in ~14 s and stop it cleanly
    (docs: ../shared/FACTS.md); its own process group so that stop_ui ends all of it."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            pass
        assert time.monotonic() < deadline, "mlflow server did not answer within 180 s"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_run_streams_metrics_and_the_training_curve_to_a_server_while_it_runs(tmp_path, micro_world):
    server, url = start_server(tmp_path)
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "harness.cli", "run", str(REPO / "studies" / "micro_quickstart.yaml"),
               f"workdir={tmp_path / 'wd'}", *SMALL]
        log = open(tmp_path / "run.log", "wb")
        run = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        client = MlflowClient(url)
        seen_running = None  # what the server showed while the experiment was still going
        deadline = time.monotonic() + 1500
        while run.poll() is None and time.monotonic() < deadline:
            exp = client.get_experiment_by_name("micro_quickstart")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            parent = next((r for r in runs if "mlflow.parentRunId" not in r.data.tags), None)
            fusellm = next((r for r in runs if r.data.tags.get("fuselab.model") == "fusellm"), None)
            if parent and fusellm and parent.info.status == "RUNNING" and \
                    "stage_seconds/train/fusellm" in parent.data.metrics:
                seen_running = (parent, fusellm, client.get_metric_history(fusellm.info.run_id, "train_loss"))
                break
            time.sleep(0.5)
        assert run.wait(1500) == 0, (tmp_path / "run.log").read_text()[-4000:]
        assert seen_running is not None, "the server never showed the trained FuseLLM while the experiment ran"
        parent, fusellm, curve = seen_running
        # while the experiment was still running: its training curve (one point per step), its contestant params,
        # the stage times so far; the scores are not there yet (evaluation comes after training)
        assert sorted(m.step for m in curve) == list(range(1, 13))
        assert fusellm.data.params["lam"] == "0.9" and fusellm.data.params["fusion.fusion"] == "mince"
        assert fusellm.data.params["training.max_steps"] == "12"
        assert {"stage_seconds/corpus", "stage_seconds/fused"} <= set(parent.data.metrics)
        assert "fusellm/micro" not in parent.data.metrics
        # the points were logged during training (before the stage's end), not copied afterwards
        done = client.get_metric_history(parent.info.run_id, "stage_seconds/train/fusellm")[0].timestamp
        stamps = sorted(m.timestamp for m in curve)
        assert stamps[-1] <= done and stamps[0] < stamps[-1]
        # and at the end: every contestant finished with params and scores, the curve not duplicated
        final = {r.data.tags["fuselab.model"]: r for r in client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
        assert set(final) == {"llama-docs", "neox-code", "mpt-arithmetic", "clm", "fusellm"}
        assert all(r.info.status == "FINISHED" and "micro" in r.data.metrics and r.data.params for r in final.values())
        assert final["neox-code"].data.params["model.ref"] == "micro:neox-code"
        assert final["clm"].data.params["lam"] == "1.0"
        assert len(client.get_metric_history(final["fusellm"].info.run_id, "train_loss")) == 12
        assert len(client.get_metric_history(parent.info.run_id, "loss/fusellm")) == 12
        assert client.get_run(parent.info.run_id).info.status == "FINISHED"
        out = (tmp_path / "run.log").read_text()
        assert "INFO mlflow" not in out and "Setting accelerator to CPU" not in out
    finally:
        stop_ui(server)
