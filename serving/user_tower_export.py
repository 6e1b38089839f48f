"""Export the two-tower model's user tower to ONNX, checked against the in-process tower on real
action sequences (the rankers' export is ``serving.export``; this follows its contract and checks).

The ONNX contract of the served user tower (the Triton config in ``serving.triton.repository``
relies on it):

- inputs ``post``, ``author``, ``action``: ``int64 [batch, L]`` embedding rows, and ``mask``:
  ``float32 [batch, L]`` (1 entry, 0 padding), L = the model's ``max_sequence_length``: exactly
  ``models.two_tower.UserTowerInputs``, made by ``TwoTowerFit.user_tower_inputs`` (id lookups and
  padding stay in Python, in the one function the in-process path uses too);
- output ``user_embedding``: ``float32 [batch, D]``, unit rows;
- ``metadata_props`` hold ``registered_model``, ``version``, ``alias``, ``run_id``, ``part``
  (``"user_tower"``), ``inputs`` (JSON list), ``max_sequence_length``, ``dim``, ``source`` and
  ``check_max_abs_diff``.

Conversion: ``torch.onnx.export(..., dynamo=True)`` of ``TwoTowerNet.user_vectors_padded`` with a
dynamic batch dimension (opset ``serving.export.HEAVY_ONNX_OPSET``: onnxruntime >= 1.14).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from serving.export import (
    BATCH_DIM, DEFAULT_TOLERANCE, HEAVY_ONNX_OPSET, MODEL_FILE, ExportError, ExportMismatchError, ExportResult,
    _write_atomically, onnx_session,
)

PART = "user_tower"
INPUT_NAMES: tuple[str, ...] = ("post", "author", "action", "mask")  # = UserTowerInputs.NAMES
OUTPUT_NAME = "user_embedding"

Sequences = Sequence[Sequence[tuple]]


def user_tower_to_onnx(fit):
    """The user tower of ``fit`` (``models.two_tower.TwoTowerFit``) as an ``onnx.ModelProto``
    following the module contract (no metadata yet, not yet checked: :func:`verify_user_tower`).

    Raises:
        ExportError: the exporter failed or produced other inputs / outputs.
    """
    import logging

    import torch

    from models.two_tower import UserTowerInputs, user_tower_module

    if UserTowerInputs.NAMES != INPUT_NAMES:
        raise ExportError(f"UserTowerInputs.NAMES {UserTowerInputs.NAMES} != {INPUT_NAMES}: update the export contract")
    example = fit.user_tower_inputs([[(1, 1, "like")], []]).tensors()  # batch 2: no 0/1 specialisation
    batch = torch.export.Dim(BATCH_DIM)
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed" notices are noise here
    try:
        program = torch.onnx.export(
            user_tower_module(fit.net), example, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_shapes={name: {0: batch} for name in INPUT_NAMES}, opset_version=HEAVY_ONNX_OPSET,
            dynamo=True, external_data=False, verbose=False)
    except Exception as e:  # the exporter raises many kinds; say what was being exported
        raise ExportError(f"torch.onnx.export failed on the two-tower user tower: {type(e).__name__}: {e}") from e
    finally:
        onnx_logger.setLevel(level)
    model = program.model_proto
    got_in, got_out = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if got_in != list(INPUT_NAMES) or got_out != [OUTPUT_NAME]:
        raise ExportError(f"user tower ONNX has inputs {got_in} and outputs {got_out}, expected "
                          f"{list(INPUT_NAMES)} and [{OUTPUT_NAME!r}]")
    return model


def check_sequences(real: Sequences, max_length: int) -> list[list[tuple]]:
    """The sequences the check runs on: the real ones plus edge cases the real ones may lack.

    Appended after ``real``: an empty history (the cold-start vector), a history of ids no model
    has seen and an action outside ``ACTION_STRENGTH`` (OOV rows), and the first real sequence
    repeated past ``max_length`` (truncation).

    Raises:
        ValueError: ``real`` is empty.
    """
    real = [list(s) for s in real]
    if not real or not any(real):
        raise ValueError("no real sequences to check on: pass users' action sequences "
                         "(serving.user_tower_export.validation_sequences)")
    longest = max(real, key=len)
    return [*real, [], [(-7, -7, "like"), (10**15, 10**15, "no_such_action")],
            (longest * (max_length // len(longest) + 2))[: max_length + 5]]


def verify_user_tower(model, fit, sequences: Sequences, tolerance: float = DEFAULT_TOLERANCE,
                      label: str = "user tower") -> float:
    """Compare the ONNX user tower with the in-process one (``fit.user_vectors``) on the same
    padded inputs (``fit.user_tower_inputs(sequences)``).

    Returns:
        The maximum ``|onnx - native|`` over all rows and dimensions (float).

    Raises:
        ExportMismatchError: a shape or dtype differs, or the difference exceeds ``tolerance``; the
            message gives the diff, row and dimension.
    """
    inputs = fit.user_tower_inputs(sequences)
    native = fit.user_vectors(inputs)
    got = onnx_session(model).run([OUTPUT_NAME], inputs.arrays())[0]
    if got.shape != native.shape or got.dtype != np.float32:
        raise ExportMismatchError(f"{label}: ONNX output {got.dtype} {got.shape} != native float32 {native.shape}",
                                  float("inf"), 0, "", tolerance)
    diff = np.abs(got.astype(np.float64) - native.astype(np.float64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    row, col = np.unravel_index(int(np.argmax(diff)), diff.shape)
    worst = float(diff[row, col])
    if worst > tolerance:
        raise ExportMismatchError(
            f"{label}: ONNX differs from the in-process tower by {worst:.3e} > {tolerance:.0e} (sequence {row} "
            f"of {len(sequences)}, dimension {col}); the ONNX file was not written", worst, int(row), str(col), tolerance)
    return worst


def _set_metadata(model, handle, alias: str | None, max_abs_diff: float | None) -> None:
    from onnx import helper

    props = {
        "registered_model": handle.name, "version": str(handle.version), "alias": alias or "",
        "run_id": handle.run_id, "part": PART, "inputs": json.dumps(list(INPUT_NAMES)),
        "max_sequence_length": str(handle.model.params.max_sequence_length), "dim": str(handle.dim),
        "source": f"models:/{handle.name}/{handle.version}",
    }
    if max_abs_diff is not None:
        props["check_max_abs_diff"] = f"{max_abs_diff:.3e}"
    del model.metadata_props[:]
    helper.set_model_props(model, props)


def export_user_tower(handle, out_dir: Path, sequences: Sequences, alias: str | None = None,
                      tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Export the user tower of a loaded two-tower version to ``out_dir/model.onnx`` after checking it.

    Args:
        handle: ``models.registry.TwoTowerHandle`` (``load_two_tower_version``).
        out_dir: folder for ``model.onnx`` (written atomically, only after the check passed).
        sequences: real action sequences (:func:`validation_sequences`); :func:`check_sequences`
            adds the edge cases.
        alias: recorded in the metadata ("" when None).
        tolerance: maximum ``|onnx - native|`` allowed (unit-vector coordinates; default 1e-5).

    Returns:
        ``serving.export.ExportResult`` with ``kind="user_tower"``, ``feature_names`` = the input
        names, ``heads = ()`` and ``rows_checked`` = sequences checked.

    Raises:
        ExportError / ExportMismatchError: conversion failed or disagrees (nothing is written).
        ValueError: no real sequences.
    """
    import onnx

    started = time.monotonic()
    checked = check_sequences(sequences, handle.model.params.max_sequence_length)
    model = user_tower_to_onnx(handle.model)
    worst = verify_user_tower(model, handle.model, checked, tolerance, label=f"{handle.name} v{handle.version}")
    _set_metadata(model, handle, alias, worst)
    onnx.checker.check_model(model)
    path = Path(out_dir) / MODEL_FILE
    _write_atomically(model, path)
    return ExportResult(name=handle.name, version=handle.version, alias=alias, run_id=handle.run_id, kind=PART,
                        feature_names=INPUT_NAMES, heads=(), path=path, max_abs_diff=worst,
                        rows_checked=len(checked), seconds=time.monotonic() - started)


