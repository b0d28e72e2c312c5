"""The MLflow and Prefect web UIs of the session's services, as a person sees them: a real headless chromium
(Debian's, driven through its chromedriver) opens the pages and waits for the runs and the chart to render.
Screenshots of every page go to the test's tmp folder and to outputs/test-artifacts/ui/."""

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
ARTIFACTS = REPOSITORY / "outputs" / "test-artifacts" / "ui"
PAGE_TIMEOUT_S = 90  # a JavaScript app on a loaded 2-core machine
LOSSES = {"ui-check long schedule": [9.0, 8.0, 7.5, 7.25, 7.0], "ui-check short schedule": [9.0, 8.5, 8.25]}


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    """Headless chromium under Selenium; skipped only where the install step could not install the browser."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("chromium and chromedriver are not installed (make install adds them where apt-get can run)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshot(browser, tmp_path):
    """``screenshot(name)`` saves the page as <tmp>/screenshots/<name>.png and copies it to ARTIFACTS."""

    def save(name: str) -> Path:
        path = tmp_path / "screenshots" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(path))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, ARTIFACTS / path.name)
        return path

    return save


def wait_for(browser, find, what: str):
    """Poll ``find(browser)`` until it returns something truthy; the UIs render after their API calls."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, PAGE_TIMEOUT_S, ignored_exceptions=(StaleElementReferenceException,)).until(find)
    except TimeoutException:
        raise AssertionError(f"{what} did not appear within {PAGE_TIMEOUT_S} s on {browser.current_url}") from None


@pytest.fixture(scope="module")
def pretraining_runs(services) -> tuple[str, dict[str, str]]:
    """Two runs in experiment dinov2/pretrain of the session's MLflow server, with their loss curves
    (LOSSES) at steps 1, 2, ...: (experiment id, name -> run id)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(services.mlflow_url)
    experiment = client.get_experiment_by_name("dinov2/pretrain")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("dinov2/pretrain")
    runs = {}
    for name, losses in LOSSES.items():
        run = client.create_run(experiment_id, run_name=name, tags={"dinov2.recipe": "cpu_tiny"})
        now = int(time.time() * 1000)
        metrics = [Metric("train/total_loss", loss, now, step) for step, loss in enumerate(losses, start=1)]
        client.log_batch(run.info.run_id, metrics=metrics)
        client.set_terminated(run.info.run_id)
        runs[name] = run.info.run_id
    return experiment_id, runs


@pytest.fixture(scope="module")
def pretrain_flow_run(services) -> tuple[str, str]:
    """(id, name) of a real flow run on the session's Prefect server: the pretrain flow's ViT-g dry run."""
    result = subprocess.run(
        [sys.executable, "-m", "flows", "pretrain", "-p", "recipe=vitg14", "-p", "dry_run=true"],
        cwd=REPOSITORY, env=services.environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    name = re.search(r"Flow run '([^']+)' - Finished in state Completed", result.stdout + result.stderr).group(1)
    assert name == "vitg14 -> runs/pretrain"  # named for its recipe and output folder
    (found,) = services.api("/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})
    return found["id"], name


@pytest.mark.slow
def test_mlflow_ui_lists_the_pretraining_runs_and_charts_their_loss(services, pretraining_runs, browser, screenshot):
    from selenium.webdriver.common.by import By

    experiment_id, runs = pretraining_runs
    browser.get(f"{services.mlflow_url}/#/experiments/{experiment_id}/runs")
    for name, run_id in runs.items():
        # each run is a link to its own page, labelled with its name
        link = wait_for(
            browser, lambda b, run_id=run_id: b.find_elements(By.CSS_SELECTOR, f"a[href*='/runs/{run_id}']"),
            f"a link to run {name!r}",
        )  # fmt: skip
        assert name in [element.text for element in link]
    screenshot("mlflow-pretrain-runs")

    name = "ui-check long schedule"
    browser.get(f"{services.mlflow_url}/#/experiments/{experiment_id}/runs/{runs[name]}/model-metrics")
    # the chart of train/total_loss: one marker per logged step, the legend naming run and metric
    points = wait_for(
        browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .point"),
        "the train/total_loss chart",
    )  # fmt: skip
    assert len(points) == len(LOSSES[name])
    steps = [tick.text for tick in browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .xtick text")]
    assert steps == ["1", "2", "3", "4", "5"]
    assert f"{name} (train/total_loss)" in browser.find_element(By.TAG_NAME, "body").text
    screenshot("mlflow-loss-chart")


@pytest.mark.slow
def test_prefect_ui_lists_the_flow_run_by_name(services, pretrain_flow_run, browser, screenshot):
    from selenium.webdriver.common.by import By

    flow_run_id, name = pretrain_flow_run
    browser.get(services.prefect_api_url.removesuffix("/api") + "/runs")
    links = wait_for(
        browser, lambda b: b.find_elements(By.CSS_SELECTOR, f"a[href='/runs/flow-run/{flow_run_id}']"),
        f"flow run {name!r} in the flow runs list",
    )  # fmt: skip
    assert [link.text for link in links] == [name]
    screenshot("prefect-flow-runs")
