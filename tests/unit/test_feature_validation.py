"""The feature-table gate of materialize (monitoring.feature_validation) on small synthetic tables.

Each case writes parquet tables shaped like the real feature views, runs the real Great
Expectations suites, and checks which expectation of which table and column fails.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pydantic
import pytest

from core.schema import CONTENT_VIEW, USER_VIEW
from monitoring.feature_validation import (
    REPORT_NAME,
    FeatureGateConfig,
    FeatureValidationError,
    domain_of,
    inject_fault,
    load_profiles,
    online_slice,
    profile_path,
    validate_feature_tables,
)

NOW = pd.Timestamp("2022-05-10", tz="UTC")
T0 = pd.Timestamp("2022-04-25", tz="UTC")


def content_table(n_posts: int = 120, hours: int = 6, seed: int = 0) -> pd.DataFrame:
    """Hourly rows per post with every content feature in its domain."""
    rng = np.random.default_rng(seed)
    rows = n_posts * hours
    out = pd.DataFrame({
        "post_id": np.repeat(np.arange(n_posts, dtype="int64"), hours),
        "event_timestamp": np.tile(pd.date_range(T0, periods=hours, freq="h"), n_posts),
    })
    for f, dtype in CONTENT_VIEW.features.items():
        kind = domain_of(f)
        if kind == "rate":
            values = rng.beta(2, 20, rows)
        elif kind == "epoch_s":
            values = rng.integers(int(T0.timestamp()) - 86400 * 30, int(T0.timestamp()), rows)
        else:
            values = np.round(rng.lognormal(3, 1, rows)) if dtype == "float64" else rng.integers(0, 2, rows)
        out[f] = values.astype(dtype)
    out["post_duration_ms"] = rng.uniform(5_000, 120_000, rows)
    return out


def user_table(n_users: int = 80, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    out = pd.DataFrame({"user_id": np.arange(n_users, dtype="int64"),
                        "event_timestamp": pd.Timestamp(T0)})
    for f, dtype in USER_VIEW.features.items():
        values = rng.beta(2, 20, n_users) if domain_of(f) == "rate" else rng.integers(0, 50, n_users)
        out[f] = values.astype(dtype)
    return out


def write(folder, content: pd.DataFrame, users: pd.DataFrame | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    content.to_parquet(folder / f"{CONTENT_VIEW.table}.parquet")
    (users if users is not None else user_table()).to_parquet(folder / f"{USER_VIEW.table}.parquet")
    return folder


VIEWS = (USER_VIEW, CONTENT_VIEW)


def gate(tables, reports, **kw):
    return validate_feature_tables(tables, reports, views=VIEWS, now=NOW, **kw)


def failures(exc: FeatureValidationError) -> set[tuple[str, str | None, str]]:
    return {(o.file, o.column, o.expectation) for o in exc.report.failures()}


def test_clean_tables_pass_and_become_the_baseline(tmp_path):
    tables = write(tmp_path / "t", content_table())
    result = gate(tables, tmp_path / "r")
    assert result.report.success
    assert result.data_docs is not None and result.data_docs.exists()
    profiles = load_profiles(tmp_path / "r")
    assert profiles["content_features"].rows == 720 and profiles["content_features"].online_rows == 120
    # second run: the row-count and per-feature comparisons with the baseline now run, and pass
    again = gate(tables, tmp_path / "r")
    kinds = {o.expectation for o in again.report.outcomes}
    assert {"expect_table_row_count_to_be_between", "expect_column_median_to_be_between",
            "expect_column_max_to_be_between"} <= kinds
    assert len(again.report.outcomes) > len(result.report.outcomes)


def test_a_longer_log_passes_against_the_baseline(tmp_path):
    gate(write(tmp_path / "a", content_table(hours=6)), tmp_path / "r")
    grown = content_table(n_posts=140, hours=9, seed=5)  # more posts and hours, same distributions
    assert gate(write(tmp_path / "b", grown), tmp_path / "r").report.success


def test_the_injected_fault_is_stopped_naming_table_column_and_expectation(tmp_path):
    gate(write(tmp_path / "a", content_table()), tmp_path / "r")
    before = profile_path(tmp_path / "r").read_text()
    faulted = inject_fault(content_table(), "post_duration_ms", "post_click_rate_24h", null_share=0.2)
    with pytest.raises(FeatureValidationError) as err:
        gate(write(tmp_path / "b", faulted), tmp_path / "r")
    online = "content_features (online slice)"
    assert failures(err.value) == {
        (online, "post_duration_ms", "expect_column_median_to_be_between"),
        (online, "post_duration_ms", "expect_column_max_to_be_between"),
        (online, "post_click_rate_24h", "expect_column_values_to_not_be_null"),
    }
    msg = str(err.value)
    assert "materialisation stopped" in msg and "post_duration_ms" in msg and "post_click_rate_24h" in msg
    # the failed run neither moved the baseline nor hid its report
    assert profile_path(tmp_path / "r").read_text() == before
    report = json.loads((tmp_path / "r" / REPORT_NAME).read_text())
    assert report["success"] is False and report["failed"] == 3
    # the Data Docs site has a page for each run of the online suite, the failed one included
    site = tmp_path / "r" / "gx" / "uncommitted" / "data_docs" / "local_site"
    pages = sorted((site / "validations" / "feature_table_content_features_online").rglob("*.html"))
    assert len(pages) == 2
    text = [re.sub(r"<[^>]+>|\s+", " ", p.read_text()) for p in pages]
    assert sum(bool(re.search(r"Unsuccessful Expectations\s+3\b", t)) for t in text) == 1
    assert sum(bool(re.search(r"Unsuccessful Expectations\s+0\b", t)) for t in text) == 1
    assert "feature_table_content_features_online" in (site / "index.html").read_text()


def test_a_fault_in_the_newest_rows_only_is_caught_in_the_online_slice(tmp_path):
    """The last hour is 1/6 of the table but all of what Redis would get."""
    clean = content_table()
    gate(write(tmp_path / "a", clean), tmp_path / "r")
    last = clean["event_timestamp"] == clean["event_timestamp"].max()
    faulted = clean.copy()
    faulted.loc[last, "post_duration_ms"] *= 1000
    with pytest.raises(FeatureValidationError) as err:
        gate(write(tmp_path / "b", faulted), tmp_path / "r")
    assert ("content_features (online slice)", "post_duration_ms", "expect_column_median_to_be_between") \
        in failures(err.value)


@pytest.mark.parametrize("breakage, expected", [
    (lambda t: t.assign(post_click_rate_24h=t["post_click_rate_24h"] + 1.0),
     ("content_features (online slice)", "post_click_rate_24h", "expect_column_values_to_be_between")),
    (lambda t: t.assign(post_impressions_1h=-t["post_impressions_1h"] - 1),
     ("content_features (online slice)", "post_impressions_1h", "expect_column_values_to_be_between")),
    (lambda t: pd.concat([t, t.iloc[:3]]),
     ("content_features", None, "expect_compound_columns_to_be_unique")),
    (lambda t: t.drop(columns=["post_is_ad"]),
     ("content_features", "post_is_ad", "expect_column_to_exist")),
])
def test_domain_and_schema_checks_run_without_a_baseline(tmp_path, breakage, expected):
    with pytest.raises(FeatureValidationError) as err:
        gate(write(tmp_path / "t", breakage(content_table())), tmp_path / "r")
    assert expected in failures(err.value)
    assert not profile_path(tmp_path / "r").exists()


def test_a_shrunken_table_fails_its_row_count(tmp_path):
    gate(write(tmp_path / "a", content_table(n_posts=120)), tmp_path / "r")
    with pytest.raises(FeatureValidationError) as err:
        gate(write(tmp_path / "b", content_table(n_posts=50)), tmp_path / "r")
    assert ("content_features", None, "expect_table_row_count_to_be_between") in failures(err.value)


def test_online_slice_is_the_latest_row_per_entity_up_to_the_window_end():
    table = content_table(n_posts=3, hours=4)
    got = online_slice(table, CONTENT_VIEW, until=T0 + pd.Timedelta(hours=2))
    assert sorted(got["post_id"]) == [0, 1, 2]
    assert (got["event_timestamp"] == T0 + pd.Timedelta(hours=2)).all()
    assert (online_slice(table, CONTENT_VIEW)["event_timestamp"] == T0 + pd.Timedelta(hours=3)).all()


def test_online_slice_leaves_out_null_keys_and_stamps_and_keeps_the_last_of_tied_rows():
    table = content_table(n_posts=2, hours=2)
    last = T0 + pd.Timedelta(hours=1)
    tie = table[(table["post_id"] == 1) & (table["event_timestamp"] == last)].assign(post_click_rate_24h=0.5)
    no_key = table.iloc[[0]].assign(post_id=np.nan, event_timestamp=last + pd.Timedelta(hours=1))
    no_stamp = table.iloc[[2]].assign(event_timestamp=pd.NaT)
    got = online_slice(pd.concat([table, tie, no_key, no_stamp], ignore_index=True), CONTENT_VIEW)
    assert sorted(got["post_id"]) == [0, 1] and (got["event_timestamp"] == last).all()
    assert got.set_index("post_id").loc[1, "post_click_rate_24h"] == 0.5  # the later row of the tie


def test_gate_config_rejects_nonsense():
    with pytest.raises(pydantic.ValidationError):
        FeatureGateConfig(min_row_ratio=0.9, max_row_ratio=0.5)
    with pytest.raises(pydantic.ValidationError):
        FeatureGateConfig.model_validate({"null_share_tolerence": 0.1})  # typo: unknown key
    assert FeatureGateConfig(scale_ratio=100).scale_ratio == 100
