"""`fuselab ui` in a real browser: the MLflow UI started by `ui_main` on a store holding a finished micro
pipeline run, opened in headless Chromium; the experiment, its runs and metric columns must be visible.

Needs Debian `chromium chromium-driver` and `pip install selenium` (see docs/STUDIES.md). A screenshot
goes to test-artifacts/mlflow_ui.png (and to docs/img/mlflow_ui.png with FUSELAB_UPDATE_DOCS_IMG=1).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.config import load_config
from harness.pipeline import run_experiment
from harness.processes import free_port
from harness.tracking import default_tracking_uri
from harness.ui import stop_ui, ui_main

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="needs `apt-get install -y chromium chromium-driver` (headless browser test)"),
]
SMALL = ["corpus.max_docs_per_domain=10", "training.max_steps=4", "training.per_device_batch_size=4",
         "baselines.ensemble.enabled=false", "baselines.domain_pool.enabled=false", "baselines.merges=[]",
         "evaluation.settings.limit=6", "evaluation.settings.max_gen_toks=8",
         "evaluation.perplexity.max_docs_per_domain=3"]
METRIC_COLUMNS = ("micro", "bpb_avg", "fusellm/micro")


@pytest.fixture(scope="module")
def finished_experiment(tmp_path_factory, micro_world):
    wd = tmp_path_factory.mktemp("ui-store")
    result = run_experiment(load_config(REPO / "studies" / "micro_quickstart.yaml", [f"workdir={wd}", *SMALL]),
                            progress=False)
    return wd, result


def _driver():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=2200,1100"):
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _wait_text(driver, text: str, timeout: float = 90) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        body = driver.find_element(By.TAG_NAME, "body").text
        if text in body:
            return body
        assert time.monotonic() < deadline, f"{text!r} never appeared in the MLflow UI; page text:\n{body[:2000]}"
        time.sleep(0.5)


def test_mlflow_ui_shows_the_experiment_runs_and_metrics(finished_experiment):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wd, result = finished_experiment
    exp = MlflowClient(default_tracking_uri(wd)).get_experiment_by_name("micro_quickstart")
    assert exp is not None
    port = free_port()
    started = time.monotonic()
    proc = ui_main(wd, port=port, block=False)
    serve_seconds = time.monotonic() - started
    driver = _driver()
    try:
        driver.get(f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs")
        _wait_text(driver, "micro_quickstart")
        _wait_text(driver, "matching runs")
        for close in driver.find_elements(By.XPATH, "//button[@aria-label='Close']"):
            close.click()  # the assistant side panel hides the table's right part
        # MLflow 3 starts with no metric columns: pick them as a user would, from the Columns menu.
        driver.find_element(By.XPATH, "//button[normalize-space(.)='Columns']").click()
        menu = _wait_text(driver, "Metrics (")
        for name in METRIC_COLUMNS:
            assert f"\n{name}\n" in menu, f"metric {name} missing from the Columns menu"
            driver.find_element(By.XPATH, f"//span[normalize-space(text())='{name}']").click()
            time.sleep(0.3)
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        run_cell = driver.find_element(
            By.XPATH, "//a[normalize-space(.)='micro_quickstart' and contains(@href,'/runs/')]"
                      "/ancestor::*[contains(@class,'ag-cell')][1]")
        run_cell.find_element(By.TAG_NAME, "button").click()  # expand the nested per-model runs
        body = _wait_text(driver, "fusellm")
        for model in ("clm", "llama-docs", "neox-code", "mpt-arithmetic"):
            assert model in body
        header = body[body.find("Run Name"): body.find("micro_quickstart", body.find("Run Name"))]
        for name in METRIC_COLUMNS:
            assert name in header, f"column {name} not shown; header: {header!r}"
        time.sleep(1)
        out = REPO / "test-artifacts"
        out.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(out / "mlflow_ui.png"))
        if os.environ.get("FUSELAB_UPDATE_DOCS_IMG") == "1":  # refresh the README's screenshot on request only
            (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / "mlflow_ui.png", REPO / "docs" / "img" / "mlflow_ui.png")
    finally:
        driver.quit()
        stop_ui(proc)
    assert proc.poll() is not None
    with pytest.raises(ProcessLookupError):  # no server worker outlives `stop_ui`
        os.killpg(proc.pid, 0)
    print(f"MLflow UI served in {serve_seconds:.1f} s")
