"""The light ranker compiled to machine code with lleaves (LLVM), cached on disk per model.

lleaves turns a LightGBM text model into one native function (LLVM IR -> object code for this
CPU); a 1,000-row batch then scores in about a sixth of LightGBM's time on one thread. Compiling
takes seconds (about 1 s for 20 trees, 11 s for 200 on this machine), so it happens once per model:
the object code is kept in ``<state>/compiled/`` under a name keyed by the model's hash, and every
later load (a mixer restart, a second worker, an alias rollback) reads it back in milliseconds.

Scoring must stay what LightGBM computes: the compiled function is checked against
``booster.predict`` once per load, on rows built to sit on every split threshold of the model (and
its neighbours, zero and NaN) plus any real rows the caller has. A difference above
:data:`MAX_ABS_DIFF` rejects it; :func:`compile_or_none` then logs a warning and the caller keeps
LightGBM. Sources: lleaves (https://github.com/siboehm/lleaves), LightGBM's model text format.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# the equality bound of issue 23 (probabilities; lleaves and LightGBM both sum in float64)
MAX_ABS_DIFF = 1e-6
# rows of the load-time check built from the model's thresholds (enough for every threshold of a
# 200-tree, 31-leaf model: ~6,000 splits over 17 features)
BOUNDARY_ROWS = 4096
# bump when the cached file's meaning changes (compile options below)
CACHE_FORMAT = "lleaves-fp64-v1"


class CompileError(RuntimeError):
    """lleaves could not compile the model, or load its cached object code."""


class CompiledMismatchError(CompileError):
    """The compiled model's scores differ from LightGBM's by more than :data:`MAX_ABS_DIFF`."""


def model_text(booster) -> str:
    """LightGBM's text model of ``booster`` cut at ``best_iteration`` (the trees
    ``models.light_ranker.predict_booster`` uses)."""
    return booster.model_to_string(num_iteration=booster.best_iteration or None)


def cache_key(text: str) -> str:
    """sha256 (hex) of the model text and of what the object code depends on: the lleaves and
    llvmlite versions and this CPU's name and features (the code is built for the host CPU, so a
    state folder moved to another machine compiles anew instead of running foreign instructions)."""
    from importlib.metadata import version

    import llvmlite.binding as llvm

    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:  # LLVM cannot read the features on some hosts; lleaves then uses none
        features = ""
    h = hashlib.sha256()
    for part in (CACHE_FORMAT, version("lleaves"), version("llvmlite"), llvm.get_host_cpu_name(), features, text):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class CompiledLightRanker:
    """A LightGBM model compiled by lleaves.

    Attributes:
        model: the compiled ``lleaves.Model``.
        path: its object code in the cache folder.
        key: :func:`cache_key` of the model.
        from_cache: True when this load read ``path`` instead of compiling.
        max_abs_diff: the largest difference to LightGBM seen by the load-time check (NaN if unchecked).
        engine: ``"lleaves"`` (``models.registry.RankerHandle.engine`` reports it).
    """

    model: Any
    path: Path
    key: str
    from_cache: bool
    max_abs_diff: float = float("nan")
    engine: str = "lleaves"

    def predict(self, x: np.ndarray, n_jobs: int = 1) -> np.ndarray:
        """Probabilities (or the objective's transform of the raw score, as ``booster.predict``)
        of ``x`` (float32 or float64 ``[N, F]``, NaN = missing) as ``float32 [N, classes]``, on
        ``n_jobs`` threads (1: the calling thread; lleaves releases the GIL while it scores).

        Raises:
            ValueError: ``x`` is not ``[N, F]`` with the model's F.
        """
        if len(x) == 0:
            return np.zeros((0, self.model.num_model_per_iteration()), dtype=np.float32)
        out = self.model.predict(x, n_jobs=max(1, int(n_jobs)))
        return np.asarray(out, dtype=np.float32).reshape(len(x), -1)


def _split_values(node: dict, numeric: dict[int, set[float]], categorical: dict[int, set[float]]) -> None:
    """Collect every split value of one tree of ``booster.dump_model()`` per feature index."""
    stack = [node]
    while stack:
        n = stack.pop()
        if "split_feature" not in n:
            continue
        f = int(n["split_feature"])
        if n.get("decision_type") == "==":  # categorical: "1||4||7", the categories sent left
            categorical.setdefault(f, set()).update(float(c) for c in str(n["threshold"]).split("||"))
        else:
            numeric.setdefault(f, set()).add(float(n["threshold"]))
        stack.extend((n["left_child"], n["right_child"]))


def _candidates(numeric: set[float], categorical: set[float]) -> np.ndarray:
    """One feature's values of :func:`boundary_rows` (float32, finite or NaN)."""
    with np.errstate(over="ignore"):  # thresholds past float32's range become inf, dropped below
        t = np.array(sorted(numeric), dtype=np.float32)
    t = np.concatenate([t, np.nextafter(t, np.float32(-np.inf)), np.nextafter(t, np.float32(np.inf))])
    # Left out: tiny thresholds (0 < |x| <= 1e-30), around the edge of LightGBM's zero band
    # (kZeroThreshold = 1e-35): an input of exactly -1e-35 is zero to LightGBM, not to lleaves 1.3
    # (found by this check). Features are counts, rates and times, never that small; 0, -0 and
    # the band's inside (1e-36) stay.
    t = t[np.isfinite(t) & ((t == 0) | (np.abs(t) > 1e-30))]
    # categorical inputs are integer codes: the split's codes, an unseen one and -1
    cats = np.array(sorted(categorical), dtype=np.float32)
    unseen = np.array([cats.max() + 1, -1.0] if len(cats) else [], dtype=np.float32)
    extra = np.array([0.0, -0.0, 1e-36, np.nan], dtype=np.float32)
    return np.concatenate([t, cats, unseen, extra])


def boundary_rows(booster, limit: int = BOUNDARY_ROWS, seed: int = 0) -> np.ndarray:
    """Rows that put every feature on and next to each of its split values: ``float32 [R, F]``,
    R <= ``limit``.

    Per numeric feature the candidates are each threshold rounded to float32 and the float32 just
    below and above it (where ``<=`` flips, and where float32 inputs meet float64 thresholds), 0,
    -0, 1e-36 (inside LightGBM's zero band for ``missing_type=Zero``) and NaN; per categorical
    feature its split categories, an unseen one, -1 and NaN. Each column cycles through its own
    candidates in a seeded random order, so the columns' combinations vary across rows.
    """
    dump = booster.dump_model(num_iteration=booster.best_iteration or None)
    n_features = int(dump["max_feature_idx"]) + 1
    numeric: dict[int, set[float]] = {}
    categorical: dict[int, set[float]] = {}
    for tree in dump["tree_info"]:
        _split_values(tree["tree_structure"], numeric, categorical)
    rng = np.random.default_rng(seed)
    columns = [rng.permutation(_candidates(numeric.get(f, set()), categorical.get(f, set())))
               for f in range(n_features)]
    rows = min(limit, max(len(c) for c in columns))
    x = np.empty((rows, n_features), dtype=np.float32)
    for f, c in enumerate(columns):
        x[:, f] = np.resize(c, rows)  # shorter columns repeat
    return x


def max_abs_diff(compiled: CompiledLightRanker, booster, rows: np.ndarray) -> float:
    """Largest ``|compiled - booster.predict|`` over ``rows`` (float ``[N, F]``); NaN scores on
    both sides count as equal, a NaN on one side as infinitely different."""
    from models.light_ranker import predict_booster

    ours = compiled.predict(rows).astype(np.float64)
    theirs = predict_booster(booster, np.asarray(rows, dtype=np.float32)).astype(np.float64)
    both_nan = np.isnan(ours) & np.isnan(theirs)
    diff = np.where(both_nan, 0.0, np.abs(ours - theirs))
    return float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))


