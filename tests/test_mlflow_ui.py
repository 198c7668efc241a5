"""The MLflow UI over a run's store, checked in headless Chromium the way a person looks at it.

The store is a real 2-round run's, written by the project's own bookkeeping (tests/mlflow_store.py);
`mlflow server` serves it on 127.0.0.1 in its own process group (SIGTERM to the server alone leaves
its job-consumer children running: the whole group is ended). Chromium and chromedriver are
Debian's (scripts/install.sh installs them); Selenium drives them, nothing is downloaded.

    python tests/test_mlflow_ui.py RUN_DIR [METRIC]   # README's screenshots (docs/) from a real run
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from orchestrator.console import ui_page  # noqa: E402
from orchestrator.tracking import KIND_TAG, TRAINING_KIND  # noqa: E402

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 180  # the UI's first load is slow on a busy 2-core machine


def _browser_or_skip() -> None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing = "the selenium package"
    else:
        missing = None if CHROMIUM and CHROMEDRIVER else "Debian's chromium and chromium-driver"
    if missing:
        # CI installs them (scripts/install.sh): missing there is a failure, not a skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{missing} not installed (bash scripts/install.sh)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(proc.name))
    return alive


def end_group(proc: subprocess.Popen, grace_s: float = 5) -> list[int]:
    """SIGTERM to the whole process group, SIGKILL to what is left after ``grace_s``; returns the
    pids that were still alive when the SIGKILL went out (none, when the server stops cleanly)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return []
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.3)
        proc.poll()
    left = _group_alive(proc.pid)
    if left:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    return left


