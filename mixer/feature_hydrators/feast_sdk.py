"""Online features through the Feast SDK (``FeatureStore.get_online_features``).

The reference implementation the direct layout reader is checked against, and the comparison
point of ``bench/hydration.py``; selectable with ``feast.hydrator: feast_sdk`` in the config.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.schema import FEATURE_VIEWS
from mixer.candidate import Candidate, Query
from mixer.components import FeatureHydrator
from mixer.feature_hydrators.frame import empty_feature_frame, finish_feature_frame


class FeastSdkFeatureHydrator(FeatureHydrator):
    """Calls ``store.get_online_features`` with one entity row per candidate (``user_id``,
    ``post_id``, ``author_id``, ``tag_id``: the join keys of every view of ``FEATURE_VIEWS``) for
    every feature of the views. Like ``FeastLayoutFeatureHydrator``, a candidate whose pair key is
    negative (``tag_id`` -1: post without tags) gets NaN for the (user, that key) views.

    Args:
        store: a ``feast.FeatureStore`` (``feature_repo.store.open_store``) whose registry
            holds the applied views.
    """

    name = "feast_sdk"
    stage = "feature_hydration"

    def __init__(self, store):
        self.store = store
        self.refs = [f"{v.name}:{f}" for v in FEATURE_VIEWS for f in v.features]
        self.stored = [f for v in FEATURE_VIEWS for f in v.features]
        # (features, the view's join keys other than user_id/post_id) of the views keyed by a pair
        self._pair_features = [(list(v.features), [k for k in v.join_keys if k not in ("user_id", "post_id")])
                               for v in FEATURE_VIEWS if len(v.join_keys) > 1]

    def hydrate(self, query: Query, candidates: list[Candidate],
                features: pd.DataFrame | None = None) -> pd.DataFrame:
        """Float64 DataFrame aligned with ``candidates`` (row i = candidate i, index 0..N-1), columns
        ALL_FEATURES (NaN where missing). ``features`` (a frame hydrated before) is ignored: this
        hydrator builds every column.

        Raises:
            Exception: whatever ``get_online_features`` raises (Redis or registry unreachable).
        """
        if not candidates:
            return empty_feature_frame()
        rows = [{"user_id": query.user_id, "post_id": c.post_id, "author_id": c.author_id, "tag_id": c.tag_id}
                for c in candidates]
        values = self.store.get_online_features(features=self.refs, entity_rows=rows).to_dict()
        stored = pd.DataFrame({f: pd.to_numeric(pd.Series(values[f], dtype="object"), errors="coerce")
                               for f in self.stored}).astype("float64")
        for feats, keys in self._pair_features:  # no row for a negative key (no tag / unknown author)
            unknown = np.array([any(r[k] < 0 for k in keys) for r in rows], dtype=bool)
            if unknown.any():
                stored.loc[unknown, feats] = np.nan
        return finish_feature_frame(stored, query.now_s, query.surface, user_id=query.user_id,
                                    post_ids=[c.post_id for c in candidates],
                                    author_ids=[c.author_id for c in candidates])
