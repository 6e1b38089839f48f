"""``feature_repo.online_writer``'s encoders against the protobuf classes Feast writes with, and
its latest-row selection against pandas (tests/integration/test_feast_store.py compares a whole
materialisation with ``feast materialize`` byte for byte)."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from feast.protos.feast.types.Value_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp

from core.schema import FeatureViewSpec
from feature_repo.online_writer import encode_timestamps, encode_values, latest_rows


def test_doubles_and_int64s_encode_as_feast_values():
    rng = np.random.default_rng(0)
    doubles = [0.0, -0.0, 1.5, -3.25e-300, float("inf"), float("-inf"), *rng.normal(size=200).tolist(), None]
    want = [Value(double_val=v).SerializeToString() if v is not None else b"" for v in doubles]
    assert encode_values(pa.array(doubles, pa.float64()), "float64") == want
    assert encode_values(pa.array([float("nan")]), "float64") == [b""]  # NaN is a null, as Feast writes it
    ints = [0, 1, -1, 127, 128, 2**31, -(2**63), 2**63 - 1, *rng.integers(-10**12, 10**12, 200).tolist(), None]
    want = [Value(int64_val=v).SerializeToString() if v is not None else b"" for v in ints]
    assert encode_values(pa.array(ints, pa.int64()), "int64") == want
    with pytest.raises(ValueError, match="unsupported feature dtype"):
        encode_values(pa.array([1]), "string")


def test_timestamps_encode_as_protobuf_timestamps():
    times = [datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(2022, 5, 8, 15, 4, 5, 123456, tzinfo=timezone.utc),
             datetime(2022, 5, 8, 15, 4, 5, tzinfo=timezone.utc), datetime(1970, 1, 1, 0, 0, 0, 7, tzinfo=timezone.utc)]
    want = []
    for t in times:
        ts = Timestamp()
        ts.FromDatetime(t)
        want.append(ts.SerializeToString())
    assert encode_timestamps(pa.array(times, pa.timestamp("us", tz="UTC"))) == want


def test_latest_rows_take_the_newest_row_per_entity_inside_the_window(tmp_path):
    spec = FeatureViewSpec("v", ("user_id", "author_id"), "v", {"a": "float64", "b": "int64"}, 7)
    rng = np.random.default_rng(1)
    n = 2_000
    frame = pd.DataFrame({"user_id": rng.integers(0, 30, n), "author_id": rng.integers(0, 5, n),
                          "event_timestamp": pd.Timestamp("2022-01-01", tz="UTC")
                          + pd.to_timedelta(rng.permutation(n), unit="min"),
                          "a": rng.normal(size=n), "b": rng.integers(0, 9, n)})
    frame.to_parquet(tmp_path / "v.parquet")
    start, end = pd.Timestamp("2022-01-01 03:00", tz="UTC"), pd.Timestamp("2022-01-01 20:00", tz="UTC")
    got = latest_rows(tmp_path / "v.parquet", spec, start, end).to_pandas()
    inside = frame[(frame.event_timestamp >= start) & (frame.event_timestamp <= end)]
    want = inside.sort_values("event_timestamp").groupby(["user_id", "author_id"]).tail(1)
    key = ["user_id", "author_id"]
    assert len(got) == len(want)
    pd.testing.assert_frame_equal(got.sort_values(key).reset_index(drop=True)[list(frame.columns)],
                                  want.sort_values(key).reset_index(drop=True), check_dtype=False)
    with pytest.raises(KeyError, match="lacks columns"):
        latest_rows(tmp_path / "v.parquet", FeatureViewSpec("v", ("user_id",), "v", {"zz": "int64"}, 7), start, end)
    with pytest.raises(FileNotFoundError, match="build the features first"):
        latest_rows(tmp_path / "nope.parquet", spec, start, end)
