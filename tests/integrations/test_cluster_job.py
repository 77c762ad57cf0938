"""A sweep submitted with ``raymix submit`` (Ray's job SDK) to a real Ray head, recorded by a
real MLflow server and seen in the MLflow UI in headless Chromium: all started here, on loopback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.integrations import servers

pytestmark = pytest.mark.slow

SCREENSHOT = servers.REPO / "docs" / "mlflow-ui-sweep.png"
SWEEP = "cluster-quickstart"


@pytest.fixture(scope="module")
def submitted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A reduced quickstart sweep (2 trials of 2 epochs) submitted as a Ray job."""
    folder = tmp_path_factory.mktemp("cluster")
    storage = folder / "sweeps"
    with servers.mlflow_server(folder) as tracking, servers.ray_head(folder) as address:
        command = [
            str(servers.BIN / "raymix"), "submit", "--address", address, "--storage", str(storage),
            "--tracking-uri", tracking, "--", "tune", "search_spaces/quickstart.yaml",
            "training.epochs=2", "--num-samples", "2", "--name", SWEEP,
        ]  # fmt: skip
        done = subprocess.run(
            command, cwd=servers.REPO, env=servers.venv_env(), capture_output=True, text=True, timeout=600
        )
        yield {"done": done, "tracking": tracking, "sweep": f"{storage}/{SWEEP}"}


def test_job_succeeds_and_mlflow_has_the_parent_and_its_trials(submitted: dict[str, Any]) -> None:
    done = submitted["done"]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # The job's id and dashboard link, its logs followed, then its final status.
    found = re.search(
        r"^job (raymix-tune-[0-9a-f]+) submitted to (http://127\.0\.0\.1:\d+)$", done.stdout, re.M
    )
    assert found, done.stdout[-4000:]
    job_id, address = found.groups()
    assert f"dashboard: {address}/#/jobs/{job_id}" in done.stdout
    assert "best: trial" in done.stdout  # the sweep's own last line, from the followed logs
    assert done.stdout.rstrip().endswith(f"job {job_id} succeeded")
    assert (Path(submitted["sweep"]) / "best_config.yaml").is_file()  # results in --storage

    client = MlflowClient(submitted["tracking"])
    experiment = client.get_experiment_by_name("raymix")
    assert experiment is not None
    parents = client.search_runs([experiment.experiment_id], f"tags.`raymix.sweep` = '{submitted['sweep']}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["raymix.trials.completed"] == "2"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "knn_top1")
        assert sorted(m.step for m in history) == [1, 2]


def _browser() -> None:
    """Debian's chromium and chromium-driver, installed here when missing; else skip."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium and chromium-driver are missing and apt-get cannot install them (not root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not shutil.which("chromedriver"):
        pytest.skip(f"could not install chromium and chromium-driver: {done.stderr[-500:]}")


def test_mlflow_ui_lists_the_sweeps_trials(submitted: dict[str, Any]) -> None:
    assert submitted["done"].returncode == 0
    _browser()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(submitted["tracking"])
    experiment = client.get_experiment_by_name("raymix")
    assert experiment is not None
    parent = client.search_runs([experiment.experiment_id], f"tags.`raymix.sweep` = '{submitted['sweep']}'")[
        0
    ]
    trials = [
        run.info.run_name
        for run in client.search_runs(
            [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
    ]

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-quic", "--window-size=1400,800",
    ):  # fmt: skip
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        browser.get(f"{submitted['tracking']}/#/experiments/{experiment.experiment_id}/runs")
        wait = WebDriverWait(browser, 60)
        link = f"//a[contains(@href, '{parent.info.run_id}')]"
        wait.until(lambda b: b.find_elements(By.XPATH, link))
        for close in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
            close.click()  # the assistant's side panel
        # Trials are nested under the sweep's run: expand it.
        browser.find_element(By.XPATH, f"{link}/ancestor::div[contains(@class, 'ag-cell')]//button").click()
        wait.until(lambda b: all(name in b.find_element(By.TAG_NAME, "body").text for name in trials))
        body = browser.find_element(By.TAG_NAME, "body").text
        assert SWEEP in body and all(name in body for name in trials)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))
    finally:
        browser.quit()
