"""Where home-mixer keeps its state: Redis data, MLflow database and artifacts, Feast registry, tables.

The state folder is ``$HOME_MIXER_STATE`` or ``<checkout>/.state`` (git-ignored); ``home-mixer clean``
removes it. Nothing outside it is written.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = Path(os.environ.get("HOME_MIXER_DATA", PROJECT_ROOT.parent / "shared" / "data" / "kuairand-pure"))


def state_from_cli(root: str | None) -> "StateDir":
    """The state folder a command was given (``--state``), else the environment's; created.

    A given folder is also exported as ``HOME_MIXER_STATE`` so child processes (mixer, servers)
    and the Feast repository see the same one.
    """
    if root:
        os.environ["HOME_MIXER_STATE"] = str(Path(root).resolve())
    return StateDir.from_env().ensure()


@dataclass(frozen=True)
class StateDir:
    """Paths inside one state folder. Creating the object creates nothing; ``ensure()`` does."""

    root: Path

    @classmethod
    def from_env(cls) -> "StateDir":
        """The folder named by ``HOME_MIXER_STATE``, else ``<checkout>/.state``."""
        return cls(Path(os.environ.get("HOME_MIXER_STATE", PROJECT_ROOT / ".state")).resolve())

    @property
    def tables(self) -> Path:
        """Parquet tables: canonical tables and offline feature tables."""
        return self.root / "tables"

    def table(self, name: str) -> Path:
        """Path of one parquet table (a file or a Spark output folder) by name."""
        return self.tables / f"{name}.parquet"

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        """SQLite backend store URI (``MLFLOW_TRACKING_URI`` overrides it, e.g. a tracking server)."""
        return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{self.mlflow / 'mlflow.db'}")

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow / "artifacts"

    @property
    def feast(self) -> Path:
        """Feast registry folder."""
        return self.root / "feast"

    @property
    def reports(self) -> Path:
        """Validation and evaluation reports (JSON, HTML)."""
        return self.root / "reports"

    @property
    def compiled_models(self) -> Path:
        """Models compiled to machine code, one file per model hash (``models.compiled_light``):
        built once, reused by every later load on this machine."""
        return self.root / "compiled"

    @property
    def run(self) -> Path:
        """Pid and port files of services started by home-mixer."""
        return self.root / "run"

    @property
    def materialization_record(self) -> Path:
        """``run/materialization.json``: when the online store was last filled and up to when."""
        return self.run / "materialization.json"

    def record_materialization(self, until) -> Path:
        """Record a ``materialize`` that just finished: wall-clock time now (epoch s) and the event
        time it filled up to (``until``, a datetime). Read by the freshness gauge."""
        import json
        import time

        self.run.mkdir(parents=True, exist_ok=True)
        self.materialization_record.write_text(json.dumps({"materialized_at": time.time(),
                                                           "until": until.timestamp()}))
        return self.materialization_record

    def last_materialization(self) -> dict | None:
        """``{"materialized_at": epoch s, "until": epoch s}`` of the last ``materialize``, or None."""
        import json

        try:
            return json.loads(self.materialization_record.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def ensure(self) -> "StateDir":
        for p in (self.tables, self.redis, self.mlflow_artifacts, self.feast, self.reports, self.run):
            p.mkdir(parents=True, exist_ok=True)
        return self

    def clean(self) -> None:
        """Remove the whole state folder (services must be stopped first)."""
        if self.root.exists():
            shutil.rmtree(self.root)
