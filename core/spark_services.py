"""A Spark standalone cluster on loopback: one master and N workers from the pyspark wheel.

The pyspark wheel carries Spark's jars and ``bin/spark-class``, which starts the standalone
daemons (Spark docs, "Spark Standalone Mode": ``spark-class org.apache.spark.deploy.master.Master``
/ ``...deploy.worker.Worker spark://host:port``). ``SparkMaster`` and ``SparkWorker`` are managed
processes like the other services (``core.services.ManagedProcess``: ports recorded in
``<state>/run``, stopped by ``home-mixer services stop spark`` or ``clean``). The batch jobs reach
the cluster with ``--spark-master spark://127.0.0.1:<port>`` (``pipelines.spark.spark_session``);
local mode stays the default.

Every path the jobs read and write is on this machine's disk, which the driver, the master and the
workers share here; a cluster on several machines needs the state folder on a shared file system
(or object storage), as any Spark deployment does.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from core.services import IndexedInstance, ManagedProcess, ServiceError

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


def spark_home() -> Path:
    """The pyspark wheel's folder (``SPARK_HOME``: ``bin/spark-class`` and ``jars/``).

    Raises:
        ServiceError: pyspark is not installed, or its wheel has no ``bin/spark-class``.
    """
    try:
        import pyspark
    except ImportError:
        raise ServiceError("pyspark is not installed: run `make setup`") from None
    home = Path(pyspark.__file__).resolve().parent
    if not (home / "bin" / "spark-class").exists():
        raise ServiceError(f"{home}/bin/spark-class not found: reinstall pyspark (`make setup`)")
    return home


def _spark_env(state_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": "127.0.0.1",
                "SPARK_LOG_DIR": str(state_dir), "SPARK_NO_DAEMONIZE": "1"})
    return env


def _master_json(webui_port: int | None) -> dict[str, Any] | None:
    """The master's ``/json/`` status page (workers, their state), None while it does not answer."""
    if webui_port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{webui_port}/json/", timeout=1) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


@dataclass
class SparkMaster(ManagedProcess):
    """The standalone master: ``spark://127.0.0.1:<port>``, web UI (and ``/json/``) on ``webui_port``.

    Attributes:
        port: the master's RPC port (None: the recorded one, else a free one).
        webui_port: its web UI port (readiness and the workers' state come from ``/json/``).
    """

    port: int | None = None
    webui_port: int | None = None

    service: ClassVar[str] = "spark_master"
    port_fields: ClassVar[tuple[str, ...]] = ("port", "webui_port")
    cmdline_marker: ClassVar[str] = MASTER_CLASS
    start_timeout_s: ClassVar[float] = 60.0

    @property
    def url(self) -> str:
        """``spark://127.0.0.1:<port>``, the ``--spark-master`` of the batch jobs.

        Raises:
            ServiceError: not started or found.
        """
        if self.port is None:
            raise ServiceError("the Spark master is not started: run `home-mixer services start spark`")
        return f"spark://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.url} (web UI http://127.0.0.1:{self.webui_port})"

    def prepare(self) -> None:
        spark_home()

    def environment(self) -> dict[str, str]:
        return _spark_env(self.state.run)

    def command(self) -> list[str]:
        return [str(spark_home() / "bin" / "spark-class"), MASTER_CLASS, "--host", "127.0.0.1",
                "--port", str(self.port), "--webui-port", str(self.webui_port)]

    def ready(self) -> bool:
        """True when ``/json/`` says the master is ALIVE."""
        info = _master_json(self.webui_port)
        return info is not None and info.get("status") == "ALIVE"

    def live(self) -> bool:
        return self.ready()

    def alive_workers(self) -> list[dict[str, Any]]:
        """The workers registered and ALIVE (``/json/``: id, host, port, cores, memory in MB)."""
        info = _master_json(self.webui_port) or {}
        return [w for w in info.get("workers", []) if w.get("state") == "ALIVE"]

    def status_extra(self) -> dict[str, Any]:
        workers = self.alive_workers()
        return {"url": self.url, "alive_workers": len(workers),
                "cores": sum(int(w.get("cores", 0)) for w in workers)}


