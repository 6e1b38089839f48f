"""MLflow side of the rankers: experiment, model logging, the registry, and loading.

This module is the one registry access path: resolve an alias to a version (:func:`alias_version`,
:func:`model_aliases`), look a version up (:func:`registered_version`), download its artifacts
(:func:`download_version`) and load it with the loader of its ranker kind (:data:`LOADERS`,
:func:`load_ranker_version`) into a typed :class:`RankerHandle`. The mixer loads by alias
(:func:`load_ranker`, never from a file path, so promoting a new version is one alias move,
:func:`promote`); the BentoML service, the ONNX export and the Triton repository load by version
through the same function.

Formats:
- light ranker: ``mlflow.lightgbm`` (LightGBM's text model), input float32 ``[N, F]``.
- heavy ranker: ``mlflow.pytorch`` with MLflow's default ``pt2`` format (``torch.export``): the
  graph with its buffers, no pickle, dynamic batch size; loading needs only torch.
- two-tower retrieval model (``schema.TWO_TOWER_NAME``): a pyfunc model whose data folder holds
  the towers, the candidate embeddings and the FAISS index (:func:`log_two_tower_model`), loaded
  by alias with :func:`load_two_tower` into a :class:`TwoTowerHandle`.
- the light ranker can score compiled: :func:`with_compiled_light` gives its handle an lleaves
  (LLVM) build of the LightGBM model, cached per model hash in the state folder and checked against
  LightGBM at load (``models.compiled_light``); LightGBM stays the fallback.
- the rankers carry ``metadata = {"ranker", "feature_names", "heads"}`` in their ``MLmodel`` file, and
  explicit ``pip_requirements`` pinned from ``requirements.lock`` (MLflow would otherwise infer
  them from the whole test environment).

MLflow's fluent API keeps the tracking URI in process-global state (and in the
``MLFLOW_TRACKING_URI`` environment variable); :func:`mlflow_uris` sets it for one block and
restores what was there, so this module leaves no global state behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import threading
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.schema import CHAMPION_ALIAS
from core.state import PROJECT_ROOT, StateDir
from models.features import feature_matrix

EXPERIMENT_NAME = "home-mixer-rankers"
LOCK_FILE = PROJECT_ROOT / "requirements.lock"
LIGHT_REQUIREMENTS: tuple[str, ...] = ("lightgbm", "numpy", "pandas")
HEAVY_REQUIREMENTS: tuple[str, ...] = ("torch", "numpy", "pandas")


class RankerNotFoundError(LookupError):
    """The registered model, its alias or version does not exist; the message says what to run."""


# ---------------------------------------------------------------- tracking URI scope


_URIS_LOCK = threading.RLock()


@contextlib.contextmanager
def mlflow_uris(tracking_uri: str) -> Iterator[None]:
    """Use ``tracking_uri`` as MLflow's tracking and registry URI inside the block, then restore.

    Artifact progress bars are off inside the block. Restores MLflow's module-level URIs and the
    ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` / ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``
    environment variables exactly as they were (``mlflow.set_tracking_uri`` also writes the
    environment variable, which ``StateDir.mlflow_tracking_uri`` reads).
    """
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    _URIS_LOCK.acquire()  # process-wide MLflow globals: one block at a time (servers load in threads)
    saved_env = {k: os.environ.get(k) for k in (
        "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    try:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no tqdm bars in service logs
        tracking_utils.set_tracking_uri(tracking_uri)
        registry_utils.set_registry_uri(tracking_uri)
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _URIS_LOCK.release()


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _resolve_uri(tracking_uri: str | None) -> str:
    return tracking_uri or StateDir.from_env().mlflow_tracking_uri


def _store_missing(tracking_uri: str) -> bool:
    """True if the URI names a SQLite file that does not exist (opening it would create it)."""
    if tracking_uri.startswith("sqlite:///"):
        return not Path(tracking_uri[len("sqlite:///"):]).exists()
    return False


def ensure_experiment(tracking_uri: str, artifact_root: Path) -> str:
    """Id of the experiment ``EXPERIMENT_NAME``, created with ``artifact_location=artifact_root``.

    A deleted experiment of that name is restored. An existing experiment keeps its artifact
    location (MLflow cannot move it).
    """
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT_NAME)
    if exp is None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        return client.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_root.resolve().as_uri())
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


# ---------------------------------------------------------------- requirements


def pinned_requirements(packages: Sequence[str], lock_file: Path = LOCK_FILE) -> list[str]:
    """``name==version`` pins for ``packages``, from ``requirements.lock`` (else installed versions).

    A local version label is dropped (``torch==2.13.0+cpu`` -> ``torch==2.13.0``): PEP 440 lets
    ``==2.13.0`` match any local build, and PyPI serves no ``+cpu`` wheels.

    Raises:
        LookupError: a package is neither in the lock nor installed.
    """
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    locked: dict[str, str] = {}
    if lock_file.exists():
        for line in lock_file.read_text().splitlines():
            m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
            if m:
                locked[norm(m.group(1))] = m.group(2)
    pins = []
    for pkg in packages:
        version = locked.get(norm(pkg))
        if version is None:
            try:
                version = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                raise LookupError(f"{pkg} is neither pinned in {lock_file} nor installed") from None
        pins.append(f"{pkg}=={version.split('+')[0]}")
    return pins


# ---------------------------------------------------------------- logging models


def _metadata(kind: str, feature_names: Sequence[str], heads: Sequence[str]) -> dict[str, Any]:
    return {"ranker": kind, "feature_names": list(feature_names), "heads": list(heads)}


def log_light_model(booster, feature_names: Sequence[str], heads: Sequence[str],
                    registered_name: str | None):
    """Log a LightGBM booster to the active run (``name="model"``); register it if a name is given.

    Must run inside :func:`mlflow_uris` with an active run. Returns MLflow's ``ModelInfo``
    (``registered_model_version`` is set when registered).
    """
    import mlflow.lightgbm
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.float, n, required=False) for n in feature_names]),
        outputs=Schema([TensorSpec(np.dtype(np.float64), (-1,))]),
    )
    return mlflow.lightgbm.log_model(
        booster,
        name="model",
        signature=signature,
        pip_requirements=pinned_requirements(LIGHT_REQUIREMENTS),
        metadata=_metadata("light", feature_names, heads),
        registered_model_name=registered_name,
    )


def log_heavy_model(module, example: np.ndarray, registered_name: str | None):
    """Log a heavy-ranker module as ``pt2`` (``torch.export``) to the active run, ``name="model"``.

    Args:
        module: a ``HeavyRankerNet`` (put in eval mode here: dropout must not be traced).
        example: ``float32 [n >= 2, F]`` rows without NaN, used to trace the graph (a batch of at
            least 2 keeps the batch dimension dynamic).
        registered_name: registered model name, or None to only log.

    Must run inside :func:`mlflow_uris` with an active run. Returns MLflow's ``ModelInfo``.
    """
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    if example.ndim != 2 or example.shape[0] < 2:
        raise ValueError(f"example must be [n >= 2, F], got shape {example.shape}")
    module.eval()
    n_features, n_heads = len(module.feature_names), len(module.heads)
    # unnamed tensors: pyfunc then takes a plain ndarray (a named one makes it expect a dict,
    # which the pytorch pyfunc rejects)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_features))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_heads))]),
    )
    return mlflow.pytorch.log_model(
        module,
        name="model",
        signature=signature,
        input_example=np.ascontiguousarray(example, dtype=np.float32),
        serialization_format="pt2",
        pip_requirements=pinned_requirements(HEAVY_REQUIREMENTS),
        metadata=_metadata("heavy", module.feature_names, module.heads),
        registered_model_name=registered_name,
    )


# ---------------------------------------------------------------- registry


def promote(name: str, version: int, alias: str = CHAMPION_ALIAS, tracking_uri: str | None = None) -> None:
    """Point ``alias`` of registered model ``name`` at ``version`` (moves it if it pointed elsewhere).

    Args:
        tracking_uri: MLflow URI; default ``StateDir.from_env().mlflow_tracking_uri``.

    Raises:
        RankerNotFoundError: no store, or the registered model or the version does not exist.
    """
    uri = _resolve_uri(tracking_uri)
    mv = registered_version(name, version, uri)
    _client(uri).set_registered_model_alias(name, alias, str(mv.version))


def _not_found_hint() -> str:
    return "run `home-mixer train` first (it registers both rankers and sets the champion alias)"


def _require_store(uri: str) -> None:
    """Raise :class:`RankerNotFoundError` if ``uri`` names a SQLite store that does not exist."""
    if _store_missing(uri):
        raise RankerNotFoundError(f"no MLflow store at {uri}: {_not_found_hint()}")


def alias_version(name: str, alias: str = CHAMPION_ALIAS, tracking_uri: str | None = None) -> int:
    """The registered version ``alias`` of model ``name`` points at (one registry call, no download).

    Args:
        name: registered model name (``schema.LIGHT_RANKER_NAME`` / ``schema.HEAVY_RANKER_NAME``).
        alias: registry alias, default ``"champion"``.
        tracking_uri: MLflow URI; default ``StateDir.from_env().mlflow_tracking_uri``.

    Returns:
        The version number (int >= 1).

    Raises:
        RankerNotFoundError: no store, no registered model ``name``, or no such alias; the message
            says which, and to run ``home-mixer train`` / ``home-mixer models promote``.
    """
    from mlflow.exceptions import MlflowException

    uri = _resolve_uri(tracking_uri)
    _require_store(uri)
    client = _client(uri)
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    try:
        aliases = model_aliases(name, uri)
    except RankerNotFoundError:
        raise RankerNotFoundError(f"no registered model {name!r} in {uri}, so {name!r} has no alias {alias!r}: "
                                  f"{_not_found_hint()}") from None
    raise RankerNotFoundError(
        f"registered model {name!r} has no alias {alias!r} (aliases: {aliases or 'none'}) in {uri}: "
        f"{_not_found_hint()}, or point the alias at a version with `home-mixer models promote`") from None


def resolve_model_ref(name: str, ref: str | int, tracking_uri: str | None = None) -> int:
    """The version a model reference names: a version number (``7``, ``"7"``) as is, else an alias
    resolved with :func:`alias_version` (an experiment arm's ``models``, the shadow challenger).

    Raises:
        RankerNotFoundError: ``ref`` is an alias model ``name`` does not have (or no such model).
        ValueError: ``ref`` is a version number below 1.
    """
    text = str(ref)
    if text.isdigit():
        if int(text) < 1:
            raise ValueError(f"model versions start at 1, got {ref!r} for {name!r}")
        return int(text)
    return alias_version(name, text, tracking_uri)


def model_aliases(name: str, tracking_uri: str | None = None) -> dict[str, int]:
    """Every alias of registered model ``name`` and the version it points at (one registry call).

    Returns:
        ``{alias: version}``; empty if the model has no alias.

    Raises:
        RankerNotFoundError: no store, or no registered model ``name``.
    """
    from mlflow.exceptions import MlflowException

    uri = _resolve_uri(tracking_uri)
    _require_store(uri)
    try:
        registered = _client(uri).get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RankerNotFoundError(f"no registered model {name!r} in {uri}: {_not_found_hint()}") from None
    return {a: int(v) for a, v in (registered.aliases or {}).items()}


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model as the registry records it (no artifacts downloaded).

    Attributes:
        name: registered model name; version: version number (>= 1); run_id: the MLflow run that
            logged it ("" if the version has no run).
    """

    name: str
    version: int
    run_id: str


def registered_version(name: str, version: int, tracking_uri: str | None = None) -> RegisteredVersion:
    """Look up version ``version`` of registered model ``name`` (one registry call, no download).

    Raises:
        RankerNotFoundError: no store, registered model or version.
    """
    from mlflow.exceptions import MlflowException

    uri = _resolve_uri(tracking_uri)
    _require_store(uri)
    try:
        mv = _client(uri).get_model_version(name, str(int(version)))
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise RankerNotFoundError(f"registered model {name!r} has no version {version} in {uri}: "
                                  f"{_not_found_hint()}") from None
    return RegisteredVersion(name=name, version=int(mv.version), run_id=mv.run_id or "")


def download_version(name: str, version: int, dst: Path, tracking_uri: str | None = None) -> Path:
    """Download the artifacts of ``models:/<name>/<version>`` into the folder ``dst``.

    Returns:
        The local model folder (holds ``MLmodel``). The caller owns ``dst`` (the loaders below use a
        temporary folder removed once the model is in memory: nothing is cached on disk).

    Raises:
        RankerNotFoundError: no store (a missing version raises from :func:`registered_version`,
            which :func:`load_ranker_version` calls first).
    """
    import mlflow.artifacts

    uri = _resolve_uri(tracking_uri)
    _require_store(uri)
    with mlflow_uris(uri):  # the models:/ resolver reads the global registry URI
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{int(version)}", dst_path=str(dst), tracking_uri=uri, registry_uri=uri,
        )
    return Path(local)


# ---------------------------------------------------------------- loaders, by ranker kind


def _load_lightgbm(local: Path) -> Any:
    import mlflow.lightgbm

    return mlflow.lightgbm.load_model(str(local))


def _load_pytorch(local: Path) -> Any:
    import mlflow.pytorch

    return mlflow.pytorch.load_model(str(local))  # also checks that the pt2 archive is pickle-free


def _load_pt2_program(local: Path) -> Any:
    """The ``torch.export.ExportedProgram`` of a pt2-logged model, or None if it has no ``.pt2``."""
    import torch

    pt2 = sorted(local.rglob("*.pt2"))
    return torch.export.load(str(pt2[0])) if pt2 else None


@dataclass(frozen=True)
class RankerLoader:
    """How one ranker kind is loaded.

    Attributes:
        flavor: the MLflow flavour the kind is logged with (``MLmodel`` ``flavors`` must list it).
        load: ``local model folder -> model`` (MLflow's loader of that flavour).
        load_program: ``local model folder -> exportable program or None`` (only the heavy ranker
            has one: its ``torch.export`` program, which the ONNX exporter converts).
    """

    flavor: str
    load: Callable[[Path], Any]
    load_program: Callable[[Path], Any] | None = None


LOADERS: dict[str, RankerLoader] = {
    "light": RankerLoader("lightgbm", _load_lightgbm),
    "heavy": RankerLoader("pytorch", _load_pytorch, _load_pt2_program),
}


@dataclass(frozen=True)
class RankerHandle:
    """A registered ranker version loaded in memory, ready to score frames.

    Attributes:
        name: registered model name; alias: the alias it was loaded through ("" if by version).
        version: model version number; run_id: the MLflow run that trained it.
        feature_names: input columns, in model order.
        heads: output columns: ``("engaged",)`` for the light ranker, ``schema.HEADS`` for the heavy.
        kind: ``"light"`` or ``"heavy"`` (the key of :data:`LOADERS` that loaded it).
        model: the loaded model (``lightgbm.Booster``, or the ``torch.export`` module of the heavy
            ranker), for exporters; scoring goes through :meth:`predict`.
        program: the heavy ranker's ``torch.export.ExportedProgram`` when loaded with
            ``with_program=True`` (the ONNX exporter's input); None otherwise.
        num_threads: LightGBM's (and the compiled model's) prediction threads (0: LightGBM's
            default, OpenMP's, all cores). Torch's intra-op pool is per process:
            ``torch.set_num_threads``, set by the server.
        compiled: a faster engine of the same model, which then scores instead of the loaded one:
            the light ranker compiled by lleaves (``models.compiled_light``, set by
            :func:`with_compiled_light`) or the heavy ranker in ONNX Runtime
            (``serving.onnx_ranker.OnnxRanker``, set by the mixer). Any object with
            ``engine`` name and ``predict(float32 [N, F], n_jobs) -> float32 [N, heads]``; None scores with the loaded model.
    """

    name: str
    alias: str
    version: int
    run_id: str
    feature_names: tuple[str, ...]
    heads: tuple[str, ...]
    kind: str
    model: Any
    program: Any = field(default=None, repr=False, compare=False)
    num_threads: int = 0
    compiled: Any = field(default=None, repr=False, compare=False)

    @property
    def engine(self) -> str:
        """What scores :meth:`predict`: ``"lleaves"`` (compiled), ``"onnxruntime"``, ``"lightgbm"`` or ``"torch"``."""
        if self.compiled is not None:
            return self.compiled.engine
        return "lightgbm" if self.kind == "light" else "torch"

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Scores for each row of ``frame``: ``np.ndarray float32 [N, len(heads)]``, probabilities.

        Args:
            frame: any frame with at least the ``feature_names`` columns (NaN allowed; extra
                columns ignored). An empty frame gives shape ``[0, len(heads)]``.

        Raises:
            MissingFeaturesError: feature columns are missing (listed in the message).
            TypeError: a feature column is not numeric.
        """
        x = feature_matrix(frame, self.feature_names)
        if len(x) == 0:
            return np.zeros((0, len(self.heads)), dtype=np.float32)
        if self.compiled is not None:
            # lleaves' threads are plain Python threads per call: 0 ("all cores") means one per core
            out = self.compiled.predict(x, n_jobs=self.num_threads or os.cpu_count() or 1)
        elif self.kind == "light":
            from models.light_ranker import predict_booster

            out = predict_booster(self.model, x, num_threads=self.num_threads)
        else:
            from models.heavy_ranker import predict_module

            out = predict_module(self.model, x)
        if out.shape != (len(x), len(self.heads)):
            raise RuntimeError(f"{self.name} v{self.version} returned shape {out.shape}, expected {(len(x), len(self.heads))}")
        return out


def load_ranker_version(name: str, version: int, tracking_uri: str | None = None, *, alias: str = "",
                        with_program: bool = False) -> RankerHandle:
    """Load version ``version`` of registered model ``name``: the one registry access path.

    Looks the version up, downloads ``models:/<name>/<version>`` to a temporary folder, reads the
    ranker metadata of its ``MLmodel`` (``ranker``, ``feature_names``, ``heads``), picks the loader
    of that kind from :data:`LOADERS` (checking the flavour it was logged with), and returns the
    model in memory (the downloaded files are removed). :func:`load_ranker` (the mixer, by alias),
    the BentoML service (by version, with its LRU of loaded versions), the ONNX export and the
    Triton repository sync (``with_program=True``) all load through here.

    Args:
        name: registered model name.
        version: version number.
        tracking_uri: MLflow URI; default ``StateDir.from_env().mlflow_tracking_uri``.
        alias: recorded on the handle (the alias the caller resolved to this version), else "".
        with_program: also load the exportable program (heavy ranker: ``torch.export`` program;
            None for a kind without one or a version logged without a ``.pt2`` archive).

    Returns:
        :class:`RankerHandle`.

    Raises:
        RankerNotFoundError: no store, registered model or version.
        ValueError: the version was not logged by ``models.registry`` (no ranker metadata), its
            kind is unknown, or it lacks the flavour of its kind.
    """
    from mlflow.models import Model

    uri = _resolve_uri(tracking_uri)
    mv = registered_version(name, version, uri)
    with tempfile.TemporaryDirectory(prefix="home-mixer-ranker-") as tmp:
        local = download_version(name, mv.version, Path(tmp), uri)
        mlmodel = Model.load(str(local))
        meta = mlmodel.metadata or {}
        if not {"ranker", "feature_names", "heads"} <= set(meta):
            raise ValueError(
                f"{name} v{mv.version} has no ranker metadata; it was not logged by "
                "models.train (train it with `home-mixer train`)"
            )
        kind = meta["ranker"]
        loader = LOADERS.get(kind)
        if loader is None:
            raise ValueError(f"{name} v{mv.version}: unknown ranker kind {kind!r} (known: {sorted(LOADERS)}); "
                             "re-train it with `home-mixer train`")
        if loader.flavor not in (mlmodel.flavors or {}):
            raise ValueError(f"{name} v{mv.version} is a {kind} ranker but was logged without the "
                             f"{loader.flavor!r} flavour (has {sorted(mlmodel.flavors or {})}); "
                             "re-train it with `home-mixer train`")
        model = loader.load(local)
        program = loader.load_program(local) if with_program and loader.load_program else None
    return RankerHandle(
        name=name, alias=alias, version=mv.version, run_id=mv.run_id,
        feature_names=tuple(meta["feature_names"]), heads=tuple(meta["heads"]),
        kind=kind, model=model, program=program,
    )


def with_compiled_light(handle: RankerHandle, cache_dir: Path,
                        check_rows: pd.DataFrame | None = None) -> RankerHandle:
    """``handle`` scoring with its LightGBM model compiled by lleaves (``models.compiled_light``),
    checked against LightGBM at load; ``handle`` unchanged (LightGBM scores, a warning is logged)
    when lleaves is missing, compiling fails or the check finds a difference > 1e-6.

    Args:
        handle: a light ranker (``kind == "light"``).
        cache_dir: where compiled models are kept (``StateDir.compiled_models``); the file is keyed
            by the model's hash and named after ``<name>-v<version>``, so a restart reuses it.
        check_rows: real feature rows (any frame with the handle's ``feature_names``, NaN allowed)
            added to the model's threshold rows of the equality check; None: threshold rows only.

    Raises:
        ValueError: ``handle`` is not a light ranker.
    """
    from models.compiled_light import compile_or_none

    if handle.kind != "light":
        raise ValueError(f"{handle.name} v{handle.version} is a {handle.kind} ranker; only the light ranker compiles")
    rows = None
    if check_rows is not None and len(check_rows):
        rows = feature_matrix(check_rows, handle.feature_names)
    compiled = compile_or_none(handle.model, cache_dir, f"{handle.name}-v{handle.version}", rows)
    return handle if compiled is None else dataclasses.replace(handle, compiled=compiled)


def load_ranker(name: str, alias: str = CHAMPION_ALIAS, tracking_uri: str | None = None) -> RankerHandle:
    """Load the version that ``alias`` of registered model ``name`` points at.

    The alias is resolved once (:func:`alias_version`), then that version is loaded through
    :func:`load_ranker_version`, so an alias moving meanwhile cannot mix two versions.

    Args:
        name: ``schema.LIGHT_RANKER_NAME`` or ``schema.HEAVY_RANKER_NAME`` (any registered ranker).
        alias: registry alias, default ``"champion"``.
        tracking_uri: MLflow URI; default ``StateDir.from_env().mlflow_tracking_uri``.

    Returns:
        :class:`RankerHandle` (model held in memory; the downloaded files are removed).

    Raises:
        RankerNotFoundError: no store, no registered model ``name``, or no such alias; the message
            says to run ``home-mixer train`` first.
        ValueError: the model version was not logged by ``models.registry`` (no ranker metadata).
    """
    uri = _resolve_uri(tracking_uri)
    return load_ranker_version(name, alias_version(name, alias, uri), uri, alias=alias)


# ---------------------------------------------------------------- the two-tower retrieval model
#
# The third registered model (``schema.TWO_TOWER_NAME``) is logged as an MLflow pyfunc model with a
# custom loader module (this one: :func:`_load_pyfunc`), so nothing is pickled. Its data folder
# holds every artifact retrieval needs, all artifacts of the registered version:
#   towers/      ``TwoTowerFit.save``: weights.pt (state dict), config.json, vocab.npz
#   embeddings/  item_ids.npy (int64 [N]) and item_vectors.npy (float32 [N, D]): the catalogue's
#                candidate embeddings the index was built from
#   index/       ``AnnIndex.save``: index.faiss, ids.npy, ann.json
# ``MLmodel`` metadata: ``{"retrieval": "two_tower", "dim", "items", "index_kind"}``.

TWO_TOWER_REQUIREMENTS: tuple[str, ...] = ("torch", "faiss-cpu", "numpy", "pandas")
TWO_TOWER_DATA = "two_tower"


def _two_tower_hint() -> str:
    return "train it with models.train.train_two_tower (it registers the model and sets the champion alias)"


def _with_two_tower_hint(lookup, *args):
    """``lookup(*args)``; a ``RankerNotFoundError`` gains how to train the two-tower model."""
    try:
        return lookup(*args)
    except RankerNotFoundError as e:
        raise RankerNotFoundError(f"{e}; for the two-tower model: {_two_tower_hint()}") from None


def log_two_tower_model(fit, item_ids: np.ndarray, item_vectors: np.ndarray, index,
                        registered_name: str | None):
    """Log a two-tower model with its candidate embeddings and ANN index to the active run.

    Must run inside :func:`mlflow_uris` with an active run (``name="model"``, pyfunc flavour,
    loader :func:`_load_pyfunc`); registered as ``registered_name`` when given.

    Args:
        fit: ``models.two_tower.TwoTowerFit``.
        item_ids: int64 ``[N]`` post ids; item_vectors: float32 ``[N, D]`` their item-tower vectors.
        index: ``models.ann_index.AnnIndex`` built from them.

    Returns:
        MLflow's ``ModelInfo`` (``registered_model_version`` set when registered).

    Raises:
        ValueError: ids, vectors and index disagree (count, dimension or id set).
    """
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    ids = np.asarray(item_ids, dtype=np.int64)
    vectors = np.asarray(item_vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(ids) != len(vectors) or vectors.shape[1] != fit.dim or index.dim != fit.dim \
            or index.ntotal != len(ids) or not np.array_equal(np.sort(index.ids), np.sort(ids)):
        raise ValueError(f"item ids {ids.shape}, vectors {vectors.shape}, index {index.ntotal} x {index.dim} "
                         f"and model dim {fit.dim} disagree: build the index from these embeddings")
    with tempfile.TemporaryDirectory(prefix="home-mixer-two-tower-") as tmp:
        data = Path(tmp) / TWO_TOWER_DATA
        fit.save(data / "towers")
        (data / "embeddings").mkdir(parents=True)
        np.save(data / "embeddings" / "item_ids.npy", ids)
        np.save(data / "embeddings" / "item_vectors.npy", vectors)
        index.save(data / "index")
        return mlflow.pyfunc.log_model(
            name="model",
            loader_module="models.registry",
            data_path=str(data),
            pip_requirements=pinned_requirements(TWO_TOWER_REQUIREMENTS),
            # no input schema (a column of variable-length (post, author, action) lists); the
            # retrieval depth is an inference parameter
            signature=ModelSignature(inputs=None, params=ParamSchema([ParamSpec("k", "long", 100)])),
            metadata={"retrieval": "two_tower", "dim": int(fit.dim), "items": int(len(ids)),
                      "index_kind": index.kind},
            registered_model_name=registered_name,
        )


@dataclass(frozen=True)
class TwoTowerHandle:
    """A registered two-tower version in memory: user tower, candidate embeddings, ANN index.

    Attributes:
        name / alias / version / run_id: as :class:`RankerHandle` (alias "" if loaded by version).
        model: the ``models.two_tower.TwoTowerFit`` (both towers).
        index: the ``models.ann_index.AnnIndex`` over the candidate embeddings.
        item_ids: int64 ``[N]``; item_vectors: float32 ``[N, D]``: the candidate embeddings.
    """

    name: str
    alias: str
    version: int
    run_id: str
    model: Any = field(repr=False)
    index: Any = field(repr=False)
    item_ids: np.ndarray = field(repr=False)
    item_vectors: np.ndarray = field(repr=False)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.model.dim)

    def user_embeddings(self, sequences) -> np.ndarray:
        """User vectors float32 ``[B, D]`` of request-time action sequences
        (``TwoTowerFit.user_embeddings``: per user ``[(post_id, author_id, action), ...]``, newest first)."""
        return self.model.user_embeddings(sequences)

    def search(self, user_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest candidates of each user vector: ``(post ids int64 [Q, k], scores
        float32 [Q, k])``, -1 / -inf padded (``AnnIndex.search``; its errors)."""
        return self.index.search(user_vectors, k)

    def retrieve(self, sequences, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``search(user_embeddings(sequences), k)``."""
        return self.search(self.user_embeddings(sequences), k)


def _read_two_tower(data: Path) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """(fit, index, item_ids, item_vectors) from a two-tower data folder (layout above)."""
    from models.ann_index import AnnIndex
    from models.two_tower import TwoTowerFit

    fit = TwoTowerFit.load(data / "towers")
    index = AnnIndex.load(data / "index")
    ids = np.load(data / "embeddings" / "item_ids.npy").astype(np.int64, copy=False)
    vectors = np.load(data / "embeddings" / "item_vectors.npy").astype(np.float32, copy=False)
    if vectors.shape != (len(ids), fit.dim) or index.dim != fit.dim or index.ntotal != len(ids):
        raise ValueError(f"{data}: embeddings {vectors.shape}, index {index.ntotal} x {index.dim}, model dim "
                         f"{fit.dim} disagree; {_two_tower_hint()}")
    return fit, index, ids, vectors


class _TwoTowerPyfunc:
    """What ``mlflow.pyfunc.load_model`` returns for a two-tower version (via :func:`_load_pyfunc`).

    ``predict(model_input, params={"k": 100})``: ``model_input`` is a DataFrame with a column
    ``action_sequence`` (per row a list of ``(post_id, author_id, action)``, newest first) or such
    a list of sequences; returns a DataFrame with ``post_ids`` and ``scores`` (lists of length k).
    """

    def __init__(self, fit, index):
        self.fit = fit
        self.index = index

    def predict(self, model_input, params: dict | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 100))
        seqs = list(model_input["action_sequence"]) if isinstance(model_input, pd.DataFrame) else list(model_input)
        ids, scores = self.index.search(self.fit.user_embeddings([[tuple(e) for e in s] for s in seqs]), k)
        return pd.DataFrame({"post_ids": list(ids), "scores": list(scores)})


def _load_pyfunc(data_path: str) -> _TwoTowerPyfunc:
    """MLflow pyfunc loader of the two-tower model (``loader_module="models.registry"``)."""
    fit, index, _, _ = _read_two_tower(Path(data_path))
    return _TwoTowerPyfunc(fit, index)


def load_two_tower_version(version: int, tracking_uri: str | None = None, *, name: str | None = None,
                           alias: str = "") -> TwoTowerHandle:
    """Load version ``version`` of the registered two-tower model (default ``schema.TWO_TOWER_NAME``).

    Downloads ``models:/<name>/<version>`` to a temporary folder, reads the towers, candidate
    embeddings and FAISS index into memory, and removes the files.

    Raises:
        RankerNotFoundError: no store, registered model or version.
        ValueError: the version is not a two-tower model logged by :func:`log_two_tower_model`,
            or its artifacts disagree.
    """
    from mlflow.models import Model

    from core.schema import TWO_TOWER_NAME

    name = name or TWO_TOWER_NAME
    uri = _resolve_uri(tracking_uri)
    mv = _with_two_tower_hint(registered_version, name, version, uri)
    with tempfile.TemporaryDirectory(prefix="home-mixer-two-tower-") as tmp:
        local = download_version(name, mv.version, Path(tmp), uri)
        meta = Model.load(str(local)).metadata or {}
        if meta.get("retrieval") != "two_tower":
            raise ValueError(f"{name} v{mv.version} is not a two-tower model (metadata {meta}); {_two_tower_hint()}")
        found = [p for p in local.rglob(TWO_TOWER_DATA) if p.is_dir() and (p / "towers").is_dir()]
        if not found:
            raise ValueError(f"{name} v{mv.version} has no {TWO_TOWER_DATA}/ data folder; {_two_tower_hint()}")
        fit, index, ids, vectors = _read_two_tower(found[0])
    return TwoTowerHandle(name=name, alias=alias, version=mv.version, run_id=mv.run_id, model=fit, index=index,
                          item_ids=ids, item_vectors=vectors)


def load_two_tower(tracking_uri: str | None = None, alias: str = CHAMPION_ALIAS, *,
                   name: str | None = None) -> TwoTowerHandle:
    """Load the two-tower version that ``alias`` points at (resolved once, as :func:`load_ranker`).

    Args:
        tracking_uri: MLflow URI; default ``StateDir.from_env().mlflow_tracking_uri``.
        alias: registry alias, default ``"champion"``.
        name: registered model name, default ``schema.TWO_TOWER_NAME``.

    Returns:
        :class:`TwoTowerHandle` (``.version``, ``.user_embeddings``, ``.index``, ``.search``).

    Raises:
        RankerNotFoundError: no store, registered model or alias (the message says how to train it).
        ValueError: the version is not a two-tower model.
    """
    from core.schema import TWO_TOWER_NAME

    name = name or TWO_TOWER_NAME
    uri = _resolve_uri(tracking_uri)
    version = _with_two_tower_hint(alias_version, name, alias, uri)
    return load_two_tower_version(version, uri, name=name, alias=alias)
