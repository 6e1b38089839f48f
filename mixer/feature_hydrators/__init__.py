"""Feature hydrators: online features of (user, post, user x author, temporal) for each candidate.

Both return a float64 DataFrame aligned with the candidates whose columns are
``core.schema.ALL_FEATURES`` (NaN where the online store has no value):
- ``FeastLayoutFeatureHydrator`` reads Feast's Redis layout directly (its HMGETs in one Lua call; keys
  from ``core.online_layout.FeastRedisLayout``);
- ``FeastSdkFeatureHydrator`` calls ``FeatureStore.get_online_features`` (reference / comparison).
"""

from mixer.feature_hydrators.feast_layout import FeastLayoutFeatureHydrator, decode_values
from mixer.feature_hydrators.feast_sdk import FeastSdkFeatureHydrator

__all__ = ["FeastLayoutFeatureHydrator", "FeastSdkFeatureHydrator", "decode_values"]
