"""Load a registered ranker by *version* (``models:/<name>/<version>``), for the model server.

``models.registry.load_ranker`` loads through an alias; a model server must also serve an exact
version so the mixer, which pins the version it loaded in-process, gets the same model from the
server even while the alias moves. Both go through ``models.registry``.
"""

from __future__ import annotations

from models.registry import RankerHandle, alias_version, load_ranker_version


class RankerVersionLoader:
    """Loads ``models:/<name>/<version>`` from one MLflow registry.

    Args:
        tracking_uri: MLflow tracking/registry URI (e.g. ``sqlite:///.../mlflow.db``).
    """

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri

    def alias_version(self, name: str, alias: str) -> int:
        """The version ``alias`` of ``name`` points at (one registry query).

        Raises:
            RankerNotFoundError: no store, model or alias.
        """
        return alias_version(name, alias, tracking_uri=self.tracking_uri)

    def load(self, name: str, version: int) -> RankerHandle:
        """Version ``version`` of registered model ``name`` (``models.registry.load_ranker_version``).

        Raises:
            RankerNotFoundError: the registered model or the version does not exist.
            ValueError: the version was not logged by ``models.registry`` (no ranker metadata).
        """
        return load_ranker_version(name, version, tracking_uri=self.tracking_uri)
