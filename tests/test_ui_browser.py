"""The MLflow UI in a real browser: the experiment lists a sweep's runs with their test accuracy.

Debian's `chromium` (`.ci/run` installs it) driven by Playwright's Python package, which
brings its own driver and no browser. Set MNIST_EXP_SCREENSHOTS=DIR to keep the screenshot.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, Uncaptured, copy_store, free_port, in_process
from mlflow.tracking import MlflowClient

from mnist_exp import train

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # and a sweep to show

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",  # we run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SWEEP = (
    "optimizer.lr=0.01,0.001",
    "data.max_train_samples=256",
    "data.max_test_samples=256",
    "data.val_size=0",
    "trainer.epochs=1",
    "trainer.print_every_n_steps=0",
    "mlflow.log_plots=false",
    "mlflow.log_model=false",
)


@pytest.fixture(scope="module")
def ui(data_root: Path, tmp_path_factory: pytest.TempPathFactory, empty_store: Path):
    """A store holding a two-job sweep (run in the test's process), served by `mlflow server`
    on a free local port."""
    tmp = tmp_path_factory.mktemp("ui")
    uri = copy_store(empty_store, f"sqlite:///{tmp}/mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        argv = ["-m", f"data.root={data_root}", f"mlflow.tracking_uri={uri}",
                f"hydra.sweep.dir={tmp}/sweep", *SWEEP]  # fmt: skip
        sweep = in_process(train.run_command, argv, Uncaptured())
    assert sweep.code == 0, sweep.err
    # The README's UI command, on this store; the job runner's switch as a user's shell has it.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"}
    env["MLFLOW_TRACKING_URI"] = uri
    port = free_port()
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed after the server stops
    server = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "ui.sh"), str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp / "server.log").read_text()
            assert time.monotonic() < deadline, "mlflow server did not answer in 240 s"
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        yield url, uri, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.process
def test_the_experiment_lists_the_sweeps_runs_with_their_test_accuracy(ui, tmp_path: Path):
    assert CHROMIUM.is_file(), "no /usr/bin/chromium: apt-get install chromium (.ci/run does)"
    from playwright.sync_api import expect, sync_playwright

    url, uri, pid = ui
    # MLflow's GenAI job runner and its huey workers (~3.7 GB) are not started for a local UI.
    started = [" ".join(_command(p)) for p in _descendants(pid)]
    assert started and not [c for c in started if "mlflow.server.jobs" in c or "huey" in c], started
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "mnist-exp"]
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["lr=0.001", "lr=0.01"]

    screenshot = tmp_path / "mlflow-ui.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page(viewport={"width": 2400, "height": 900})
        try:
            page.goto(f"{url}/#/experiments/{experiment.experiment_id}/runs")
            expect(page.get_by_text(parent.info.run_name).first).to_be_visible(timeout=90_000)
            # The sweep's parent run folds its children: unfold it.
            page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
            # Show the test_accuracy column: Columns, then the metric's box.
            page.get_by_role("button", name="Columns").click()
            page.get_by_placeholder("Search columns").fill("test_accuracy")
            # The search also lists best_test_accuracy and test_accuracy_class_*: take the
            # entry whose whole title is the metric's name.
            titles = page.get_by_role("dialog").locator(".du-bois-light-tree-title")
            titles.filter(has_text=re.compile(r"^test_accuracy$")).click()
            page.keyboard.press("Escape")
            column = '[col-id="metrics.`test_accuracy`"]'
            expect(page.locator(f"[role=columnheader]{column}")).to_be_visible()
            for run in children:
                link = page.get_by_role("link", name=run.info.run_name, exact=True)
                expect(link).to_be_visible()
                # The grid draws pinned and scrolling columns in separate rows of one index.
                index = page.get_by_role("row").filter(has=link).first.get_attribute("row-index")
                cell = page.locator(f'[role=row][row-index="{index}"] [role=gridcell]{column}')
                expect(cell).to_have_text(re.compile(r"\d"))
                shown = float(cell.inner_text())
                assert abs(shown - run.data.metrics["test_accuracy"]) < 1e-3, shown
        finally:
            page.screenshot(path=str(screenshot), full_page=True)
            browser.close()
            if os.environ.get("MNIST_EXP_SCREENSHOTS"):
                keep = Path(os.environ["MNIST_EXP_SCREENSHOTS"])
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(screenshot, keep / screenshot.name)
    assert screenshot.stat().st_size > 10_000


def _descendants(pid: int) -> list[int]:
    """The processes below `pid`, from /proc's children lists."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                todo += children
    return found


def _command(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    return []
