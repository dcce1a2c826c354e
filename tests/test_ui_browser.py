"""The MLflow UI as a researcher opens it, in headless Chromium (Debian's ``chromium``,
driven by the ``playwright`` package; playwright's own browser download cannot work
offline): a smoke study's store behind the light server (``python -m sweeps.ui``), the
runs table with the study and its nested, descriptively named trials, a trial's metric
charts and an image artifact. Screenshots go to ``$QSWEEP_SCREENSHOTS`` (default: the
test's tmp folder); no server is left running."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "sweeps" / "eg_vs_gd.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

playwright = pytest.importorskip("playwright.sync_api",
                                 reason="playwright is not installed (pip install playwright)")
pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install "
                       "chromium; .ci/run installs it)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds} s")


@pytest.fixture()
def light_server(smoke_study):
    folder, _ = smoke_study  # the UI only reads the store
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "sweeps.ui", "--tracking-uri", uri,
                               "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}", MlflowClient(uri)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    left = subprocess.run(["pgrep", "-f", "--", f"--port {port}"], capture_output=True, text=True)
    assert not left.stdout.split(), "the UI server left processes running"


def test_a_researcher_reads_the_smoke_study_in_the_browser(light_server, tmp_path: Path):
    base, client = light_server
    shots = Path(os.environ.get("QSWEEP_SCREENSHOTS", tmp_path / "screens"))
    shots.mkdir(parents=True, exist_ok=True)
    experiment = client.get_experiment_by_name("eg_vs_gd").experiment_id
    trial = next(r for r in client.search_runs([experiment], "tags.phase = 'final'")
                 if r.data.tags.get("optimizer") == "eg")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1500, "height": 950})
        # The link sweeps.ui prints: the runs table of the model-training view.
        page.goto(f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning")
        page.get_by_text("eg_vs_gd study").first.wait_for(timeout=60_000)
        assistant = page.get_by_role("button", name="Close")
        if assistant.count():  # MLflow 3's assistant panel opens on a first visit
            assistant.first.click()
        page.screenshot(path=shots / "1-runs-table.png")
        expanders = page.locator('button[data-component-id*="runnamecellrenderer"]')
        expanders.first.click()  # the study: its searches and seed re-runs
        page.get_by_text("search mnist/mlp/eg").first.wait_for(timeout=30_000)
        page.get_by_text("seeds 1..2 x 2 picked configs").first.wait_for(timeout=30_000)
        expanders.nth(1).click()  # the first group: its trials, named by what they vary
        page.locator('a[href*="/runs/"] span', has_text=" lr=").first.wait_for(
            timeout=30_000)
        page.screenshot(path=shots / "2-nested-trials.png")

        run_url = f"{base}/#/experiments/{experiment}/runs/{trial.info.run_id}"
        page.goto(f"{run_url}/model-metrics?workflowType=machine_learning")
        page.get_by_text(trial.info.run_name).first.wait_for(timeout=30_000)
        page.get_by_text("test_acc", exact=True).first.wait_for(timeout=30_000)
        page.locator("svg.main-svg").first.wait_for(timeout=30_000)  # a drawn chart
        page.wait_for_timeout(1000)  # let the other charts finish drawing
        page.screenshot(path=shots / "3-trial-metrics.png")

        page.goto(f"{run_url}/artifacts/curves.png?workflowType=machine_learning")
        image = page.locator("img[src^='blob:']").first  # the artifact, fetched and shown
        image.wait_for(timeout=30_000)
        assert image.evaluate("img => img.naturalWidth") == 900  # curves.png: 9 in x 100 dpi
        page.screenshot(path=shots / "4-trial-curves.png")

        # The study run: its Overview is the result per cell and the paired verdicts...
        study = client.search_runs([experiment], "tags.kind = 'study'")[0].info.run_id
        study_url = f"{base}/#/experiments/{experiment}/runs/{study}"
        page.goto(f"{study_url}?workflowType=machine_learning")
        page.get_by_text("Show more").first.click()
        page.get_by_text("Matched pairs, seed by seed").first.wait_for(timeout=30_000)
        page.get_by_text("eg - gd").first.wait_for(timeout=30_000)
        page.screenshot(path=shots / "5-study-overview.png")
        # ... its artifacts list the table first, and the bars render.
        page.goto(f"{study_url}/artifacts/comparison.png?workflowType=machine_learning")
        image = page.locator("img[src^='blob:']").first
        image.wait_for(timeout=30_000)
        assert image.evaluate("img => img.naturalWidth") > 0
        names = page.get_by_text(re.compile(r"^[\w.]+\.(md|png|csv)$")).all_inner_texts()
        assert names[0] == "comparison.md", names
        page.screenshot(path=shots / "6-study-comparison.png")
        browser.close()
    assert {p.name for p in shots.iterdir()} >= {
        "1-runs-table.png", "2-nested-trials.png", "3-trial-metrics.png",
        "4-trial-curves.png", "5-study-overview.png", "6-study-comparison.png"}
