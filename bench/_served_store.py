"""What the self-contained benches serve from: the real log's canonical tables, tiny real rankers
registered in a state's MLflow, and Feast features of chosen users (``bench/cluster.py``,
``bench/shadow.py``)."""

from __future__ import annotations

from pathlib import Path

AS_OF = "2022-05-04T16:00:00Z"  # the demo clock: the end of the log


def canonical_tables(data_dir: Path):
    """The canonical tables of the real log (``pipelines.canonical``), in memory."""
    from pipelines import canonical
    from pipelines.candidate_index import CanonicalTables
    from pipelines.raw import load_raw

    raw = load_raw(data_dir)
    log, _ = canonical.deduplicate_log(raw.log)
    impressions, _ = canonical.impressions_table(log, raw.videos)
    return CanonicalTables(impressions=impressions, posts=canonical.posts_table(raw.videos),
                           social_edges=canonical.social_edges_table(impressions))


def train_rankers(data_dir: Path, state):
    """Tiny real rankers (the integration tests' settings) on a tenth of the users, registered in
    ``state``'s MLflow; returns the dev frame (features of every row)."""
    from models.heavy_ranker import HeavyRankerParams
    from models.light_ranker import LightRankerParams
    from models.split import split_by_days
    from models.train import train_heavy, train_light
    from tests.dev_frame import build_dev_frame  # the log's features in pandas: minutes, not a Spark run

    frame = build_dev_frame(data_dir)
    train_df, valid_df = split_by_days(frame[frame.user_id % 10 == 0], 2)
    train_light(train_df, valid_df, state, params=LightRankerParams(num_boost_round=20, early_stopping_rounds=5))
    train_heavy(train_df, valid_df, state, params=HeavyRankerParams(hidden=(32,), tower=8, max_epochs=2, patience=1))
    return frame


def write_features(frame, users: list[int], state, address: str) -> None:
    """The newest row per entity of every view (posts: all; users and pairs: ``users``) through Feast."""
    from core.schema import FEATURE_VIEWS
    from feature_repo import store as fs

    store = fs.open_store(state, address)
    fs.apply(store, state.tables)
    scoped = frame[frame.user_id.isin(users)]
    for spec in FEATURE_VIEWS:
        source = frame if spec.join_keys == ("post_id",) else scoped
        cols = [*spec.join_keys, "event_timestamp", *spec.features]
        rows = source[cols].sort_values("event_timestamp", kind="stable").groupby(list(spec.join_keys)).tail(1)
        ints = [f for f, t in spec.features.items() if t == "int64"]
        rows = rows.dropna(subset=ints).astype({f: "int64" for f in ints})  # Feast Int64 holds no NaN
        store.write_to_online_store(spec.name, rows)


def add_store_arguments(ap, requests: int) -> None:
    """The arguments every self-contained mixer bench takes: ``--data``, ``--requests``,
    ``--warmup``, ``--users``."""
    from core.state import DEFAULT_DATA_DIR

    ap.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="KuaiRand-Pure folder")
    ap.add_argument("--requests", type=int, default=requests, help="timed requests per mixer")
    ap.add_argument("--warmup", type=int, default=20, help="untimed requests per mixer first")
    ap.add_argument("--users", type=int, default=300, help="users with online features (the most active)")
