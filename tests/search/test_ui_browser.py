"""The MLflow UI on a real search, in a real browser.

One tiny search logs to a real ``mlflow server`` on loopback; headless Chromium (Debian's
``/usr/bin/chromium``, driven by Playwright over the DevTools protocol) then does what
docs/mlflow_ui.md tells a user to do: open the experiment, switch to "Model training", add the
ratio / metric columns, expand the parent run, sort by a metric, filter the Pareto runs, compare
them (parallel coordinates, scatter) and open the parent run's ``frontier.png``.

Skipped when Chromium or the ``playwright`` package is missing (``.ci/run`` installs Chromium).
``SECATEURS_UI_SCREENSHOTS=docs/img pytest tests/search/test_ui_browser.py`` refreshes the screenshots
of docs/mlflow_ui.md; otherwise they are written under pytest's temporary directory.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SECATEURS_CHROMIUM", "/usr/bin/chromium")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.xdist_group("ui_browser"),  # one MLflow server and search for all: one pytest-xdist worker
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[test]')")

from mlflow.tracking import MlflowClient  # noqa: E402

from search.config import validate  # noqa: E402
from search.driver import run_search  # noqa: E402

TIMEOUT_MS = 45_000
VIEWPORT = {"width": 1600, "height": 900}
# Chromium flags for this closed network: no background connections, no first-run work.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-default-browser-check", "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1",
                  "--remote-debugging-port=0"]
# What a returning user has dismissed once: MLflow's assistant side panel (a third of every
# screenshot) and the GenAI overview's modal "Detect Issues" tip (it blocks every click).
DISMISSED = ("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
             "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
             "localStorage.setItem('mlflow.detectIssues.guidanceShown_v1', 'true');")
RUN_NAME_CELL = "[role=gridcell][col-id='attributes.`Run Name`']"
SEARCH_BOX = "[data-testid=search-box]"
PARETO_FILTER = "tags.secateurs.pareto = 'true'"
COLUMNS = ["accuracy", "latency_ms", "size_mb", "policy.criterion", "ratio.features.0", "ratio.features.3",
           "ratio.features.7", "secateurs.pareto"]
# Every cell of every rendered grid row, in the order the grid shows them (AG Grid splits a row
# between its pinned and centre containers and does not keep the DOM in display order).
GRID_ROWS_JS = """() => {
  const rows = new Map();
  for (const row of document.querySelectorAll('.ag-row[row-index]')) {
    const index = Number(row.getAttribute('row-index'));
    const cells = rows.get(index) || {};
    for (const cell of row.querySelectorAll('[role=gridcell][col-id]')) {
      const link = cell.querySelector('a');  // a run name cell: colour swatch + link
      cells[cell.getAttribute('col-id')] = (link || cell).textContent.trim();
    }
    rows.set(index, cells);
  }
  return [...rows.entries()].sort((a, b) => a[0] - b[0]).map(entry => entry[1]);
}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for(what: str, ready: Callable[[], object], timeout_s: float, alive: Callable[[], bool] = lambda: True):
    deadline = time.monotonic() + timeout_s
    while True:
        value = ready()
        if value:
            return value
        if not alive():
            raise RuntimeError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: ``$SECATEURS_UI_SCREENSHOTS`` (e.g. docs/img) or a temporary directory."""
    target = os.environ.get("SECATEURS_UI_SCREENSHOTS")
    path = Path(target).resolve() if target else tmp_path_factory.mktemp("ui-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def ui_search(tmp_path_factory, new_store):
    """A real ``mlflow server`` on loopback with one tiny quickstart search in it."""
    tmp = tmp_path_factory.mktemp("ui-search")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runner: faster start
    log = open(tmp / "mlflow-server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", new_store(tmp, "server.db"),
         "--artifacts-destination", str(tmp / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_for(f"mlflow server on {url} (log: {tmp / 'mlflow-server.log'})", lambda: _healthy(url), 120,
                  alive=lambda: server.poll() is None)
        raw = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
        raw["task"]["dense_epochs"] = 3
        raw["finetune"]["epochs"] = 0.2
        raw["measure"].update({"warmup": 2, "repeats": 5})
        raw["search"].update({"num_trials": 4, "population_size": 4, "max_concurrent": 2, "seed": 1,
                              "baseline_ratios": [0.5], "baselines": ["uniform"], "storage_path": str(tmp / "ray")})
        raw["tracking"] = {"experiment": "ui-browser", "run_name": "ui-search"}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SECATEURS_CACHE", str(tmp_path_factory.getbasetemp() / "secateurs-cache"))
            mp.chdir(tmp)
            result = run_search(validate(raw), config_name="quickstart", tracking_uri=url, out=lambda line: None)
        client = MlflowClient(url)
        children = client.search_runs(
            [result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'", max_results=100)
        yield {
            "url": url, "experiment_id": result.experiment_id, "parent_id": result.parent_run_id,
            "parent_name": client.get_run(result.parent_run_id).info.run_name,
            "children": {run.info.run_name: run for run in children},
            "pareto": sorted(run.info.run_name for run in children if run.data.tags.get("secateurs.pareto") == "true"),
        }
    finally:
        _stop_group(server)
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's Chromium, started here (own process group, new empty profile), driven by Playwright over CDP."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    log = open(profile.parent / "chromium.log", "wb")
    chromium = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    playwright = None
    try:
        active = profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        port = _wait_for("Chromium's DevTools port", lambda: active.is_file() and active.read_text().split("\n")[0].strip(),
                         60, alive=lambda: chromium.poll() is None)
        playwright = sync_api.sync_playwright().start()
        cdp = playwright.chromium.connect_over_cdp(f"http://127.0.0.1:{port}", timeout=TIMEOUT_MS)
        yield cdp
        cdp.close()
    finally:
        if playwright is not None:
            playwright.stop()
        _stop_group(chromium)
        log.close()


@pytest.fixture
def page(browser, request, tmp_path):
    """A fresh browser context per test (no UI state carried over); a screenshot when the test fails."""
    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script(DISMISSED)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:
        page.screenshot(path=str(tmp_path / "failed.png"))
        print(f"the page when {request.node.name} failed: {tmp_path / 'failed.png'} ({page.url})")
    context.close()


def snap(page, shots: Path, name: str, top_of=None) -> None:
    """Screenshot the window, after scrolling ``top_of``'s scrollable ancestors back to the top."""
    if top_of is not None:
        top_of.evaluate("e => { for (let n = e; n; n = n.parentElement) n.scrollTop = 0; }")
    page.mouse.move(0, 0)  # no hover tooltip in the picture
    page.screenshot(path=str(shots / name))


