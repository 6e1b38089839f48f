"""The interface the scorers need from a registered model (``models.registry.load_ranker``)."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import pandas as pd

from core.schema import ALL_FEATURES


class RankerHandle(Protocol):
    """A loaded ranker (``models.registry.RankerHandle`` satisfies it).

    Attributes:
        version: registered model version served (int or str).
        feature_names: input columns, a subset of ``core.schema.ALL_FEATURES``.
        heads: output columns, e.g. ``("engaged",)`` (light) or ``core.schema.HEADS`` (heavy).
    """

    @property
    def version(self) -> int | str: ...

    @property
    def feature_names(self) -> Sequence[str]: ...

    @property
    def heads(self) -> Sequence[str]: ...

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """float32 [len(frame), len(heads)] probabilities; ``frame`` has ``feature_names`` columns
        (float64, NaN for missing)."""
        ...


def check_handle(handle: RankerHandle, role: str) -> None:
    """Raise ValueError if the handle asks for features the mixer cannot hydrate or has no heads."""
    unknown = sorted(set(handle.feature_names) - set(ALL_FEATURES))
    if unknown:
        raise ValueError(f"{role} (version {handle.version}) needs features {unknown} that the mixer does not "
                         "hydrate (core.schema.ALL_FEATURES); retrain it on the shared schema")
    if not list(handle.heads):
        raise ValueError(f"{role} (version {handle.version}) declares no heads")


def predict_matrix(handle: RankerHandle, frame: pd.DataFrame, role: str) -> tuple[np.ndarray, str]:
    """``handle.predict`` on the handle's columns, checked to be [len(frame), len(heads)].

    Returns:
        (float64 [len(frame), len(heads)], the scoring path: "in_process", a remote backend's name
        or "in_process_fallback"; see ``mixer.scorers.remote``).

    Raises:
        ValueError: the model returned another shape.
    """
    from mixer.scorers.remote import predict_with_path

    raw, path = predict_with_path(handle, frame[list(handle.feature_names)])
    out = np.asarray(raw, dtype="float64")
    if out.ndim == 1:
        out = out.reshape(-1, 1)
    if out.shape != (len(frame), len(handle.heads)):
        raise ValueError(f"{role} returned shape {out.shape}, expected ({len(frame)}, {len(handle.heads)})")
    return out, path
