"""Spark jobs: canonical tables -> the offline feature tables of ``core.schema.FEATURE_VIEWS``.

One module per feature view (``user``, ``content``, ``social``, ``temporal``), shared pieces in
``common`` (point-in-time rule, smoothing, priors, typed writing) and the ``runner``.
Run the whole batch path with ``home-mixer features build``.
"""

from pipelines.features.common import RatePriors, smoothed_rate
from pipelines.features.runner import build_offline_features

__all__ = ["RatePriors", "build_offline_features", "smoothed_rate"]
