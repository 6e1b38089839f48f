"""The drift dashboard and an Evidently report, opened in headless chromium (Playwright).

Three real drift runs (``compute_drift`` on synthetic windows: two clean, the last one with a
unit change, new nulls and overconfident click scores) are written as drift_job writes them, the
dashboard is generated, and Debian's chromium checks that every plot rendered with no page or
console error, that the run links open, and that Evidently's own report draws its plots.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urljoin, urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd
import pytest

from monitoring.dashboards.drift_page import write_drift_dashboard
from monitoring.drift import compute_drift, write_summary
from monitoring.reference import monitored_features, score_column
from tests.unit.test_monitoring_drift import _window as synthetic_window

pytestmark = pytest.mark.integration

RUNS = ("20250101T000000Z", "20250102T000000Z", "20250103T000000Z")  # drift_job's UTC folder names
PLOTS = ("drift-share", "views", "predictions", "labels", "nulls")
WAIT_MS = 30_000  # bounded waits for rendering, never fixed sleeps


def _features() -> list[str]:
    """A quarter of the monitored features (most views; Evidently's time grows with the columns)
    and the two the shifted run breaks."""
    features = list(monitored_features())
    return sorted(set(features[::4]) | {"post_duration_ms", "user_lt_click_rate"})


def _window(n: int, seed: int) -> pd.DataFrame:
    """Rows of ``_features()``, per-head scores and labels (test_monitoring_drift's synthetic window)."""
    return synthetic_window(n, seed, _features())


@pytest.fixture(scope="module")
def drift_dir(tmp_path_factory) -> Path:
    """``<state>/reports/drift`` with three runs, each with its summary.json and Evidently report.html."""
    root = tmp_path_factory.mktemp("state") / "reports" / "drift"
    reference = _window(800, 1)
    shifted = _window(600, 4)
    shifted["post_duration_ms"] *= 1000  # ms -> us upstream
    shifted.loc[np.random.default_rng(0).random(len(shifted)) < 0.2, "user_lt_click_rate"] = np.nan
    shifted[score_column("click")] = np.clip(shifted[score_column("click")] + 0.3, 0, 1)
    for name, current in zip(RUNS, (_window(600, 2), _window(600, 3), shifted)):
        summary = compute_drift(reference, current, html_path=root / name / "report.html",
                                current_info={"source": f"synthetic window {name}"})
        write_summary(summary, root / name / "summary.json")
    return root


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency (.[test])")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not on PATH (scripts/setup.sh installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, path_or_url, errors: list[str]):
    """A new page at ``path_or_url`` recording page errors and console errors into ``errors``."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.goto(path_or_url if isinstance(path_or_url, str) else Path(path_or_url).resolve().as_uri())
    return page


def _url_to_path(url: str) -> Path:
    parsed = urlparse(url)
    assert parsed.scheme == "file", url
    return Path(url2pathname(parsed.path))


def test_the_dashboard_renders_every_plot_in_chromium(drift_dir, browser):
    page_path = write_drift_dashboard(drift_dir)
    errors: list[str] = []
    page = _open(browser, page_path, errors)
    try:
        for div in PLOTS:
            page.wait_for_selector(f"#{div}.js-plotly-plot .main-svg", timeout=WAIT_MS)
        assert page.locator(".js-plotly-plot").count() == len(PLOTS)

        # drift share: one marker per run on the first trace, and the gate trace beside it
        share_traces = page.locator("#drift-share .scatterlayer .trace")
        assert share_traces.count() == 2
        assert share_traces.nth(0).locator("path.point").count() == len(RUNS)
        assert page.evaluate("document.getElementById('drift-share').data[0].x.length") == len(RUNS)
        # the bar charts drew bars (a bar with a value is a path with a non-empty "d")
        for div in ("views", "predictions", "labels", "nulls"):
            assert page.locator(f"#{div} .barlayer .trace").count() > 0, div
            drawn = page.evaluate(f"""[...document.querySelectorAll('#{div} .barlayer .trace path')]
                                      .filter(p => (p.getAttribute('d') || '').length > 2).length""")
            assert drawn > 0, div

        # the shifted (latest) run's drifted features are named, strongest first
        top = page.inner_text("#top-features")
        assert "post_duration_ms" in top and "user_lt_click_rate" in top
        assert "score_click" in page.inner_text("#runs")  # its drifted head

        # every run links to its Evidently report, relative to the page
        hrefs = [a.get_attribute("href") for a in page.locator("#runs a.report").all()]
        assert len(hrefs) == len(RUNS) and all(not h.startswith(("/", "file:")) for h in hrefs)
        targets = {_url_to_path(urljoin(page.url, h)) for h in hrefs}
        assert targets == {(drift_dir / name / "report.html").resolve() for name in RUNS}
        assert errors == []
    finally:
        page.close()


def test_a_run_link_opens_evidentlys_report_with_its_plots(drift_dir, browser):
    page_path = write_drift_dashboard(drift_dir)
    errors: list[str] = []
    page = _open(browser, page_path, errors)
    try:
        href = page.locator("#runs a.report").first.get_attribute("href")  # newest run first: the shifted one
        page.goto(urljoin(page.url, href))
        # Evidently 0.7's report is a React app: the column table draws each distribution on a canvas
        page.wait_for_function(
            """() => [...document.querySelectorAll('tbody canvas')].some(c => {
                   if (!c.width || !c.height) return false;
                   const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   for (let i = 3; i < px.length; i += 4) if (px[i] > 0) return true;
                   return false; })""", timeout=WAIT_MS)
        # the report's search finds the drifted column; expanding its row renders its plotly plot
        page.get_by_placeholder("Search").first.fill("post_duration_ms")
        row = page.locator("tbody tr", has_text="post_duration_ms").first
        row.wait_for(timeout=WAIT_MS)
        assert "Detected" in row.inner_text() and "Not Detected" not in row.inner_text()
        row.locator("button").first.click()
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=WAIT_MS)
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .scatterlayer .trace, "
                               ".js-plotly-plot .barlayer .trace').length > 0", timeout=WAIT_MS)
        assert errors == []
    finally:
        page.close()
