"""The main jobs of home-mixer, each a function the CLI and the demo call in order.

raw logs -> validated canonical tables -> Spark offline features -> Feast apply -> point-in-time
training set -> light + heavy rankers in MLflow -> materialise to Redis -> candidate index -> mixer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from feature_repo import store as fs
from core.services import ServiceError, feast_connection_string, online_store_address
from core.state import StateDir
from pipelines.training_set import TRAINING_SET_TABLE, log_span, load_training_set, log_end, training_set  # noqa: F401



def redis_url_for(state: StateDir) -> str:
    """The online store to use: ``HOME_MIXER_REDIS_URL``, else the one ``home-mixer services start``
    left (the HA set's ``redis+sentinel://`` address, else the single Redis's ``redis://`` URL).
    Open it with ``core.online_store.connect``.

    Raises:
        ServiceError: neither exists.
        core.online_store.OnlineStoreAddressError: ``HOME_MIXER_REDIS_URL`` is malformed (the
            message says what to write).
    """
    from core.online_store import parse_address

    url = os.environ.get("HOME_MIXER_REDIS_URL")
    if url:
        parse_address(url)
        return url
    address = online_store_address(state)
    if address is None:
        raise ServiceError("no Redis is running for this state folder: run `home-mixer services start [--ha]` "
                           "(or set HOME_MIXER_REDIS_URL=redis://host:port/0 or "
                           "redis+sentinel://host:port,host:port/service_name/0).")
    return address


feast_connection = feast_connection_string


@dataclass
class DataReport:
    """What the data stage did: rows read, duplicates dropped, tables written."""

    stats: object
    validation: object


def prepare_data(state: StateDir, data_dir: Path, log_paths: list[Path] | None = None) -> DataReport:
    """Load raw files, validate them (great-expectations), write the canonical tables.

    Args:
        data_dir: folder with the KuaiRand-Pure files (users, videos and, by default, the log).
        log_paths: impression logs to use instead of the shared one (concatenated, de-duplicated).

    Raises:
        monitoring.validation.DataValidationError: a file failed its suite (names file, column,
            expectation); nothing is written.
    """
    from pipelines.canonical import build_canonical
    from pipelines.raw import load_raw
    from monitoring.validation import validate_raw

    raw = load_raw(data_dir, log_paths=log_paths)
    report = validate_raw(raw, report_dir=state.reports, docs_root=state.reports)
    stats = build_canonical(raw, state)
    return DataReport(stats=stats, validation=report)


def build_features(spark, state: StateDir, priors=None) -> dict[str, int]:
    """Run the Spark feature jobs; returns row counts per feature table.

    Args:
        priors: ``pipelines.features.common.RatePriors`` to smooth with (default: computed from
            this state's impressions, validation days held out). Evaluation passes the training
            state's priors so features mean the same as in training.
    """
    from pipelines.features import build_offline_features

    return build_offline_features(spark, state, priors=priors)


def validate_features(state: StateDir, gate_config=None):
    """The feature-table gate of ``materialize`` on the state's tables, up to ``log_end`` (the
    baseline is not moved: ``materialize`` records it after a successful load).

    Returns:
        ``monitoring.feature_validation.GateResult``.

    Raises:
        monitoring.feature_validation.FeatureValidationError: a table failed the gate.
    """
    import pandas as pd

    from monitoring.feature_validation import validate_feature_tables

    return validate_feature_tables(state.tables, state.reports, config=gate_config, record=False,
                                   until=pd.Timestamp(log_end(state)))


def materialize_window(state: StateDir) -> tuple[datetime, datetime]:
    """``materialize``'s window: from the features' base rows (``pipelines.features.common.BASE_ROW_TS``
    or the first impression if earlier) to ``log_end``."""
    from pipelines.features.common import BASE_ROW_TS

    return min(BASE_ROW_TS.to_pydatetime(), log_span(state)[0]), log_end(state)


def materialize(store, state: StateDir, *, validate: bool = True, gate_config=None,
                engine: str = "redis", progress=None) -> tuple[datetime, datetime]:
    """Fill the Redis online store with the latest feature values, from the features' base rows
    (``pipelines.features.common.BASE_ROW_TS`` or the first impression if earlier) to ``log_end``.

    Every feature table first passes the validation gate (``monitoring.feature_validation``): a
    failing table stops here, before Redis is touched, so the online store keeps the last good
    values. After a successful load the tables' profiles become the gate's next baseline.

    Args:
        validate: run the gate (``False`` only to force a load the gate would stop).
        gate_config: ``monitoring.feature_validation.FeatureGateConfig`` (default tolerances).
        engine: ``"redis"`` (the project's writer of Feast's layout, default) or ``"feast"``
            (``feature_repo.store.materialize``).
        progress: called with the entities of each written batch (``"redis"`` only).

    Raises:
        monitoring.feature_validation.FeatureValidationError: a table failed the gate (the message
            names table, column and expectation; report and Data Docs under ``state.reports``).
    """
    from monitoring.feature_validation import save_profiles

    start, end = materialize_window(state)
    gate = validate_features(state, gate_config) if validate else None
    fs.materialize(store, start, end, engine=engine, progress=progress)
    state.record_materialization(end)
    if gate is not None:
        save_profiles(state.reports, gate.profiles)
    return start, end

