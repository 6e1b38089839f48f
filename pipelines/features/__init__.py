"""Spark jobs: canonical tables -> the offline feature tables of ``home_mixer.schema.FEATURE_VIEWS``.

One module per feature view (``user``, ``content``, ``social``, ``temporal``), shared pieces in
``common`` (point-in-time rule, smoothing, priors, typed writing) and the ``runner``.
Run the whole batch path with ``python -m pipelines.features [--data DIR] [--state DIR]``.
"""

from pipelines.features.common import RatePriors, smoothed_rate
from pipelines.features.runner import build_offline_features, run_batch_pipeline

__all__ = ["RatePriors", "build_offline_features", "run_batch_pipeline", "smoothed_rate"]
