"""Feast definitions of home-mixer: entities, the four feature views and their Spark sources.

Everything is generated from ``core.schema`` so the views, the Spark jobs and the mixer name
the same features. ``feast apply`` discovers the module-level objects below; code that needs the
same views over other tables (evaluation on another log) calls ``build_definitions(tables_dir)``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, ValueType
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
from feast.types import Float64, Int64

from core.schema import FEATURE_VIEWS, FeatureViewSpec
from core.state import StateDir

_DTYPES = {"int64": Int64, "float64": Float64}

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64,
              description="A viewer of the home timeline (KuaiRand user_id).")
post = Entity(name="post", join_keys=["post_id"], value_type=ValueType.INT64,
              description="A post that can be ranked (KuaiRand video_id).")
author = Entity(name="author", join_keys=["author_id"], value_type=ValueType.INT64,
                description="The author of a post; with user it keys the social (user x author) view.")

tag = Entity(name="tag", join_keys=["tag_id"], value_type=ValueType.INT64,
             description="A post category (KuaiRand tag id; a post's primary tag); with user it keys the user x tag view.")

_ENTITY_BY_KEY = {"user_id": user, "post_id": post, "author_id": author, "tag_id": tag}


def _view(spec: FeatureViewSpec, tables_dir: Path) -> FeatureView:
    source = SparkSource(
        name=f"{spec.table}_source",
        path=str(tables_dir / f"{spec.table}.parquet"),
        file_format="parquet",
        timestamp_field="event_timestamp",
    )
    return FeatureView(
        name=spec.name,
        entities=[_ENTITY_BY_KEY[k] for k in spec.join_keys],
        ttl=timedelta(days=spec.ttl_days),
        schema=[Field(name=n, dtype=_DTYPES[t]) for n, t in spec.features.items()],
        source=source,
        online=True,
        tags={"owner": "home-mixer", "group": spec.name.split("_")[0]},
    )


def build_definitions(tables_dir: Path) -> list:
    """Entities and feature views over the parquet tables in ``tables_dir``.

    Returns: ``[user, post, author, tag, *feature_views]`` in ``core.schema.FEATURE_VIEWS`` order.
    """
    return [user, post, author, tag, *(_view(spec, tables_dir) for spec in FEATURE_VIEWS)]


_TABLES = StateDir.from_env().tables
(user_features, content_features, social_features, temporal_features, user_longterm_features,
 user_tag_features) = (_view(spec, _TABLES) for spec in FEATURE_VIEWS)
