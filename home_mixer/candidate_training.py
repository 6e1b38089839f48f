"""Training rows for the light ranker from the mixer's own candidate sets (whole-space training).

The light ranker decides which candidates the heavy ranker ever sees, over the whole candidate set
(about 1,000 posts per request). Trained on logged impressions it only learns P(engage | shown) among
what the old policy chose to show, so it ranks the rest of the candidate set badly: on KuaiRand its
top 200 held fewer of the posts users went on to engage with than a plain popularity list. This
module builds the training rows where the light ranker works: the served candidate generation as of
a cutoff, each candidate labelled by whether the user engaged with it in the following days. It is
the entire-space idea of ESMM (Ma et al., SIGIR 2018: train over every candidate, not only the
exposed ones) applied to the pre-ranking stage, as pre-rankers trained on the whole candidate space
do (e.g. Zhang et al. 2023, "Rethinking the Role of Pre-ranking in Large-scale E-Commerce
Searching System").

Point in time: the cutoff is the first impression of the ``horizon_days`` dates before the evaluated
(validation) days; the as-of store (index, co-engagement, action sequences, Feast features) holds
only what happened before it, exactly as ``home_mixer.whole_funnel`` builds it for evaluation, and
the labels are the engagements of those ``horizon_days`` dates (all before the evaluated days).
The features of each row are the ones the served pipeline hydrated for that candidate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from core.state import StateDir

TRAINING_DB = 10  # the as-of store of the training cutoff (the whole funnel's is 9)
CANDIDATE_TRAINING_TABLE = "candidate_training_set"  # <state>/tables/<name>.parquet: the last rows built


@dataclass(frozen=True)
class CandidateTrainingSet:
    """Rows of :func:`candidate_training_set`.

    Attributes:
        frame: one row per sampled candidate: ``user_id``, ``post_id`` (int64), ``source`` (str),
            the feature columns of ``core.schema.ALL_FEATURES`` (float64, NaN where missing), labels
            ``engaged`` / ``click`` / ``long_view`` (int8) and ``weight`` (float64: the inverse of
            the row's sampling rate, so weighted sums estimate the full candidate set).
        as_of: the cutoff (UTC).
        label_days: the dates whose engagements are the labels (yyyymmdd).
        users: requests run.
        candidates: candidates generated over all requests (before sampling).
        positives_in_set: share of the users' engaged posts that were in their candidate set.
        seconds: wall time per step.
    """

    frame: pd.DataFrame
    as_of: pd.Timestamp
    label_days: list[int]
    users: int
    candidates: int
    positives_in_set: float
    seconds: dict

    def run_context(self) -> dict:
        """The MLflow run params that say where the rows came from."""
        return {"cutoff": self.as_of.isoformat(), "label_days": ",".join(map(str, self.label_days)),
                "candidate_requests": self.users, "candidates_generated": self.candidates,
                "positives_in_candidate_set": round(self.positives_in_set, 4)}


def training_cutoff(impressions: pd.DataFrame, valid_days: int, horizon_days: int) -> tuple[list[int], pd.Timestamp]:
    """The label dates (the ``horizon_days`` dates before the last ``valid_days``) and the cutoff
    (the first impression of those dates): ``models.split.held_out_days``.

    Raises:
        ValueError: the log has too few dates to leave any before the label dates.
    """
    from models.split import held_out_days

    return held_out_days(impressions, horizon_days, skip_last=valid_days)


def as_of_two_tower(state: StateDir, as_of: pd.Timestamp, log: Callable[[str], None] | None = print):
    """The learned retrieval serving would have had at ``as_of``: when a two-tower model is
    registered with the champion alias (so the mixer serves the embedding source), the same model
    trained again on the events before ``as_of`` only (``models.train.train_two_tower``, an MLflow
    run but no registered version), as an in-memory handle; None
    when no two-tower champion exists (the mixer serves without learned retrieval).

    The registered champion has seen the days after ``as_of``: serving it at an earlier cutoff
    would leak the labels into the candidate sets. The champion's tower settings and index kind are
    reused; the index's build parameters are the defaults.
    """
    from core.schema import TWO_TOWER_NAME
    from models.registry import RankerNotFoundError, TwoTowerHandle, load_two_tower
    from models.train import servable_posts, train_two_tower
    from models.two_tower import ITEM_COLUMNS

    try:
        champion = load_two_tower(state.mlflow_tracking_uri)
    except RankerNotFoundError:
        return None
    res = train_two_tower(state, as_of=as_of, params=champion.model.params, register=False,
                          index_kind=champion.index.kind, log=log or (lambda line: None))
    posts = pd.read_parquet(state.table("posts"))
    ids, vectors = res.model.item_embeddings(servable_posts(posts, as_of)[list(ITEM_COLUMNS)])
    return TwoTowerHandle(TWO_TOWER_NAME, "", f"as-of-{as_of:%Y%m%dT%H%M}", res.run_id, res.model, res.index,
                          ids, vectors)


def candidate_training_set(state: StateDir, *, valid_days: int = 2, horizon_days: int = 2,
                           n_users: int | None = 4000, negatives_per_user: int = 200, seed: int = 0,
                           redis_url: str | None = None, feast_connection: str | None = None, spark=None,
                           prepare: bool = True, rankers=None, retrieval="as_of",
                           log: Callable[[str], None] | None = print) -> CandidateTrainingSet:
    """Run the served candidate generation as of the training cutoff and label its candidates.

    Users: those with an ``engaged`` positive on the label dates (a seeded sample of ``n_users``),
    plus a quarter as many active users without one (their requests teach what a user who engages
    with nothing new is shown). Every positive candidate is kept, and
    ``negatives_per_user`` of the others drawn uniformly (weight = the inverse sampling rate).

    Args:
        state: state folder with canonical and feature tables, the Feast registry and champions.
        valid_days: the evaluated dates at the log's end, never touched here.
        horizon_days: label dates before them; the cutoff is their first impression.
        redis_url / feast_connection: the as-of store's database (default db ``TRAINING_DB`` of
            the state's Redis); flushed first when ``prepare``.
        spark: a Spark session for the co-engagement job (default: a local one).
        prepare: build the as-of store (False: it is already there).
        rankers: (light, heavy) handles for the pipeline (only its feature hydration runs); default
            the champions.
        retrieval: the embedding source's two-tower handle; ``"as_of"`` (default): the champion's
            model trained again before the cutoff (:func:`as_of_two_tower`), None: no learned retrieval.
        log: progress lines (None: quiet).

    The rows are also written to the state's table ``CANDIDATE_TRAINING_TABLE``.

    Raises:
        ValueError: too few dates, no positives on the label dates, or the database is a serving store.
        RuntimeError: no Redis given and the state's Redis is not running.
    """
    from tqdm import tqdm

    from core.schema import ALL_FEATURES
    from home_mixer.whole_funnel import (
        as_of_generation, as_of_redis, check_trained_before, positives_by_user, prepare_as_of_store,
    )

    say = log or (lambda line: None)
    if redis_url is None:
        redis_url, default_connection = as_of_redis(state, TRAINING_DB)
        feast_connection = feast_connection or default_connection
    imp = pd.read_parquet(state.table("impressions"))
    label_days, as_of = training_cutoff(imp, valid_days, horizon_days)
    positives = positives_by_user(imp, label_days)
    rng = np.random.default_rng(seed)
    engaged = sorted(positives["engaged"])
    if not engaged:
        raise ValueError(f"no user has an engaged positive on {label_days}: nothing to learn from")
    if n_users is not None and len(engaged) > n_users:
        engaged = sorted(int(u) for u in rng.choice(engaged, size=n_users, replace=False))
    active = sorted(set(int(u) for u in imp.loc[imp["date"].isin(label_days), "user_id"]) - set(positives["engaged"]))
    quiet = sorted(int(u) for u in rng.choice(active, size=min(len(active), len(engaged) // 4), replace=False)) \
        if active else []
    users = sorted(engaged + quiet)
    seconds: dict[str, float] = {}
    if prepare:
        seconds |= prepare_as_of_store(state, redis_url, feast_connection, as_of, spark, say)

    if isinstance(retrieval, str) and retrieval == "as_of":
        retrieval = as_of_two_tower(state, as_of, log)
    else:  # a given model must not have seen the label days either
        check_trained_before(retrieval, state.mlflow_tracking_uri, as_of)
    feature_cols = list(ALL_FEATURES)
    parts: list[pd.DataFrame] = []
    generated = 0
    found: list[float] = []
    t0 = time.perf_counter()
    with as_of_generation(redis_url, state.mlflow_tracking_uri, as_of, rankers=rankers,
                          retrieval=retrieval) as generation:
        for uid in tqdm(users, desc="candidate sets", unit="user", disable=log is None, mininterval=5):
            result = generation.run(uid)
            cands = result.ranked or []
            if not cands:
                continue
            generated += len(cands)
            post_ids = np.fromiter((c.post_id for c in cands), dtype=np.int64, count=len(cands))
            labels = {kind: np.isin(post_ids, list(positives[kind].get(uid, ()))).astype(np.int8)
                      for kind in ("engaged", "click", "long_view")}
            pos = labels["engaged"] > 0
            if uid in positives["engaged"]:
                found.append(pos.sum() / len(positives["engaged"][uid]))
            neg = np.flatnonzero(~pos)
            take = neg if len(neg) <= negatives_per_user else rng.choice(neg, size=negatives_per_user, replace=False)
            rows = np.sort(np.concatenate([np.flatnonzero(pos), take]))
            weight = np.where(pos[rows], 1.0, len(neg) / max(len(take), 1))
            feats = result.features[feature_cols].iloc[rows].reset_index(drop=True).astype("float64")
            part = pd.DataFrame({"user_id": np.int64(uid), "post_id": post_ids[rows],
                                 "source": [cands[i].source for i in rows]})
            part = pd.concat([part, feats], axis=1)
            for kind, y in labels.items():
                part[kind] = y[rows]
            part["weight"] = weight
            parts.append(part)
    seconds["requests"] = time.perf_counter() - t0
    if not parts:
        raise ValueError(f"no request as of {as_of.isoformat()} produced candidates; is the as-of store built?")
    frame = pd.concat(parts, ignore_index=True)
    # kept for inspection: the rows the light ranker learned from
    state.tables.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(state.table(CANDIDATE_TRAINING_TABLE), index=False)
    say(f"candidate training set as of {as_of.isoformat()}: {len(users):,} requests, {generated:,} candidates, "
        f"{len(frame):,} rows kept ({int(frame['engaged'].sum()):,} engaged positives; "
        f"{np.mean(found) if found else 0:.1%} of the users' engaged posts were in their candidate set)")
    return CandidateTrainingSet(frame=frame, as_of=as_of, label_days=label_days, users=len(users),
                                candidates=generated, positives_in_set=float(np.mean(found)) if found else 0.0,
                                seconds=seconds)


__all__ = ["CANDIDATE_TRAINING_TABLE", "CandidateTrainingSet", "TRAINING_DB", "as_of_two_tower", "candidate_training_set", "training_cutoff"]