def _digest_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".sha256")


def _verified(cache: Path) -> bool:
    """True when ``cache`` and its digest file exist and agree. LLVM aborts the whole process on a
    damaged object file (no exception to catch), so no byte of an unverified file reaches it."""
    try:
        return hashlib.sha256(cache.read_bytes()).hexdigest() == _digest_path(cache).read_text().strip()
    except OSError:
        return False


def _replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it: a reader (another
    worker loading the same model) sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(text_file: Path, cache: Path) -> tuple[Any, bool]:
    """An ``lleaves.Model`` of ``text_file``, compiled; its object code read from ``cache`` when
    that file is verified (:func:`_verified`), else compiled and written there with its digest.
    Returns (model, read from cache)."""
    import lleaves

    model = lleaves.Model(model_file=str(text_file))
    if _verified(cache):
        model.compile(cache=str(cache))
        return model, True
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".compile-") as tmp:
        fresh = Path(tmp) / "model.o"  # lleaves writes its object code only where no file is
        model.compile(cache=str(fresh))
        code = fresh.read_bytes()
    _replace_atomically(cache, code)
    _replace_atomically(_digest_path(cache), hashlib.sha256(code).hexdigest().encode())
    return model, False


def compile_light_ranker(booster, cache_dir: Path, label: str) -> CompiledLightRanker:
    """Compile ``booster`` with lleaves, or load its object code from ``cache_dir``.

    Args:
        booster: a ``lightgbm.Booster`` (its ``best_iteration`` trees are compiled).
        cache_dir: the cache folder (``StateDir.compiled_models``), created if missing.
        label: readable prefix of the cached file's name, e.g. ``"light_ranker-v3"``; the file is
            ``<label>-<first 16 hex of cache_key>.o`` (and its ``.o.sha256``), so a retrained
            version never reads another's code.

    Returns:
        :class:`CompiledLightRanker` (unchecked: see :func:`compile_checked`).

    Raises:
        ImportError: lleaves (or llvmlite) is not installed.
        CompileError: compiling failed (a cached file that is damaged or lacks its digest is
            compiled anew, not loaded).
    """
    import lleaves  # noqa: F401  (ImportError here, before any file is written)

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    text = model_text(booster)
    key = cache_key(text)
    path = cache_dir / f"{label}-{key[:16]}.o"
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".model-") as tmp:
        text_file = Path(tmp) / "model.txt"  # lleaves parses a file, also when it loads from cache
        text_file.write_text(text)
        try:
            model, from_cache = _compile(text_file, path)
        except Exception as e:  # LLVM raises RuntimeError, lleaves asserts and ValueErrors
            raise CompileError(f"lleaves could not compile {label}: {type(e).__name__}: {e}") from e
    return CompiledLightRanker(model=model, path=path, key=key, from_cache=from_cache)


