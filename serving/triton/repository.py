"""The Triton model repository, built and kept in sync from the MLflow registry.

Layout (one Triton model per ranker, named like the registered model; version folders named by
registry version)::

    <repo>/light_ranker/config.pbtxt               python backend (what the bundled server runs)
    <repo>/light_ranker/config.onnxruntime.pbtxt   onnxruntime backend (production, full Triton)
    <repo>/light_ranker/versions.json              what sync decided: aliases, served versions
    <repo>/light_ranker/1/model.onnx               checked export (serving.export)
    <repo>/light_ranker/1/model.py                 python-backend runner (serving/triton/python_model.py)
    <repo>/heavy_ranker/...
    <repo>/two_tower/1/model.onnx                  the two-tower's user tower (serving.user_tower_export)

``config.pbtxt`` uses the python backend because ``nvidia-pytriton`` ships Triton with that
backend only; ``model.py`` runs the same ``model.onnx`` with onnxruntime. A full Triton build
(NGC image ``nvcr.io/nvidia/tritonserver:<yy.mm>-py3``) has the onnxruntime backend: start it with
``--model-config-name=onnxruntime`` (Triton then reads ``<model>/configs/onnxruntime.pbtxt``, the
same text as ``config.onnxruntime.pbtxt``) and the same version folders are served natively by
onnxruntime, without a Python process per model (``model.py`` is ignored there).

Rollout. ``version_policy`` lists the versions held by the aliases (``champion``, and
``challenger`` if set) plus the most recent formerly served versions (``keep_rollback``, default
1) so that after ``models.registry.promote`` + :func:`sync_repository` + ``TritonServer.load``,
the previous champion still answers requests that name its version: a rollback is a promote back
and another sync + load, with no export and no restart.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from core.schema import CHAMPION_ALIAS, HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
from models.registry import RankerNotFoundError, model_aliases, registered_version
from serving.export import INPUT_NAME, MODEL_FILE, OUTPUT_NAME, ExportResult, export_version

RANKERS: tuple[str, ...] = (LIGHT_RANKER_NAME, HEAVY_RANKER_NAME)
CHALLENGER_ALIAS = "challenger"
SERVED_ALIASES: tuple[str, ...] = (CHAMPION_ALIAS, CHALLENGER_ALIAS)
PYTHON_MODEL_SOURCE = Path(__file__).resolve().parent / "python_model.py"
MANIFEST_FILE = "versions.json"
ONNXRUNTIME_CONFIG = "config.onnxruntime.pbtxt"


@dataclass(frozen=True)
class RepositorySettings:
    """Serving settings written into every ``config.pbtxt``.

    Attributes:
        max_batch_size: largest batch (rows) of one request or one dynamic batch; the mixer
            scores every candidate with the light ranker in one request, so keep it above the
            candidate count (default 16384 rows).
        max_queue_delay_us: how long Triton waits to merge concurrent requests (microseconds).
        instance_count: model instances (processes) per version; 1 on a 2-core machine.
        intra_op_threads: onnxruntime threads per instance (2: a 1000-row light-ranker batch takes
            1.8 ms with 2 threads, 3.2 ms with 1, measured here on 2 cores).
        keep_rollback: formerly served versions kept in ``version_policy`` after an alias moved.
    """

    max_batch_size: int = 16384
    max_queue_delay_us: int = 500
    instance_count: int = 1
    intra_op_threads: int = 2
    keep_rollback: int = 1

    def __post_init__(self):
        for name in ("max_batch_size", "instance_count", "intra_op_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"RepositorySettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0 or self.keep_rollback < 0:
            raise ValueError("RepositorySettings.max_queue_delay_us and keep_rollback must be >= 0")


@dataclass(frozen=True)
class ModelSync:
    """What :func:`sync_repository` did for one model.

    Attributes:
        name: Triton model name = registered model name.
        aliases: ``{alias: version}`` found in the registry (only the served aliases).
        served: versions now listed in ``version_policy`` (ascending).
        exported: the exports this sync wrote (empty if every served version was present).
        n_features / heads: the input width and output heads of the served versions.
    """

    name: str
    aliases: dict[str, int]
    served: tuple[int, ...]
    exported: tuple[ExportResult, ...] = field(default=())
    n_features: int = 0
    heads: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.exported)


# ---------------------------------------------------------------- config.pbtxt


def render_config(name: str, n_features: int, n_heads: int, versions: Sequence[int],
                  settings: RepositorySettings = RepositorySettings(), backend: str = "python") -> str:
    """The text of a Triton ``config.pbtxt`` for one ranker.

    Args:
        name: model name (the folder name).
        n_features / n_heads: widths of ``features [batch, F]`` and ``probabilities [batch, H]``.
        versions: versions for ``version_policy { specific }`` (non-empty).
        backend: ``"python"`` (bundled server) or ``"onnxruntime"`` (full Triton build).

    Raises:
        ValueError: no versions, non-positive widths, or an unknown backend.
    """
    if n_features < 1 or n_heads < 1:
        raise ValueError(f"{name}: widths must be positive, got F={n_features}, H={n_heads}")
    return _render(name, [(INPUT_NAME, "TYPE_FP32", n_features)], [(OUTPUT_NAME, "TYPE_FP32", n_heads)],
                   versions, settings, backend)


def render_user_tower_config(name: str, max_sequence_length: int, dim: int, versions: Sequence[int],
                             settings: RepositorySettings = RepositorySettings(), backend: str = "python") -> str:
    """The text of a Triton ``config.pbtxt`` for a two-tower model's user tower
    (``serving.user_tower_export``: int64 ``post``/``author``/``action`` and float32 ``mask``
    ``[batch, L]`` -> float32 ``user_embedding [batch, D]``). Arguments and errors as
    :func:`render_config`, with L = ``max_sequence_length`` and D = ``dim``."""
    from serving.user_tower_export import INPUT_NAMES, OUTPUT_NAME as USER_OUTPUT

    if max_sequence_length < 1 or dim < 1:
        raise ValueError(f"{name}: widths must be positive, got L={max_sequence_length}, D={dim}")
    inputs = [(n, "TYPE_FP32" if n == "mask" else "TYPE_INT64", max_sequence_length) for n in INPUT_NAMES]
    return _render(name, inputs, [(USER_OUTPUT, "TYPE_FP32", dim)], versions, settings, backend)


def _render(name: str, inputs: Sequence[tuple[str, str, int]], outputs: Sequence[tuple[str, str, int]],
            versions: Sequence[int], settings: RepositorySettings, backend: str) -> str:
    """``config.pbtxt`` text with ``(name, data_type, width)`` inputs / outputs of ``[batch, width]``."""
    if not versions:
        raise ValueError(f"{name}: version_policy needs at least one version")
    if backend == "python":
        header = ("# Python backend running model.onnx with onnxruntime (model.py): what the tritonserver\n"
                  "# bundled in nvidia-pytriton can serve.")
        backend_lines = 'backend: "python"'
        params = {"intra_op_threads": str(settings.intra_op_threads)}
    elif backend == "onnxruntime":
        header = ("# Production variant: the onnxruntime backend of a full Triton build (NGC tritonserver\n"
                  "# image). Start it with --model-config-name=onnxruntime (reads configs/onnxruntime.pbtxt)\n"
                  "# or copy this file over config.pbtxt; model.py is then ignored.")
        backend_lines = 'backend: "onnxruntime"\ndefault_model_filename: "model.onnx"'
        params = {"intra_op_thread_count": str(settings.intra_op_threads), "inter_op_thread_count": "1"}
    else:
        raise ValueError(f"unknown backend {backend!r}: use 'python' or 'onnxruntime'")
    versions_text = ", ".join(str(int(v)) for v in sorted(set(versions)))
    param_text = "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())

    def tensors(specs):
        return ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {w} ] }}' for n, t, w in specs)

    return f"""# Generated by serving.triton.repository from the MLflow registry; do not edit.
{header}
name: "{name}"
{backend_lines}
max_batch_size: {settings.max_batch_size}
input [
{tensors(inputs)}
]
output [
{tensors(outputs)}
]
dynamic_batching {{ max_queue_delay_microseconds: {settings.max_queue_delay_us} }}
instance_group [ {{ kind: KIND_CPU count: {settings.instance_count} }} ]
version_policy: {{ specific: {{ versions: [ {versions_text} ] }} }}
{param_text}
"""


def _write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_configs(model_dir: Path, n_features: int, n_heads: int, versions: Sequence[int],
                  settings: RepositorySettings) -> None:
    """Write ``config.pbtxt`` (python backend) and both onnxruntime variants for one ranker.

    The onnxruntime variant is written twice: ``config.onnxruntime.pbtxt`` (to copy over
    ``config.pbtxt``) and ``configs/onnxruntime.pbtxt`` (Triton's custom-config layout, picked by
    ``tritonserver --model-config-name=onnxruntime``).
    """
    name = model_dir.name
    _write_config_texts(model_dir, lambda backend: render_config(name, n_features, n_heads, versions, settings,
                                                                 backend=backend))


def _write_config_texts(model_dir: Path, render: Callable[[str], str]) -> None:
    """``config.pbtxt`` = ``render("python")``; both onnxruntime files = ``render("onnxruntime")``."""
    _write_text_atomically(model_dir / "config.pbtxt", render("python"))
    ort_text = render("onnxruntime")
    _write_text_atomically(model_dir / ONNXRUNTIME_CONFIG, ort_text)
    _write_text_atomically(model_dir / "configs" / "onnxruntime.pbtxt", ort_text)


# ---------------------------------------------------------------- sync


def registry_aliases(name: str, tracking_uri: str, aliases: Sequence[str] = SERVED_ALIASES) -> dict[str, int]:
    """``{alias: version}`` of registered model ``name`` for the served ``aliases`` that are set
    (read through ``models.registry.model_aliases``).

    Raises:
        RankerNotFoundError: no store or no such model, or ``champion`` is not set.
    """
    found = {a: v for a, v in model_aliases(name, tracking_uri).items() if a in aliases}
    if CHAMPION_ALIAS in aliases and CHAMPION_ALIAS not in found:
        raise RankerNotFoundError(
            f"registered model {name!r} has no alias {CHAMPION_ALIAS!r}: run `home-mixer train` or "
            f"`home-mixer models promote --version N`")
    return found


def read_manifest(model_dir: Path) -> dict:
    """The model's ``versions.json`` (``{}`` if absent): aliases, served versions, F, heads."""
    path = Path(model_dir) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _export_present(version_dir: Path, name: str, version: int, tracking_uri: str) -> bool:
    """True if ``version_dir/model.onnx`` is this registry's ``name`` v``version`` (same run id)."""
    path = version_dir / MODEL_FILE
    if not path.exists():
        return False
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    run_id = registered_version(name, version, tracking_uri).run_id
    return props.get("registered_model") == name and props.get("version") == str(version) and props.get("run_id") == run_id


