"""Mixer config: embedded default, merging a file over it, and clear errors for bad values."""

from __future__ import annotations

import pytest

from core.schema import HEADS
from mixer.config import ConfigError, load_config


def test_embedded_default_is_valid_and_documented_values_hold():
    cfg = load_config()
    assert cfg.feast.project == "home_mixer"
    assert cfg.ranking.heavy_ranker_top_k == 200
    assert cfg.filters.max_post_age_days == 30 and cfg.filters.max_posts_per_author == 2
    assert (cfg.page.default_size, cfg.page.max_size) == (20, 100)
    assert [a.name for a in cfg.experiment.arms] == ["control", "engagement_plus"]
    for arm in cfg.experiment.arms:
        assert set(arm.weights) == set(HEADS) and arm.weights["hate"] < 0
    # the demo serves as of the end of the log: 2022-05-04T16:00:00Z
    assert cfg.clock.now_s() == 1651680000.0
    assert cfg.light_ranker.backend == "compiled" and cfg.light_ranker.cache_dir is None


def test_file_merges_over_default(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("redis_url: redis://127.0.0.1:1/0\nranking:\n  heavy_ranker_top_k: 50\nclock:\n  now: real\n")
    cfg = load_config(path)
    assert cfg.redis_url == "redis://127.0.0.1:1/0"
    assert cfg.ranking.heavy_ranker_top_k == 50
    assert cfg.ranking.author_diversity_decay == 0.5  # sibling key kept from the default
    assert cfg.clock.now == "real"


def test_running_clock_advances_from_now_at_since():
    import time
    from datetime import datetime, timedelta, timezone

    from mixer.config import ClockSettings, running_clock

    since = datetime.now(timezone.utc) - timedelta(seconds=90)
    clock = ClockSettings(now="2022-05-04T16:00:00Z", since=since.isoformat())
    assert clock.now_s() == pytest.approx(1651680000.0 + 90, abs=0.5)
    sim = running_clock(datetime(2022, 5, 4, 16, tzinfo=timezone.utc), since)
    assert sim() == pytest.approx(clock.now_s(), abs=0.5)
    w0 = time.time()
    t = sim()
    time.sleep(0.05)
    t2 = sim()
    w1 = time.time()
    assert 0.05 <= t2 - t <= w1 - w0 + 1e-6  # it advances with the wall clock, no faster


@pytest.mark.parametrize("text, needle", [
    ("ranking:\n  heavy_ranker_top_k: 0\n", "ranking.heavy_ranker_top_k"),
    ("rankng:\n  heavy_ranker_top_k: 5\n", "rankng"),
    ("clock:\n  now: yesterday\n", "clock.now"),
    ("clock:\n  now: '2022-05-04T16:00:00'\n", "time zone"),
    ("clock:\n  now: real\n  since: '2026-01-01T00:00:00Z'\n", "clock.since needs"),
    ("clock:\n  now: '2022-05-04T16:00:00Z'\n  since: soon\n", "clock.since must be an ISO-8601"),
    ("page:\n  default_size: 200\n", "page.default_size"),
    ("scoring:\n  threads: 0\n", "scoring.threads"),
    ("light_ranker:\n  backend: treelite\n", "light_ranker.backend"),
    ("light_ranker:\n  check_rows: -1\n", "light_ranker.check_rows"),
    ("experiment:\n  salt: s\n  arms:\n    - {name: a, traffic_share: 0.7, weights: {click: 1}}\n", "sum to"),
    ("experiment:\n  salt: s\n  arms:\n    - {name: a, traffic_share: 1.0, weights: {clicks: 1}}\n", "unknown heads"),
    ("experiment:\n  salt: s\n  arms:\n    - {name: a, traffic_share: 1.0, weights: {click: 1}, "
     "light_score_exponent: -1}\n", "light_score_exponent"),
])
def test_bad_values_name_the_key(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