def grid_rows(page) -> list[dict[str, str]]:
    return page.evaluate(GRID_ROWS_JS)


def run_names(page) -> list[str]:
    return [row["attributes.`Run Name`"] for row in grid_rows(page) if "attributes.`Run Name`" in row]


def wait_grid(page, what: str, check: Callable[[list[dict[str, str]]], bool]) -> list[dict[str, str]]:
    return _wait_for(f"runs table: {what}", lambda: (lambda rows: rows if check(rows) else None)(grid_rows(page)),
                     TIMEOUT_MS / 1000)


def open_runs_table(page, ui_search: dict) -> None:
    """As a user would: the experiment's page, then the "Model training" view (MLflow 3 opens GenAI first)."""
    page.goto(f"{ui_search['url']}/#/experiments/{ui_search['experiment_id']}")
    page.get_by_text("Model training", exact=True).click()
    page.locator(RUN_NAME_CELL).filter(has_text=ui_search["parent_name"]).wait_for()


def add_columns(page, names: list[str]) -> None:
    """Columns -> tick each metric / param / tag; untick the attribute columns the runs don't use."""
    page.get_by_role("button", name="Columns").click()
    selector = page.locator("[data-component-id='mlflow.experiment_page.runs_table.column_selector']")
    find = selector.get_by_placeholder("Search columns")
    for name in ["Dataset", "Source", "Models", *names]:
        find.fill(name)
        selector.locator(".du-bois-light-tree-title").get_by_text(name, exact=True).first.click()
    page.keyboard.press("Escape")
    for name in names:
        page.locator("[role=columnheader]").get_by_text(name, exact=True).first.wait_for()