def _served_versions(model_dir: Path, found: dict[str, int], keep_rollback: int) -> list[int]:
    """The aliased versions plus the newest ``keep_rollback`` formerly served ones, ascending."""
    aliased = set(found.values())
    previous = [int(v) for v in read_manifest(model_dir).get("served", []) if int(v) not in aliased]
    return sorted(aliased | set(sorted(previous, reverse=True)[:keep_rollback]))


def _export_missing(name: str, tracking_uri: str, model_dir: Path, found: dict[str, int], served: Sequence[int],
                    export: Callable[..., ExportResult], check) -> list[ExportResult]:
    """``export(name, version, tracking_uri, version_dir, check data, alias=...)`` each served
    version whose folder lacks this registry's export, and put the python-backend runner beside
    every one. ``check`` is the check data or a zero-argument callable, called once, only if
    something must be exported."""
    exported, data = [], None
    for version in served:
        version_dir = model_dir / str(version)
        if not _export_present(version_dir, name, version, tracking_uri):
            if data is None:
                data = check() if callable(check) else check
            alias = next((a for a, v in found.items() if v == version), None)
            exported.append(export(name, version, tracking_uri, version_dir, data, alias=alias))
        shutil.copyfile(PYTHON_MODEL_SOURCE, version_dir / "model.py")
    return exported