def compile_checked(booster, cache_dir: Path, label: str,
                    check_rows: np.ndarray | None = None) -> CompiledLightRanker:
    """:func:`compile_light_ranker`, then the equality check on :func:`boundary_rows` plus
    ``check_rows`` (float ``[N, F]`` real feature rows in model order, optional).

    Returns:
        The compiled model with ``max_abs_diff`` set (<= :data:`MAX_ABS_DIFF`).

    Raises:
        ImportError / CompileError: as :func:`compile_light_ranker`.
        CompiledMismatchError: a score differs by more than :data:`MAX_ABS_DIFF` (the cached file
            is removed: it is no use to the next load either).
    """
    compiled = compile_light_ranker(booster, cache_dir, label)
    rows = boundary_rows(booster)
    if check_rows is not None and len(check_rows):
        rows = np.concatenate([rows, np.asarray(check_rows, dtype=np.float32)])
    diff = max_abs_diff(compiled, booster, rows)
    if not diff <= MAX_ABS_DIFF:
        compiled.path.unlink(missing_ok=True)
        _digest_path(compiled.path).unlink(missing_ok=True)
        raise CompiledMismatchError(f"compiled {label} differs from LightGBM by {diff:.3g} "
                                    f"(> {MAX_ABS_DIFF:g}) on {len(rows)} check rows")
    return CompiledLightRanker(model=compiled.model, path=compiled.path, key=compiled.key,
                               from_cache=compiled.from_cache, max_abs_diff=diff)


def compile_or_none(booster, cache_dir: Path, label: str,
                    check_rows: np.ndarray | None = None) -> CompiledLightRanker | None:
    """:func:`compile_checked`, or None with a warning logged when lleaves is missing, compiling
    fails or the check fails: the caller then scores with LightGBM (same scores, slower)."""
    try:
        compiled = compile_checked(booster, cache_dir, label, check_rows)
    except ImportError as e:
        log.warning("lleaves is not installed (%s); %s scores with LightGBM", e, label)
        return None
    except Exception as e:  # a compiler fault must never stop serving: LightGBM is the same model
        log.warning("compiled light ranker unavailable, %s scores with LightGBM: %s: %s", label,
                    type(e).__name__, e)
        return None
    log.info("%s compiled (%s %s, max |diff| to LightGBM %.2g)", label,
             "loaded from" if compiled.from_cache else "written to", compiled.path, compiled.max_abs_diff)
    return compiled