def test_runs_table_shows_the_search_its_trials_and_their_ratios(page, ui_search, shots):
    open_runs_table(page, ui_search)
    add_columns(page, COLUMNS)
    parent = page.locator(RUN_NAME_CELL).filter(has_text=ui_search["parent_name"])
    parent.locator("button").first.click()  # expand: the children are nested under the search
    children = set(ui_search["children"])
    kinds = sorted(run.data.tags["secateurs.kind"] for run in ui_search["children"].values())
    assert kinds == ["baseline", "dense", "trial", "trial", "trial", "trial"]
    rows = wait_grid(page, "the parent and its children", lambda rows: len(rows) == len(children) + 1)
    assert set(run_names(page)) == children | {ui_search["parent_name"]}
    assert run_names(page)[0] == ui_search["parent_name"]
    # a trial's ratios and metrics are in its row, as MLflow holds them
    trial = next(name for name in sorted(children) if name.startswith("trial-"))
    row = next(row for row in rows if row["attributes.`Run Name`"] == trial)
    run = ui_search["children"][trial]
    assert row["params.`ratio.features.0`"] == run.data.params["ratio.features.0"]
    assert row["params.`policy.criterion`"] == run.data.params["policy.criterion"]
    assert float(row["metrics.`accuracy`"]) == pytest.approx(run.data.metrics["accuracy"], rel=1e-6)
    assert float(row["metrics.`latency_ms`"]) == pytest.approx(run.data.metrics["latency_ms"], rel=1e-6)
    assert row["tags.`secateurs.pareto`"] == run.data.tags["secateurs.pareto"]
    snap(page, shots, "runs_table.png")


def test_sort_by_a_metric(page, ui_search):
    open_runs_table(page, ui_search)
    add_columns(page, ["accuracy"])
    page.locator("[role=columnheader][col-id='metrics.`accuracy`']").click()  # first click: descending
    _wait_for("sort in the URL", lambda: "orderByKey=metrics.%60accuracy%60" in page.url and "orderByAsc=false" in page.url,
              TIMEOUT_MS / 1000)

    def by_accuracy(rows):
        values = [row.get("metrics.`accuracy`", "-") for row in rows]
        numbers = [float(v) for v in values if v != "-"]
        return (len(rows) == len(ui_search["children"]) + 1 and numbers == sorted(numbers, reverse=True)
                and values[-1] == "-")  # the parent has no accuracy: last

    rows = wait_grid(page, "sorted by accuracy, descending", by_accuracy)
    best = max(run.data.metrics["accuracy"] for run in ui_search["children"].values())
    assert float(rows[0]["metrics.`accuracy`"]) == pytest.approx(best, rel=1e-6)
    assert rows[-1]["attributes.`Run Name`"] == ui_search["parent_name"]


def test_filter_pareto_runs(page, ui_search, shots):
    open_runs_table(page, ui_search)
    add_columns(page, COLUMNS)
    page.locator("[role=columnheader][col-id='metrics.`accuracy`']").click()
    box = page.locator(SEARCH_BOX)
    box.fill(PARETO_FILTER)
    box.press("Enter")
    expected = ui_search["pareto"]
    assert expected, "a search always has a frontier"
    page.get_by_text(f"{len(expected)} matching runs").wait_for()
    wait_grid(page, "only the pareto runs", lambda rows: sorted(run_names(page)) == expected)
    assert all(row["tags.`secateurs.pareto`"] == "true" for row in grid_rows(page))
    assert "searchFilter=tags.secateurs.pareto" in page.url  # the filtered view is a shareable link
    snap(page, shots, "pareto_filter.png")