def _served_shape(name: str, model_dir: Path, served: Sequence[int], shape: Callable[[dict], tuple]) -> tuple:
    """``shape(metadata_props)`` of the newest served export; every served version must agree (one
    config per model).

    Raises:
        ValueError: the served versions disagree.
    """
    import onnx

    shapes = {}
    for version in served:
        props = {p.key: p.value for p in
                 onnx.load(str(model_dir / str(version) / MODEL_FILE), load_external_data=False).metadata_props}
        shapes[version] = shape(props)
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"{name}: served versions disagree on inputs/outputs {shapes}; one Triton model has one "
            "config, so serve them under different aliases only if they share inputs and outputs "
            "(or set keep_rollback=0 to drop the older one)")
    return shapes[served[-1]]


def sync_model(name: str, tracking_uri: str, repo_dir: Path,
               check_rows: pd.DataFrame | Callable[[], pd.DataFrame],
               settings: RepositorySettings = RepositorySettings(),
               aliases: Sequence[str] = SERVED_ALIASES) -> ModelSync:
    """Bring one ranker of the repository in line with the registry's aliases (see module doc)."""
    model_dir = Path(repo_dir) / name
    found = registry_aliases(name, tracking_uri, aliases)
    served = _served_versions(model_dir, found, settings.keep_rollback)
    exported = _export_missing(name, tracking_uri, model_dir, found, served, export_version, check_rows)
    n_features, heads = _served_shape(name, model_dir, served, lambda props: (
        len(json.loads(props["feature_names"])), tuple(json.loads(props["heads"]))))
    write_configs(model_dir, n_features, len(heads), served, settings)
    _write_text_atomically(model_dir / MANIFEST_FILE, json.dumps(
        {"registered_model": name, "aliases": found, "served": served,
         "n_features": n_features, "heads": list(heads)}, indent=1) + "\n")
    return ModelSync(name, found, tuple(served), tuple(exported), n_features, heads)