@contextmanager
def mlflow_server(uri: str, log_file: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mlflow server`` over ``uri`` on a free 127.0.0.1 port, its own process group; ended with it."""
    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [str(exe), "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=log_file.parent,
        )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited with {proc.returncode}:\n{log_file.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not answer in {WAIT_S}s:\n{log_file.read_text()[-3000:]}")
            time.sleep(1)
        yield base, proc
    finally:
        end_group(proc)


def chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900", "--lang=en-US"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for(driver: Any, what: str, fn: Any, timeout: float = WAIT_S) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: fn(d))
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what} at {driver.current_url}") from None


def close_assistant(driver: Any) -> None:
    """MLflow 3.17 opens its assistant panel beside every page; it hides half of a screenshot."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        try:
            if button.is_displayed():
                button.click()
        except Exception:  # gone or covered already: nothing to close
            pass


def open_page(driver: Any, base: str, page: str) -> None:
    # A fresh load, as a person following a link: the app does not always redraw a page when only
    # the part after '#' changes (another run's artifact tree stayed stale).
    driver.get("about:blank")
    driver.get(base + page)
    # the app's shell is up once its sidebar shows the workflow switch
    wait_for(driver, "the MLflow app", lambda d: "Model training" in d.find_element("tag name", "body").text)


def expand_parent(driver: Any, parent_name: str) -> dict[str, str]:
    """Unfold the parent's row in the runs table: {run id: run name} of the rows below it."""
    from selenium.webdriver.common.by import By

    cell = wait_for(driver, f"the run {parent_name!r} in the runs table", lambda d: next(iter(d.find_elements(
        By.XPATH, f"//div[@role='gridcell'][.//a[normalize-space(.)='{parent_name}']]")), None))
    cell.find_element(By.CSS_SELECTOR, "button").click()

    def rows(d: Any) -> dict[str, str] | None:
        found = {}
        for row in d.find_elements(By.CSS_SELECTOR, ".ag-pinned-left-cols-container .ag-row"):
            links = row.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']")
            if links:
                found[row.get_attribute("row-id")] = links[0].text.strip()
        return found if len(found) > 1 else None

    return wait_for(driver, "the child runs under the parent", rows)


def metric_chart(driver: Any, metric: str) -> dict[str, Any]:
    """Filter the run's Model metrics tab to ``metric`` and wait for its lazily drawn chart: the
    plotted points (x, y) and the number of point markers in its SVG."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    search = wait_for(driver, "the metric search box", lambda d: next(iter(
        d.find_elements(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")), None))
    search.send_keys(Keys.CONTROL + "a", Keys.DELETE)  # the box keeps what an earlier visit typed
    search.send_keys(metric + Keys.ENTER)
    script = """
      const out = [];
      for (const el of document.querySelectorAll('.js-plotly-plot')) {
        const traces = (el.data || []).filter(t => t.metricKey === arguments[0]);
        if (!traces.length) continue;
        out.push({x: Array.from(traces[0].x || []), y: Array.from(traces[0].y || []),
                  markers: el.querySelectorAll('path.point').length});
      }
      return out;"""

    def drawn(d: Any) -> dict[str, Any] | None:
        charts = d.execute_script(script, metric)
        return charts[0] if charts and charts[0]["markers"] == len(charts[0]["x"]) and charts[0]["x"] else None

    return wait_for(driver, f"the chart of {metric}", drawn)


def open_artifact(driver: Any, base: str, exp: str, run_id: str, path: str) -> None:
    """Open ``path`` in the run's Artifacts tab by clicking through its tree, as a person does
    (the app does not redraw the preview when only the address's file part changes)."""
    from selenium.webdriver.common.by import By

    if f"/runs/{run_id}/artifacts" not in driver.current_url:
        open_page(driver, base, ui_page(exp, run_id, "artifacts"))

    def shown(name: str) -> Any:
        found = driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{name}']")
        return next((e for e in found if e.is_displayed()), None)

    parts = path.split("/")
    for i, part in enumerate(parts):
        if i < len(parts) - 1 and shown(parts[i + 1]) is not None:
            continue  # the folder is open already: a click would fold it
        wait_for(driver, f"{part!r} in the artifact tree", lambda d: shown(part)).click()


def artifact_text(driver: Any, base: str, exp: str, run_id: str, path: str, expect: str) -> str:
    from selenium.webdriver.common.by import By

    open_artifact(driver, base, exp, run_id, path)
    return wait_for(driver, f"the preview of {path}", lambda d: (lambda t: t if expect in t else None)(
        d.find_element(By.TAG_NAME, "body").text))


def artifact_image(driver: Any, base: str, exp: str, run_id: str, path: str) -> int:
    """The natural width of the PNG ``path`` as the artifact viewer shows it (0: not loaded)."""
    open_artifact(driver, base, exp, run_id, path)
    return wait_for(driver, f"the image {path}", lambda d: d.execute_script(
        "const i = Array.from(document.images).find(i => i.alt === arguments[0] && i.complete);"
        "return i ? i.naturalWidth : null;", path))


def screenshot(driver: Any, name: str, out_dir: Path) -> Path:
    close_assistant(driver)
    time.sleep(0.5)
    path = out_dir / name
    driver.save_screenshot(str(path))
    if os.environ.get("ORCHESTRATOR_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(path, DOCS / name)
    return path


# -- the tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_checkpoint):
    _browser_or_skip()
    from mlflow_store import build_run

    tmp = tmp_path_factory.mktemp("mlflow_ui")
    t0 = time.monotonic()
    run = build_run(tiny_checkpoint, tmp / "run")
    with mlflow_server(run["uri"], tmp / "server.log") as (base, proc):
        driver = chromium()
        try:
            yield {**run, "base": base, "driver": driver, "shots": tmp, "server": proc}
        finally:
            driver.quit()
    print(f"\nMLflow UI checks: {time.monotonic() - t0:.0f}s with the store and server", file=sys.stderr)


def test_the_experiment_opens_on_its_runs_with_one_child_per_round(ui):
    from mlflow_store import ROUNDS

    d, exp = ui["driver"], ui["experiment_id"]
    open_page(d, ui["base"], ui_page(exp))
    wait_for(d, "the runs table", lambda d: "Run Name" in d.find_element("tag name", "body").text)
    assert "/runs" in d.current_url and "workflowType=machine_learning" in d.current_url
    children = expand_parent(d, "ui_check run")
    children.pop(ui["parent_id"])
    assert children == {ui["children"][t]: f"round_{t:03d}" for t in range(ROUNDS + 1)}
    screenshot(d, "mlflow_runs.png", ui["shots"])


def test_a_round_metric_on_the_parent_has_one_point_per_round(ui):
    from mlflow_store import JUDGE_SCORE, TRAIN_LOSS

    d, exp = ui["driver"], ui["experiment_id"]
    open_page(d, ui["base"], ui_page(exp, ui["parent_id"], "model-metrics"))
    chart = metric_chart(d, "judge/score_mean")
    assert chart["x"] == sorted(JUDGE_SCORE) and chart["y"] == [JUDGE_SCORE[t] for t in sorted(JUDGE_SCORE)]
    assert chart["markers"] == len(JUDGE_SCORE)
    screenshot(d, "mlflow_round_chart.png", ui["shots"])
    loss = metric_chart(d, "train/loss")
    assert loss["x"] == sorted(TRAIN_LOSS) and loss["y"] == [TRAIN_LOSS[t] for t in sorted(TRAIN_LOSS)]


def test_round_artifacts_open(ui):
    d, exp, base, r1 = ui["driver"], ui["experiment_id"], ui["base"], ui["children"][1]
    pairs = artifact_text(d, base, exp, r1, "data/pairs.jsonl", "answer 1 to prompt 0")
    assert '"rejected": "answer 0 to prompt 0"' in pairs
    artifact_text(d, base, exp, r1, "data/generations_sample.jsonl", "answer 1 to prompt 0 of round 1")
    assert artifact_image(d, base, exp, r1, "plots/pair_scores.png") == 400  # 4 in at 100 dpi
    assert artifact_image(d, base, exp, ui["parent_id"], "eval_metrics.png") == 1500


def test_the_experiment_is_tagged_for_the_training_view(ui):
    from mlflow.tracking import MlflowClient

    assert MlflowClient(ui["uri"]).get_experiment(ui["experiment_id"]).tags[KIND_TAG] == TRAINING_KIND
    # the value is the one this MLflow's UI calls "Machine learning" (its training-runs kind)
    import mlflow

    bundle = "".join(p.read_text(errors="ignore") for p in
                     (Path(mlflow.__file__).parent / "server/js/build/static/js").glob("main.*.js"))
    assert f'CUSTOM_MODEL_DEVELOPMENT="{TRAINING_KIND}"' in bundle


def test_ending_the_group_leaves_no_server_process(tmp_path, tiny_checkpoint):
    """What the fixture relies on: the server's job consumers die with the group."""
    _browser_or_skip()
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the store's tables
    with mlflow_server(uri, tmp_path / "server.log") as (_, proc):
        assert len(_group_alive(proc.pid)) >= 2  # the server and at least its app process
    assert _group_alive(proc.pid) == []


# -- README's screenshots from a real run ---------------------------------------------------------


def docs_screenshots(run_dir: Path, metric: str = "judge/score_mean") -> None:
    """docs/mlflow_runs.png and docs/mlflow_round_chart.png from a real run directory's store."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    ids = manifest["mlflow"]
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    parent = MlflowClient(uri).get_run(ids["parent_run_id"]).info.run_name
    os.environ["ORCHESTRATOR_UPDATE_SCREENSHOTS"] = "1"
    out = Path(os.environ.get("TMPDIR", "/tmp"))
    with mlflow_server(uri, out / "mlflow_server.log") as (base, _):
        driver = chromium()
        try:
            open_page(driver, base, ui_page(ids["experiment_id"]))
            expand_parent(driver, parent)
            screenshot(driver, "mlflow_runs.png", out)
            open_page(driver, base, ui_page(ids["experiment_id"], ids["parent_run_id"], "model-metrics"))
            metric_chart(driver, metric)
            screenshot(driver, "mlflow_round_chart.png", out)
        finally:
            driver.quit()
    print(f"wrote {DOCS / 'mlflow_runs.png'} and {DOCS / 'mlflow_round_chart.png'}")


if __name__ == "__main__":
    docs_screenshots(Path(sys.argv[1]), *sys.argv[2:3])