@dataclass
class SparkWorker(IndexedInstance, ManagedProcess):
    """Standalone worker ``index`` of the master at ``master_url``, with ``cores`` and ``memory``.

    Attributes:
        index: which worker (its record is ``run/spark_worker-<index>.json``).
        master_url: ``spark://host:port`` of the master.
        master_webui_port: the master's web UI port (readiness: the master lists this worker ALIVE).
        cores: cores offered to executors; memory: executor memory offered (Spark size, e.g. ``"2g"``).
        port / webui_port: the worker's own ports (None: free ones).
    """

    index: int = 0
    master_url: str = ""
    master_webui_port: int | None = None
    cores: int = 1
    memory: str = "2g"
    port: int | None = None
    webui_port: int | None = None

    service: ClassVar[str] = "spark_worker"
    port_fields: ClassVar[tuple[str, ...]] = ("port", "webui_port")
    record_fields: ClassVar[tuple[str, ...]] = ("master_url", "master_webui_port", "cores", "memory")
    cmdline_marker: ClassVar[str] = WORKER_CLASS
    start_timeout_s: ClassVar[float] = 60.0

    def prepare(self) -> None:
        spark_home()
        if not self.master_url.startswith("spark://"):
            raise ServiceError(f"a Spark worker needs the master's spark://host:port, got {self.master_url!r}")

    def environment(self) -> dict[str, str]:
        return _spark_env(self.state.run)

    def command(self) -> list[str]:
        work = self.state.run / f"spark-work-{self.index}"
        work.mkdir(parents=True, exist_ok=True)
        return [str(spark_home() / "bin" / "spark-class"), WORKER_CLASS, self.master_url, "--host", "127.0.0.1",
                "--port", str(self.port), "--webui-port", str(self.webui_port), "--cores", str(self.cores),
                "--memory", self.memory, "--work-dir", str(work)]

    def ready(self) -> bool:
        """True when the master lists this worker (by its port) as ALIVE."""
        info = _master_json(self.master_webui_port) or {}
        return any(w.get("state") == "ALIVE" and int(w.get("port", -1)) == self.port
                   for w in info.get("workers", []))


def start_spark_cluster(state, workers: int = 2, cores: int = 1, memory: str = "2g",
                        timeout_s: float | None = None) -> tuple[SparkMaster, list[SparkWorker]]:
    """Start (or find) the master, then ``workers`` workers registered with it.

    Returns:
        ``(master, workers)``; ``master.url`` is what the batch jobs take.

    Raises:
        ServiceError: a daemon did not become ready (the message has the end of its log), or
            ``workers`` < 1.
    """
    if workers < 1:
        raise ServiceError(f"a Spark cluster needs at least one worker, got {workers}")
    master = SparkMaster.running(state) or SparkMaster(state).start(timeout_s)
    out = []
    for i in range(workers):
        found = SparkWorker.find(state, index=i)
        if found is not None and found.master_url == master.url and found.ready():
            out.append(found)
            continue
        if found is not None:  # registered with an older master: restart it
            found.stop()
        out.append(SparkWorker(state, index=i, master_url=master.url, master_webui_port=master.webui_port,
                               cores=cores, memory=memory).start(timeout_s))
    return master, out


def stop_spark_cluster(state) -> list[str]:
    """Stop the workers (any index recorded), then the master; returns what was stopped."""
    stopped = []
    for record in sorted(Path(state.run).glob("spark_worker-*.json")) if Path(state.run).exists() else []:
        try:
            index = int(record.stem.rsplit("-", 1)[1])
        except ValueError:
            continue
        worker = SparkWorker.find(state, index=index)
        if worker is not None:
            worker.stop()
            stopped.append(worker.record_name)
    master = SparkMaster.find(state)
    if master is not None:
        master.stop()
        stopped.append(master.record_name)
    return stopped
