"""Export a registered ranker to ONNX, checked against the native model on real rows.

The ONNX contract every served ranker follows (Triton configs in ``serving/triton`` rely on it):

- one input ``features``: ``float32 [batch, F]``, columns in the order of the registered model's
  ``feature_names`` (MLflow model metadata), NaN for a missing value;
- one output ``probabilities``: ``float32 [batch, H]``, columns in the order of its ``heads``
  (light ranker: ``H = 1``, P(engaged); heavy ranker: ``schema.HEADS``);
- ``±inf`` inputs are mapped to NaN inside the graph (a prefix ``IsInf -> Where``), as
  ``models.features.feature_matrix`` does before the native model, so a client that skips it
  still gets the native answer;
- ``metadata_props`` hold ``registered_model``, ``version``, ``alias``, ``run_id``, ``ranker``,
  ``feature_names`` and ``heads`` (JSON lists), ``source`` (the ``models:/`` URI) and
  ``check_max_abs_diff``.

Conversion:
- light ranker (LightGBM): ``onnxmltools.convert_lightgbm`` (``zipmap=False``) gives ``label``
  and ``probabilities [batch, 2]``; the graph is post-processed here: ``label`` is dropped and a
  ``Slice`` keeps column 1 (the positive class) as ``probabilities [batch, 1]``. Missing values
  follow LightGBM's learnt default directions (``nodes_missing_value_tracks_true`` of ONNX's
  TreeEnsemble), which the check below verifies on rows with NaN.
- heavy ranker (torch): the registered ``pt2`` archive is a ``torch.export.ExportedProgram`` with a
  dynamic batch dimension; ``torch.onnx.export(program, dynamo=True)`` converts it as is (NaN
  imputation, log1p, standardisation and Platt scaling are inside the graph).

Opsets are pinned (:data:`LIGHT_ONNX_OPSET`, :data:`HEAVY_ONNX_OPSET`; ``ai.onnx.ml`` 1 for the
trees) so the same files also load in the onnxruntime backend of a full Triton server: any
onnxruntime >= 1.14 runs both.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.schema import CHAMPION_ALIAS, VALIDATION_DAYS
from core.state import StateDir
from models.features import feature_matrix
from models.registry import RankerHandle, alias_version, load_ranker_version

INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "batch"
HEAVY_ONNX_OPSET = 18  # torch 2.13 defaults to 20 (onnxruntime >= 1.17); 18 runs on onnxruntime >= 1.14
LIGHT_ONNX_OPSET = 15  # the highest onnxmltools 1.16 converts LightGBM to; onnxruntime >= 1.10
MODEL_FILE = "model.onnx"
DEFAULT_TOLERANCE = 1e-5


class ExportError(RuntimeError):
    """The registered model could not be converted to ONNX; the message says why and what to do."""


class ExportMismatchError(ExportError):
    """The ONNX model disagrees with the native model on the check rows.

    Attributes:
        max_abs_diff: largest ``|onnx - native|`` over all rows and heads.
        row / head: where it occurred (row index into the check matrix, head name).
        tolerance: the limit that was exceeded.
    """

    def __init__(self, message: str, max_abs_diff: float, row: int, head: str, tolerance: float):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.row = row
        self.head = head
        self.tolerance = tolerance


@dataclass(frozen=True)
class ExportResult:
    """One checked ONNX export.

    Attributes:
        name / version / alias / run_id: the registered model version exported (``alias`` is None
            when exported by version).
        kind: ``"light"`` or ``"heavy"``.
        feature_names / heads: input columns and output columns, in order.
        path: the written ``model.onnx``.
        max_abs_diff: largest ``|onnx - native|`` on the check rows (probabilities, unitless).
        rows_checked: real rows compared (plus the synthetic NaN/inf rows, see :func:`verify_onnx`).
        seconds: wall-clock time of load + convert + check + write.
    """

    name: str
    version: int
    alias: str | None
    run_id: str
    kind: str
    feature_names: tuple[str, ...]
    heads: tuple[str, ...]
    path: Path
    max_abs_diff: float
    rows_checked: int
    seconds: float


# ---------------------------------------------------------------- conversion


def _light_to_onnx(handle: RankerHandle):
    """LightGBM booster -> ONNX with ``probabilities [batch, 1]`` = P(positive class)."""
    import onnx
    from onnx import helper
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    n_features = len(handle.feature_names)
    if handle.model.num_feature() != n_features:
        raise ExportError(f"{handle.name} v{handle.version}: booster has {handle.model.num_feature()} features, "
                          f"metadata lists {n_features}")
    model = convert_lightgbm(
        handle.model, name=handle.name, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        zipmap=False, target_opset=LIGHT_ONNX_OPSET,
    )
    # onnxmltools declares the lowest default-domain opset its nodes need (Identity, Cast, Mul: the
    # same in every opset); the Slice/IsInf/Where added here need the pinned one
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, LIGHT_ONNX_OPSET)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    if outputs != {"label", OUTPUT_NAME}:
        raise ExportError(f"onnxmltools produced outputs {sorted(outputs)}, expected ['label', {OUTPUT_NAME!r}]")
    both = "class_probabilities"
    for node in graph.node:
        node.output[:] = [both if o == OUTPUT_NAME else o for o in node.output]
        node.input[:] = [both if i == OUTPUT_NAME else i for i in node.input]
    graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "positive_start"),
        onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), "positive_end"),
        onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "class_axis"),
    ])
    graph.node.append(helper.make_node("Slice", [both, "positive_start", "positive_end", "class_axis"],
                                       [OUTPUT_NAME], name="positive_class"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, [None, 1]))
    # the classifier's `label` output is no longer a graph output; drop the ops only it needed
    return _prune_unused(model)


def _heavy_to_onnx(h: RankerHandle):
    """``torch.export`` program (``h.program``) -> ONNX via the dynamo exporter (batch dimension
    stays dynamic)."""
    import logging

    import torch

    if h.program is None:
        raise ExportError(
            f"{h.name} v{h.version} has no torch.export program: load it with "
            "models.registry.load_ranker_version(..., with_program=True); a version logged without a .pt2 "
            "archive must be re-trained with `home-mixer train --model heavy` (models.registry logs pt2)"
        )
    example = torch.zeros((2, len(h.feature_names)), dtype=torch.float32)
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed" notices are noise here
    try:
        program = torch.onnx.export(
            h.program, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=HEAVY_ONNX_OPSET, dynamo=True, external_data=False, verbose=False,
        )
    except Exception as e:  # the exporter raises many kinds; say what was being exported
        raise ExportError(
            f"torch.onnx.export failed on {h.name} v{h.version} (pt2 program): {type(e).__name__}: {e}. "
            "The program's state (weights and buffers) is intact: HeavyRankerNet can be rebuilt from "
            "program.state_dict if the exporter cannot handle this graph"
        ) from e
    finally:
        onnx_logger.setLevel(level)
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for {h.name} v{h.version}")
    return program.model_proto


def _prune_unused(model):
    """Remove nodes whose outputs reach no graph output (iterated to a fixed point)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = needed
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return model


