"""Leave-one-group-out ablation of the heavy ranker (models.train.heavy_ablation)."""

from __future__ import annotations

import numpy as np
import pytest

from core.schema import HEADS
from models.heavy_ranker import HeavyRankerParams
from models.train import format_ablation, heavy_ablation
from tests.unit.test_models_heavy_ranker import FEATURES, synthetic_frame

PARAMS = HeavyRankerParams(hidden=(32,), tower=8, max_epochs=8, patience=2, num_threads=1, id_embedding_dim=0)


@pytest.fixture(scope="module")
def table():
    frame, _ = synthetic_frame(per_day=4000, days=4)
    frame["request_id"] = np.arange(len(frame)) // 20
    last = frame["date"] == frame["date"].max()
    # every head depends on all six features; "most" removes five of them, "one" a single one
    groups = {"most": tuple(FEATURES[:5]), "one": (FEATURES[5],)}
    return heavy_ablation(frame[~last], frame[last], PARAMS, FEATURES, groups=groups, noise_seeds=2,
                          log=lambda line: None)


def test_one_row_per_group_plus_the_full_model_and_the_seed_spread(table):
    assert table["variant"].tolist() == ["all", "-most", "-one", "seed spread"]
    assert table["removed"].tolist() == [0, 5, 1, 0]


def test_deltas_are_differences_from_the_full_model(table):
    for h in HEADS:
        np.testing.assert_allclose(table[f"{h}_delta"][:3], table[f"{h}_request_gauc"][:3] - table[f"{h}_request_gauc"][0])
    assert (table.loc[table.variant == "seed spread", [f"{h}_delta" for h in HEADS]].to_numpy() >= 0).all()


def test_removing_most_of_the_signal_costs_more_than_the_seed_noise(table):
    most = table.set_index("variant").loc["-most"]
    spread = table.set_index("variant").loc["seed spread"]
    for head in ("click", "long_view"):  # the heads with enough positives to measure
        assert most[f"{head}_delta"] < -0.05 and -most[f"{head}_delta"] > spread[f"{head}_delta"]
    assert most["mean_delta"] < table.set_index("variant").loc["-one", "mean_delta"]


def test_text_table_marks_changes_within_the_noise(table):
    text = format_ablation(table)
    assert text.splitlines()[0].split()[:3] == ["variant", "removed", "click"]
    assert "seed spread" in text and "±" in text and "training noise" in text
    assert "-most" in text


def test_with_attention_off_the_ablation_compares_turning_it_on():
    from core.schema import SEQUENCE_ID_FEATURES
    from tests.unit.test_din_attention import NAMES, _interest_frame

    frame = _interest_frame(users=300, days=3)
    frame["request_id"] = np.arange(len(frame)) // 24  # one request per user and day
    last = frame["date"] == frame["date"].max()
    params = HeavyRankerParams(hidden=(32,), tower=8, max_epochs=10, patience=3, num_threads=1, id_min_count=3,
                               dropout=0.0, learning_rate=3e-3, batch_size=128)
    assert not params.sequence_attention
    table = heavy_ablation(frame[~last], frame[last], params, NAMES, groups={"sequence_attention": SEQUENCE_ID_FEATURES},
                           noise_seeds=1, log=lambda line: None).set_index("variant")
    assert table.index.tolist() == ["all", "+sequence_attention"]
    assert table.loc["+sequence_attention", "removed"] == 0
    # the interests only the sequence reveals: attention wins inside requests
    print(f"click request GAUC without attention {table.loc['all', 'click_request_gauc']:.3f}, "
          f"with {table.loc['+sequence_attention', 'click_request_gauc']:.3f}")
    assert table.loc["all", "click_request_gauc"] < 0.55
    assert table.loc["+sequence_attention", "click_request_gauc"] > 0.65
