"""Query hydrators: add user context and the experiment arm to a Query before candidates are fetched."""

from mixer.query_hydrators.action_sequence import UserActionSequenceQueryHydrator
from mixer.query_hydrators.experiment_arm import ExperimentArmQueryHydrator, assign_arm
from mixer.query_hydrators.user_context import UserContextQueryHydrator
from mixer.query_hydrators.user_embedding import UserEmbeddingQueryHydrator

__all__ = ["ExperimentArmQueryHydrator", "UserActionSequenceQueryHydrator", "UserContextQueryHydrator",
           "UserEmbeddingQueryHydrator", "assign_arm"]
