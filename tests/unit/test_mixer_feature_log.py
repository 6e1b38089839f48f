"""Feature logging without Redis: the entry encoding, the runner handing the served items' feature
rows to side effects (after top K re-orders the frame and the selectors drop it), the side effect's
fields and its gate. (Its CPU per page is measured by ``bench/feature_log.py``.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import redis

from core import online_layout as keys
from core.feature_log import FEATURE_SCHEMA_ID, decode_features, encode_features
from core.schema import ALL_FEATURES
from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource, FeatureHydrator, Scorer, SideEffect, TimelineResult
from mixer.config import load_config, parse_config
from mixer.metrics import MixerMetrics
from mixer.pipeline_runner import CandidatePipeline, PipelineRunner, ScoringStage
from mixer.selectors import AuthorDiversitySelector, PageSelector, TopKSelector
from mixer.side_effects import FeatureLogSideEffect

F = len(ALL_FEATURES)


def _query(n=20) -> Query:
    return Query(user_id=42, page_size=n, now_s=1_651_680_000.5, request_id="abc", surface=4)


def test_encoding_round_trips_float64_and_checks_schema_and_width():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3, F)) * 1e6
    rows[0, 3] = np.nan
    raw = [encode_features(r) for r in rows]
    assert all(len(v) == 8 * F for v in raw)
    back = decode_features(raw, [FEATURE_SCHEMA_ID.encode()] * 3)
    np.testing.assert_array_equal(back, rows)  # bit-exact, NaN included
    with pytest.raises(ValueError, match="feature schema"):
        decode_features(raw, [b"0123456789ab"] * 3)
    with pytest.raises(ValueError, match="bytes of features"):
        decode_features([raw[0][:-8]])
    with pytest.raises(ValueError, match="values"):
        encode_features(np.zeros(F + 1))
    assert decode_features([]).shape == (0, F)


class Posts(CandidateSource):
    name, timeout_ms = "posts", 1000.0

    def __init__(self, n):
        self.n = n

    def fetch(self, query):
        return [Candidate(post_id=p, source=self.name, author_id=p % 7) for p in range(1, self.n + 1)]


class PostValued(FeatureHydrator):
    """Every feature of post p = p * 1000 + column index (so a row names its post)."""

    name, stage = "post_valued", "feature_hydration"

    def hydrate(self, query, candidates, features=None):
        ids = np.array([c.post_id for c in candidates], dtype="float64")
        return pd.DataFrame(ids[:, None] * 1000 + np.arange(F)[None, :], columns=list(ALL_FEATURES))


class ByPost(Scorer):
    """light_score and score from the post id (odd posts first), so top K re-orders the frame."""

    name, version = "light_ranker", "3"

    def score(self, query, candidates, features):
        assert (features.iloc[:, 0].to_numpy() // 1000 == [c.post_id for c in candidates]).all()
        for c in candidates:
            c.light_score = c.score = (c.post_id % 2) * 100 + c.post_id
        return "in_process"


class Keep(SideEffect):
    name = "keep"

    def __init__(self):
        self.result = None

    def apply(self, result):
        self.result = result


def test_the_runner_hands_side_effects_the_served_items_feature_rows():
    keep = Keep()
    pipeline = CandidatePipeline(
        candidate_sources=[Posts(60)], feature_hydrators=[PostValued()],
        scoring=[ScoringStage("light_ranker", scorers=[ByPost()]),
                 ScoringStage("heavy_ranker", selectors=[TopKSelector(30)])],
        selectors=[AuthorDiversitySelector(2), PageSelector()], side_effects=[keep])
    with ThreadPoolExecutor(2) as pool:
        result = PipelineRunner(pipeline, executor=pool, metrics=MixerMetrics()).run(_query(10))
    assert result is keep.result and len(result.items) == 10
    assert len(result.ranked) == 30 and len(result.features) == 30  # the top-K frame, not a copy per item
    rows = result.item_features()
    assert rows.shape == (10, F) and rows.dtype == np.float64
    want = np.array([c.post_id for c in result.items], dtype="float64")[:, None] * 1000 + np.arange(F)
    np.testing.assert_array_equal(rows, want)


def test_item_features_refuses_to_guess():
    c = Candidate(1, "x")
    bare = TimelineResult(_query(), [c], None, {}, [], {}, {}, {})
    with pytest.raises(ValueError, match="no feature frame"):
        bare.item_features()
    frame = pd.DataFrame(np.zeros((1, F)), columns=list(ALL_FEATURES))
    other = TimelineResult(_query(), [Candidate(1, "x")], None, {}, [], {}, {}, {}, ranked=[c], features=frame)
    with pytest.raises(ValueError, match="not one of the scored candidates"):
        other.item_features()


class PackingClient:
    """A Redis client whose pipelines pack their commands (as redis-py sends them) and keep them."""

    def __init__(self):
        self.redis = redis.Redis(host="127.0.0.1", port=1)  # never connected
        self.conn = redis.connection.Connection()
        self.sent: list[list] = []

    def pipeline(self, transaction=False):
        pipe = self.redis.pipeline(transaction=transaction)

        def execute():
            stack = [c[0] for c in pipe.command_stack]
            self.conn.pack_commands(stack)  # raises on a value redis-py cannot send
            self.sent.append(stack)
            pipe.reset()

        pipe.execute = execute
        return pipe


def _served(n=20):
    cands = [Candidate(post_id=1000 + i, source="popular", author_id=7 + i) for i in range(200)]
    frame = pd.DataFrame(np.random.default_rng(1).normal(size=(200, F)), columns=list(ALL_FEATURES))
    items = cands[5:5 + n][::-1]
    return TimelineResult(_query(n), items, None, {}, [], {}, {}, {"light_ranker": "3", "heavy_ranker": "5"},
                          ranked=cands, features=frame), frame


def test_feature_log_entries_and_gate():
    client = PackingClient()
    effect = FeatureLogSideEffect(client, maxlen=1000, wall_clock=lambda: 1_700_000_000.0)
    result, frame = _served(20)
    effect.apply(result)
    (stack,) = client.sent
    assert len(stack) == 20
    args = stack[0]
    assert args[0] == "XADD" and args[1] == keys.SERVED_FEATURES
    text = [a.decode() if isinstance(a, bytes) and k != len(args) - 1 else a for k, a in enumerate(args)]
    assert [str(a) for a in text[2:6]] == ["MAXLEN", "~", "1000", "*"]
    fields = dict(zip(text[6::2], text[7::2]))
    assert list(fields)[-1] == "features"
    assert fields["request_id"] == "abc" and fields["user_id"] == 42 and fields["surface"] == 4
    assert fields["post_id"] == 1024 and fields["author_id"] == 31  # items are reversed: cands[24] first
    assert fields["as_of"] == "1651680000.500000" and fields["served_at"] == "1700000000.000"
    assert fields["light_ranker_version"] == "3" and fields["heavy_ranker_version"] == "5"
    assert fields["schema"] == FEATURE_SCHEMA_ID
    np.testing.assert_array_equal(decode_features([fields["features"]])[0], frame.iloc[24].to_numpy())
    off = FeatureLogSideEffect(client, maxlen=10, enabled=False)
    assert not off.enabled(result.query) and effect.enabled(result.query)
    with pytest.raises(ValueError, match="stream_maxlen"):
        FeatureLogSideEffect(client, maxlen=0)


def test_config_gates_the_feature_log():
    cfg = load_config()
    assert cfg.feature_logging.enabled and cfg.feature_logging.stream_maxlen == 100_000
    data = cfg.model_dump()
    data["feature_logging"] = {"enabled": False, "stream_maxlen": 5}
    assert not parse_config(data).feature_logging.enabled
    data["feature_logging"] = {"stream_maxlen": 0}
    with pytest.raises(ValueError, match="feature_logging.stream_maxlen"):
        parse_config(data)
