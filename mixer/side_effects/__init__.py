"""Side effects after a page is chosen: served-posts record, impression log, feature log, drift sample,
exploration pools, shadow scoring, metrics. All fail-open."""

from mixer.side_effects.drift_sample import DriftSampleSideEffect
from mixer.side_effects.exploration_log import ExplorationLogSideEffect
from mixer.side_effects.feature_log import FeatureLogSideEffect
from mixer.side_effects.impression_log import ImpressionLogSideEffect
from mixer.side_effects.request_metrics import RequestMetricsSideEffect
from mixer.side_effects.served_posts import ServedPostsSideEffect
from mixer.side_effects.shadow_scoring import ShadowRunner, ShadowScoringSideEffect

__all__ = ["DriftSampleSideEffect", "ExplorationLogSideEffect", "FeatureLogSideEffect", "ImpressionLogSideEffect", "RequestMetricsSideEffect", "ServedPostsSideEffect", "ShadowRunner", "ShadowScoringSideEffect"]