def sync_user_tower(name: str, tracking_uri: str, repo_dir: Path,
                    check_sequences: Sequence | Callable[[], Sequence],
                    settings: RepositorySettings = RepositorySettings(),
                    aliases: Sequence[str] = SERVED_ALIASES) -> ModelSync:
    """Bring the user tower of the registered two-tower model ``name`` in line with the registry's
    aliases, as :func:`sync_model` does for a ranker: one Triton model named ``name`` whose version
    folders hold each served version's checked user-tower export (``serving.user_tower_export``).

    Args:
        check_sequences: real action sequences for the export check
            (``serving.user_tower_export.validation_sequences``), or a zero-argument callable that
            returns them (called only if something must be exported).
        Others as :func:`sync_repository`.

    Returns:
        :class:`ModelSync` (``n_features`` = L, the padded sequence length; ``heads`` empty).

    Raises:
        RankerNotFoundError: no such model or no champion alias.
        ExportMismatchError / ExportError: an export failed its check (nothing of it is written).
    """
    from serving.user_tower_export import export_user_tower_version

    model_dir = Path(repo_dir) / name
    found = registry_aliases(name, tracking_uri, aliases)
    served = _served_versions(model_dir, found, settings.keep_rollback)
    exported = _export_missing(name, tracking_uri, model_dir, found, served, export_user_tower_version,
                               check_sequences)
    length, dim = _served_shape(name, model_dir, served, lambda props: (
        int(props["max_sequence_length"]), int(props["dim"])))
    _write_config_texts(model_dir, lambda backend: render_user_tower_config(name, length, dim, served, settings,
                                                                            backend=backend))
    _write_text_atomically(model_dir / MANIFEST_FILE, json.dumps(
        {"registered_model": name, "part": "user_tower", "aliases": found, "served": served,
         "max_sequence_length": length, "dim": dim}, indent=1) + "\n")
    return ModelSync(name, found, tuple(served), tuple(exported), length, ())


def sync_repository(tracking_uri: str, repo_dir: Path,
                    check_rows: pd.DataFrame | Callable[[], pd.DataFrame],
                    models: Sequence[str] = RANKERS,
                    settings: RepositorySettings = RepositorySettings(),
                    aliases: Sequence[str] = SERVED_ALIASES) -> dict[str, ModelSync]:
    """Export every aliased version missing from ``repo_dir`` and rewrite ``version_policy``.

    The first call builds the repository; later calls (after ``models.registry.promote``) add the
    new versions. Follow with ``TritonServer.load(name)`` for each model whose versions changed:
    Triton re-reads ``config.pbtxt`` and serves the new set without a restart.

    Args:
        tracking_uri: MLflow URI of the registry.
        repo_dir: the Triton model repository folder (created if missing).
        check_rows: real validation rows for the export check (or a zero-argument callable that
            returns them, called only if something must be exported).
        models: registered model names to serve (default both rankers).
        settings: ``config.pbtxt`` settings.
        aliases: the aliases whose versions are served (default champion and challenger).

    Returns:
        ``{model name: ModelSync}``.

    Raises:
        RankerNotFoundError: a model or its champion alias is missing.
        ExportMismatchError / ExportError: an export failed its check (nothing of that version is
            written, and the config keeps its previous versions).
    """
    Path(repo_dir).mkdir(parents=True, exist_ok=True)
    return {name: sync_model(name, tracking_uri, Path(repo_dir), check_rows, settings, aliases) for name in models}