def test_compare_pareto_runs_parallel_coordinates_and_scatter(page, ui_search, shots):
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "searchFilter": PARETO_FILTER,
                                    "orderByKey": "metrics.`accuracy`", "orderByAsc": "false"})
    page.goto(f"{ui_search['url']}/#/experiments/{ui_search['experiment_id']}/runs?{query}")
    expected = ui_search["pareto"]
    assert len(expected) >= 2, f"MLflow compares two runs or more; this search's frontier is {expected}"
    page.get_by_text(f"{len(expected)} matching runs").wait_for()
    wait_grid(page, "only the pareto runs", lambda rows: sorted(run_names(page)) == expected)
    page.locator("[role=columnheader] input[type=checkbox]").first.check()  # select all shown runs
    page.get_by_role("button", name="Compare").click()
    page.get_by_text(f"Comparing {len(expected)} Runs from 1 Experiment").wait_for()

    # parallel coordinates: the ratios and the three objectives (MLflow preselects a few keys
    # that differ between the runs; clicking a selected option would drop it, so add only the rest)
    page.get_by_text("Parallel Coordinates Plot", exact=True).click()
    wanted = {"Parameters:": ["ratio.features.0", "ratio.features.3", "ratio.features.7"],
              "Metrics:": ["accuracy", "latency_ms", "size_mb"]}
    for label, names in wanted.items():
        select = page.get_by_text(label, exact=True).locator("xpath=following-sibling::*[1]")
        for name in names:
            if name in select.locator(".du-bois-light-select-selection-item-content").all_text_contents():
                continue
            select.get_by_role("combobox").click()
            select.get_by_role("combobox").fill(name)
            page.locator(".du-bois-light-select-item-option").get_by_text(name, exact=True).click()
        page.keyboard.press("Escape")
    axes = [name for names in wanted.values() for name in names]
    _wait_for("parallel coordinates axes", lambda: set(axes) <= set(
        page.locator(".parcoords .axis-title").evaluate_all("titles => titles.map(t => t.textContent)")), 30)
    heading = page.get_by_text(f"Comparing {len(expected)} Runs from 1 Experiment")
    snap(page, shots, "compare_parallel_coordinates.png", top_of=heading)

    # scatter: latency against accuracy, one point per run
    page.get_by_text("Scatter Plot", exact=True).click()
    page.locator("#x-axis-selector").click()
    page.get_by_role("option").get_by_text("latency_ms", exact=True).click()
    page.locator("#y-axis-selector").click()
    page.get_by_role("option").get_by_text("accuracy", exact=True).click()
    xs = _wait_for("scatter of latency_ms", lambda: page.evaluate(
        "() => { const plot = [...document.querySelectorAll('.js-plotly-plot')].find(p => p.data && p.data[0]"
        " && p.layout && p.layout.xaxis && p.layout.xaxis.title && (p.layout.xaxis.title.text || p.layout.xaxis.title)"
        " === 'latency_ms'); return plot ? plot.data[0].x : null; }"), 30)
    latencies = [ui_search["children"][name].data.metrics["latency_ms"] for name in expected]
    assert sorted(xs) == pytest.approx(sorted(latencies), rel=1e-6)
    snap(page, shots, "compare_scatter.png", top_of=heading)


def test_parent_run_shows_the_frontier_plot(page, ui_search, shots):
    open_runs_table(page, ui_search)
    page.locator(RUN_NAME_CELL).get_by_role("link", name=ui_search["parent_name"], exact=True).click()
    page.get_by_role("tab", name="Artifacts").click()
    for name in ("config.yaml", "space.json", "frontier.csv", "frontier.png"):
        page.get_by_text(name, exact=True).wait_for()
    page.get_by_text("frontier.png", exact=True).click()
    image = page.locator("img[src^='blob:']").first
    image.wait_for()
    _wait_for("frontier.png loaded", lambda: image.evaluate("img => img.complete && img.naturalWidth > 0"), 30)
    assert ui_search["parent_id"] in page.url and page.url.split("?")[0].endswith("/artifacts")
    snap(page, shots, "frontier_artifact.png")
