"""monitoring.dashboards.drift_page: the empty state, unreadable summaries skipped, escaping, links."""

from __future__ import annotations

import json
import re

from monitoring.dashboards.drift_page import load_runs, summary_from_dict, write_drift_dashboard
from monitoring.drift import ColumnDrift, DriftSummary, write_summary


def _summary(feature: str = "post_duration_ms", source: str = "training set dates 20220501..20220502") -> DriftSummary:
    """A small hand-made summary (no Evidently): one drifted feature, one clean, one head, labels."""
    return DriftSummary(
        features=[ColumnDrift(feature, "content_features", "K-S p_value", 1e-9, 0.05, True, 0.0, 0.0,
                              "K-S p_value", 1e-9, 0.05),
                  ColumnDrift("user_impressions", "user_features", "K-S p_value", 0.6, 0.05, False, 0.1, 0.3,
                              "K-S p_value", 0.6, 0.05)],
        predictions=[ColumnDrift("score_click", "prediction", "K-S p_value", 0.4, 0.05, False, 0.0, 0.0,
                                 "K-S p_value", 0.4, 0.05)],
        drift_share=0.5, max_drift_share=0.3,
        labels={"click": {"reference_rate": 0.3, "current_rate": 0.25, "reference_auc": 0.7, "current_auc": 0.68,
                          "reference_ece": 0.02, "current_ece": 0.05}},
        reference={"rows": 100, "source": "heavy_ranker v1 reference"}, current={"rows": 80, "source": source},
    )


def test_no_runs_is_a_page_saying_how_to_produce_one(tmp_path):
    drift_dir = tmp_path / "reports" / "drift"  # a fresh state has no drift folder yet
    page = write_drift_dashboard(drift_dir)
    assert page == drift_dir / "index.html"
    text = page.read_text()
    assert "No drift runs yet" in text and "home-mixer monitor drift" in text
    assert "plotly" not in text.lower()  # nothing to plot: no 3.5 MB library either


def test_unreadable_summaries_are_skipped_and_named(tmp_path):
    drift_dir = tmp_path / "drift"
    write_summary(_summary(), drift_dir / "20250103T000000Z" / "summary.json")
    # an older summary: no by_view, no null shares, no predictions or labels
    old = {"drift_share": 0.0, "max_drift_share": 0.3,
           "features": [{"column": "user_impressions", "view": "user_features", "method": "K-S p_value",
                         "statistic": 0.5, "threshold": 0.05, "drifted": False}]}
    (drift_dir / "20250101T000000Z").mkdir(parents=True)
    (drift_dir / "20250101T000000Z" / "summary.json").write_text(json.dumps(old))
    bad = {"bad_json": "{not json", "no_share": json.dumps({"max_drift_share": 0.3}),
           "features_not_a_list": json.dumps({"drift_share": 0.1, "max_drift_share": 0.3, "features": {}}),
           "a_list": "[1, 2]"}
    for name, content in bad.items():
        (drift_dir / name).mkdir()
        (drift_dir / name / "summary.json").write_text(content)
    (drift_dir / "still_running").mkdir()

    runs, skipped = load_runs(drift_dir)
    assert [r.name for r in runs] == ["20250101T000000Z", "20250103T000000Z"]  # by the UTC time in the name
    assert {s.name for s in skipped} == {*bad, "still_running"}
    reasons = {s.name: s.reason for s in skipped}
    assert "drift_share is missing" in reasons["no_share"] and "no summary.json" in reasons["still_running"]

    text = write_drift_dashboard(drift_dir).read_text()
    assert "Skipped run folders (5)" in text
    for name in bad:
        assert f"<b>{name}</b>" in text
    assert "post_duration_ms" in text  # the latest run's drifted feature


def test_text_from_a_summary_is_escaped(tmp_path):
    drift_dir = tmp_path / "drift"
    write_summary(_summary(feature="<script>alert(1)</script>", source="<b onmouseover=x>log</b>"),
                  drift_dir / "20250101T000000Z" / "summary.json")
    text = write_drift_dashboard(drift_dir).read_text()
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)" in text
    assert "<b onmouseover" not in text


def test_summary_round_trips_and_links_are_relative_to_the_page(tmp_path):
    original = _summary()
    assert summary_from_dict(original.to_dict()) == original

    drift_dir = tmp_path / "state" / "reports" / "drift"
    run = drift_dir / "20250101T000000Z"
    write_summary(original, run / "summary.json")
    (run / "report.html").write_text("<html></html>")
    page = write_drift_dashboard(drift_dir, out=tmp_path / "site" / "drift.html")
    hrefs = re.findall(r"class='report' href='([^']+)'", page.read_text())
    assert hrefs and all(not h.startswith("/") for h in hrefs)
    assert all((page.parent / h).resolve() == (run / "report.html").resolve() for h in hrefs)


def test_heads_without_current_labels_are_said_not_plotted(tmp_path):
    summary = _summary()
    summary.labels = {"click": {"status": "no labelled rows in the current window", "reference_rate": 0.3,
                                "reference_labelled_rows": 100, "current_labelled_rows": 0}}
    summary.current["labels"] = "0 of 80 rows labelled"
    write_summary(summary, tmp_path / "drift" / "20250101T000000Z" / "summary.json")
    text = write_drift_dashboard(tmp_path / "drift").read_text()
    assert "id='labels-empty'" in text and "id=\"labels\"" not in text
    note = re.search(r"<p class='note' id='labels-note'>(.*?)</p>", text).group(1)
    assert "click: no labelled rows in the current window" in note and "current labelled rows: 0" in note