def _sanitise_input(model):
    """Prefix the graph with ``features := Where(IsInf(features), NaN, features)``.

    ``feature_matrix`` turns ``±inf`` into NaN before the native model; doing it inside the graph
    keeps the served model equal to the native one for any float32 input.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    clean = f"{INPUT_NAME}_finite"
    for node in graph.node:
        node.input[:] = [clean if i == INPUT_NAME else i for i in node.input]
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "nan_value"))
    prefix = [
        helper.make_node("IsInf", [INPUT_NAME], [f"{INPUT_NAME}_is_inf"], name="input_is_inf"),
        helper.make_node("Where", [f"{INPUT_NAME}_is_inf", "nan_value", INPUT_NAME], [clean], name="input_inf_to_nan"),
    ]
    nodes = prefix + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _name_batch_dim(model) -> None:
    for value in (*model.graph.input, *model.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = BATCH_DIM


def _set_metadata(model, handle: RankerHandle, alias: str | None, max_abs_diff: float | None) -> None:
    from onnx import helper

    props = {
        "registered_model": handle.name,
        "version": str(handle.version),
        "alias": alias or "",
        "run_id": handle.run_id,
        "ranker": handle.kind,
        "feature_names": json.dumps(list(handle.feature_names)),
        "heads": json.dumps(list(handle.heads)),
        "source": f"models:/{handle.name}/{handle.version}",
    }
    if max_abs_diff is not None:
        props["check_max_abs_diff"] = f"{max_abs_diff:.3e}"
    del model.metadata_props[:]
    helper.set_model_props(model, props)


def to_onnx(h: RankerHandle, alias: str | None = None):
    """Convert a loaded registered version to an ``onnx.ModelProto`` following the module contract.

    Args:
        h: the version loaded by ``models.registry.load_ranker_version(..., with_program=True)``
            (the heavy ranker converts from ``h.program``, the light one from ``h.model``).
        alias: recorded in the ONNX metadata ("" when None).

    Not yet checked against the native model: see :func:`verify_onnx`.

    Raises:
        ExportError: the converter failed, produced an unexpected graph, or a heavy handle has no program.
    """
    import onnx

    model = _light_to_onnx(h) if h.kind == "light" else _heavy_to_onnx(h)
    if [i.name for i in model.graph.input] != [INPUT_NAME] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise ExportError(f"{h.name} v{h.version}: ONNX graph has inputs {[i.name for i in model.graph.input]} "
                          f"and outputs {[o.name for o in model.graph.output]}, expected [{INPUT_NAME!r}] "
                          f"and [{OUTPUT_NAME!r}]")
    model = _sanitise_input(model)
    _name_batch_dim(model)
    _set_metadata(model, h, alias, None)
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------- check


def check_matrix(check_rows: pd.DataFrame, feature_names: tuple[str, ...]) -> np.ndarray:
    """The matrix the check runs on: the real rows plus synthetic rows that exercise missing values.

    Returns ``float32 [N + F + 2, F]``: the ``N`` real rows (``feature_matrix``), then for each
    feature ``j`` the first real row with feature ``j`` set to NaN (so each feature's missing-value
    handling is exercised even if the real rows never miss it), one all-NaN row and one row of ``+inf`` /
    ``-inf`` (mapped to NaN by both the native path and the graph).

    Raises:
        ValueError: ``check_rows`` is empty.
        MissingFeaturesError: feature columns are missing.
    """
    x = feature_matrix(check_rows, feature_names)
    if len(x) == 0:
        raise ValueError("check_rows is empty: pass real validation rows (see serving.export.validation_rows)")
    n_features = len(feature_names)
    per_feature = np.repeat(x[:1], n_features, axis=0)
    per_feature[np.arange(n_features), np.arange(n_features)] = np.nan
    all_nan = np.full((1, n_features), np.nan, dtype=np.float32)
    infs = np.where(np.arange(n_features) % 2 == 0, np.inf, -np.inf).astype(np.float32)[None, :]
    return np.ascontiguousarray(np.concatenate([x, per_feature, all_nan, infs]), dtype=np.float32)


def onnx_session(model, threads: int = 1):
    """A CPU ``onnxruntime.InferenceSession`` for a ``ModelProto``, serialized bytes or a path."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    if not isinstance(model, (bytes, str, os.PathLike)):
        model = model.SerializeToString()
    if isinstance(model, os.PathLike):
        model = str(model)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def verify_onnx(model, handle: RankerHandle, check_rows: pd.DataFrame, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """Compare the ONNX model with the native model on ``check_matrix(check_rows)``.

    Args:
        model: ``onnx.ModelProto``, serialized bytes, a path, or an ``onnxruntime.InferenceSession``
            (then that session is the one checked).
        handle: the native ranker (``RankerHandle.predict`` runs the native model on the same
            float32 matrix, so both see identical inputs).
        check_rows: real rows with the handle's feature columns (validation days).
        tolerance: maximum allowed ``|onnx - native|`` (probabilities).

    Returns:
        The maximum absolute difference (float).

    Raises:
        ExportMismatchError: a shape differs, an output is NaN where the other is not, or the
            difference exceeds ``tolerance``; the message gives the diff, row and head.
    """
    x = check_matrix(check_rows, handle.feature_names)
    native = handle.predict(pd.DataFrame(x, columns=list(handle.feature_names)))
    session = model if hasattr(model, "run") else onnx_session(model)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    label = f"{handle.name} v{handle.version}"
    if got.shape != native.shape or got.dtype != np.float32:
        raise ExportMismatchError(
            f"{label}: ONNX output {got.dtype} {got.shape} != native float32 {native.shape}",
            float("inf"), 0, "", tolerance)
    diff = np.abs(got.astype(np.float64) - native.astype(np.float64))
    diff = np.where(np.isnan(got) & np.isnan(native), 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only
    row, col = np.unravel_index(int(np.argmax(diff)), diff.shape)
    worst = float(diff[row, col])
    if worst > tolerance:
        raise ExportMismatchError(
            f"{label}: ONNX differs from the native model by {worst:.3e} > {tolerance:.0e} "
            f"(row {row} of {len(x)}, head {handle.heads[col]!r}: onnx {got[row, col]!r} vs native "
            f"{native[row, col]!r}); the ONNX file was not written",
            worst, int(row), handle.heads[col], tolerance)
    return worst


# ---------------------------------------------------------------- export


def _write_atomically(model, path: Path) -> None:
    """Write next to ``path`` then rename, so a running server never reads a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".onnx.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_version(name: str, version: int, tracking_uri: str, out_dir: Path, check_rows: pd.DataFrame,
                   alias: str | None = None, tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Export version ``version`` of ``name`` to ``out_dir/model.onnx`` after checking it.

    The version is loaded through ``models.registry.load_ranker_version`` (``with_program=True``),
    the one registry path, so ``handle.predict`` in the check is exactly what the in-process mixer
    computes. Arguments and errors as :func:`export_onnx` (which resolves an alias to a version
    first); also raises ``ValueError`` for a version without ranker metadata.
    """
    started = time.monotonic()
    h = load_ranker_version(name, version, tracking_uri, alias=alias or "", with_program=True)
    model = to_onnx(h, alias)
    worst = verify_onnx(model, h, check_rows, tolerance)
    _set_metadata(model, h, alias, worst)
    path = Path(out_dir) / MODEL_FILE
    _write_atomically(model, path)
    return ExportResult(
        name=h.name, version=h.version, alias=alias, run_id=h.run_id, kind=h.kind,
        feature_names=h.feature_names, heads=h.heads, path=path, max_abs_diff=worst,
        rows_checked=len(check_rows), seconds=time.monotonic() - started,
    )


def export_onnx(name: str, alias: str = CHAMPION_ALIAS, tracking_uri: str | None = None,
                out_dir: Path | None = None, check_rows: pd.DataFrame | None = None,
                tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Export the version that ``alias`` of registered model ``name`` points at to ONNX.

    Args:
        name: registered model (``schema.LIGHT_RANKER_NAME`` / ``schema.HEAVY_RANKER_NAME``).
        alias: registry alias, resolved once to a version (later alias moves do not affect it).
        tracking_uri: MLflow URI (default ``StateDir.from_env().mlflow_tracking_uri``).
        out_dir: folder for ``model.onnx`` (default ``<state>/onnx/<name>/<version>``).
        check_rows: real rows with the model's feature columns, e.g. :func:`validation_rows`
            (required: an unchecked export is never written).
        tolerance: maximum ``|onnx - native|`` allowed (default 1e-5).

    Returns:
        :class:`ExportResult`.

    Raises:
        RankerNotFoundError: no store, model, alias or version.
        ExportError: conversion failed.
        ExportMismatchError: the ONNX model disagrees with the native one (nothing is written).
        ValueError: ``check_rows`` missing or empty.
    """
    if check_rows is None:
        raise ValueError("check_rows is required: pass real validation rows (serving.export.validation_rows)")
    state = StateDir.from_env()
    uri = tracking_uri or state.mlflow_tracking_uri
    version = alias_version(name, alias, uri)  # once: later alias moves do not affect this export
    out = Path(out_dir) if out_dir is not None else state.root / "onnx" / name / str(version)
    return export_version(name, version, uri, out, check_rows, alias=alias, tolerance=tolerance)


def validation_rows(state: StateDir, n: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Up to ``n`` rows sampled from the validation days of the state's training set.

    The validation days are the last ``schema.VALIDATION_DAYS`` dates of ``training_set.parquet``
    (the rows the rankers were measured on, never trained on).

    Raises:
        FileNotFoundError: no training set (run ``home-mixer features build`` first).
    """
    from pipelines.training_set import load_training_set

    df = load_training_set(state)
    days = sorted(pd.unique(df["date"]))[-VALIDATION_DAYS:]
    valid = df[df["date"].isin(days)]
    return valid.sample(n=min(n, len(valid)), random_state=seed).reset_index(drop=True)