def export_user_tower_version(name: str, version: int, tracking_uri: str, out_dir: Path, sequences: Sequences,
                              alias: str | None = None, tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Load version ``version`` of the registered two-tower ``name`` (``load_two_tower_version``)
    and :func:`export_user_tower` it. Raises as both."""
    from models.registry import load_two_tower_version

    handle = load_two_tower_version(version, tracking_uri, name=name, alias=alias or "")
    return export_user_tower(handle, out_dir, sequences, alias=alias, tolerance=tolerance)


def validation_sequences(state, n: int = 2000, seed: int = 0, max_length: int = 64) -> list[list[tuple]]:
    """Up to ``n`` users' action sequences at the end of the state's log, newest first, as the
    mixer reads them (``pipelines.sequences.engagement_sequences`` over the canonical impressions
    and pre-log events, ``models.two_tower.latest_histories``), a seeded sample of users.

    Raises:
        FileNotFoundError: no canonical impressions in the state (run ``home-mixer features build``).
    """
    import pandas as pd

    from models.two_tower import latest_histories
    from pipelines.sequences import engagement_sequences

    path = state.table("impressions")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing: the check needs the canonical impressions (`home-mixer features build`)")
    imp = pd.read_parquet(path)
    prelog_path = state.table("prelog_events")
    prelog = pd.read_parquet(prelog_path) if Path(prelog_path).exists() else None
    end = pd.Timestamp(imp["event_ts"].max()) + pd.Timedelta(seconds=1)
    histories = latest_histories(engagement_sequences(imp, prelog, end), end, max_length)
    users = sorted(histories)
    chosen = np.random.default_rng(seed).permutation(len(users))[:n]
    return [histories[users[i]] for i in sorted(chosen)]
