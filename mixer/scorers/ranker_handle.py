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

    raw, path = predict_with_path(handle, frame)  # each path takes its columns (no copy of the frame here)
    out = np.asarray(raw, dtype="float64")
    if out.ndim == 1:
        out = out.reshape(-1, 1)
    if out.shape != (len(frame), len(handle.heads)):
        raise ValueError(f"{role} returned shape {out.shape}, expected ({len(frame)}, {len(handle.heads)})")
    return out, path


class RankerScorer:
    """What the light and heavy ranker scorers share: a handle per arm, its version, the scoring call.

    Subclasses set ``name``, ``role`` (for error messages) and ``assign(candidates, probs)``,
    which writes the ``float [len(candidates), len(heads)]`` probabilities into the candidates.

    Args:
        handle: the served model (arms without their own).
        by_arm: arm name -> the model that arm serves instead (``experiment.arms[].models``).

    Raises:
        ValueError: a model needs features the mixer cannot hydrate, declares no heads, or an
            arm's model has other heads than ``handle`` (the blender weighs one set of heads).
    """

    name: str
    role: str

    def __init__(self, handle: RankerHandle, by_arm: dict[str, RankerHandle] | None = None):
        check_handle(handle, self.role)
        self.handle = handle
        self.by_arm = dict(by_arm or {})
        for arm, h in self.by_arm.items():
            check_handle(h, f"{self.role} of arm {arm!r}")
            if list(h.heads) != list(handle.heads):
                raise ValueError(f"{self.role} of arm {arm!r} (version {h.version}) has heads {list(h.heads)}, "
                                 f"the served one {list(handle.heads)}: every arm must predict the same heads")

    def enabled(self, query) -> bool:
        """Rankers always run."""
        return True

    @property
    def version(self) -> str:
        """The served model's registered version (``handle.version`` as a string)."""
        return str(self.handle.version)

    def handle_for(self, query) -> RankerHandle:
        """The model ``query.arm`` serves: its own, else the served one."""
        return self.by_arm.get(getattr(query, "arm", None), self.handle)

    def version_for(self, query) -> str:
        """The registered version that scores ``query`` (``handle_for``)."""
        return str(self.handle_for(query).version)

    @property
    def versions(self) -> dict[str, str]:
        """Every model this scorer serves: ``{"": served version, arm: version, ...}``."""
        return {"": self.version, **{arm: str(h.version) for arm, h in self.by_arm.items()}}

    def assign(self, candidates: list, probs: np.ndarray) -> None:
        raise NotImplementedError

    def score(self, query, candidates: list, features: pd.DataFrame) -> str | None:
        """Score in place with ``handle_for(query)``; ``features`` row i belongs to
        ``candidates[i]`` (float64, the handle's ``feature_names`` among its columns). Returns the
        scoring path (None when there was nothing to score).

        Raises:
            ValueError: the model returned another shape than [len(candidates), len(heads)].
        """
        if not candidates:
            return None
        probs, path = predict_matrix(self.handle_for(query), features, self.role)
        self.assign(candidates, probs)
        return path
