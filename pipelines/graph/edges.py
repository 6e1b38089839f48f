"""SNAP-style edge lists: one ``follower followee`` pair per line.

The format of the Stanford Network Analysis Project's graphs (e.g. ``twitter_combined.txt.gz``):
lines starting with ``#`` are comments, blank lines are skipped, an edge is two non-negative
integer ids separated by whitespace (a tab or spaces) meaning "the first follows the second". A
file ending in ``.gz`` is read and written gzipped. The canonical table of the edges is
``follow_graph`` (``FOLLOW_GRAPH_COLUMNS``) in the state folder.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

# The canonical follow graph (parquet, StateDir.table("follow_graph")): the edge user_id -> author_id
# (the follower and the followee, named as the social-edge columns of core.schema), when it was
# loaded (UTC), and where it came from ("snap:<file>", "generated:seed=<s>", "kuairand").
FOLLOW_GRAPH_COLUMNS: tuple[str, ...] = ("user_id", "author_id", "event_ts", "source")


class EdgeListError(ValueError):
    """An edge list line is not ``follower followee``; the message names the file and line."""


def _open_text(path: Path, mode: str):
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8", newline="")
    return open(path, mode, encoding="utf-8", newline="")


def read_edge_list(path: str | Path, progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a SNAP edge list into ``(follower, followee)`` int64 arrays (file order).

    Args:
        path: the file (``.gz``: gzipped).
        progress: called with the number of bytes read (uncompressed) after each chunk of lines.

    Raises:
        FileNotFoundError: no such file.
        EdgeListError: a line that is neither a comment, blank, nor two non-negative integers
            (``"<path>:<line>: ..."`` with the offending text).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"edge list {path} not found")
    src, dst = [], []
    with _open_text(path, "r") as fh:
        line_no = 0
        while True:
            lines = fh.readlines(64 * 1024 * 1024)
            if not lines:
                break
            a, b, nbytes = _parse_lines(lines, path, line_no)
            line_no += len(lines)
            src.append(a)
            dst.append(b)
            if progress is not None:
                progress(nbytes)
    if not src:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(src), np.concatenate(dst)


def _parse_lines(lines: list[str], path: Path, first_line: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Parse a chunk: the fast path hands the non-comment lines to numpy in one call; if numpy
    rejects the chunk, a line-by-line pass finds the first bad line for the error message."""
    body = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    nbytes = sum(len(ln) for ln in lines)
    if not body:
        return np.empty(0, np.int64), np.empty(0, np.int64), nbytes
    try:
        arr = np.loadtxt(io.StringIO("".join(body)), dtype=np.int64, ndmin=2)
        if arr.shape[1] == 2 and (arr >= 0).all():
            return arr[:, 0].copy(), arr[:, 1].copy(), nbytes
    except ValueError:
        pass
    for i, ln in enumerate(lines, start=first_line + 1):
        text = ln.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        ok = len(parts) == 2 and all(p.isdigit() for p in parts)
        if not ok:
            raise EdgeListError(f"{path}:{i}: expected 'follower followee' (two non-negative integer ids), "
                                f"got {text[:120]!r}; fix or remove the line, or start it with '#'")
    raise EdgeListError(f"{path}: lines {first_line + 1}-{first_line + len(lines)} could not be parsed")


def write_edge_list(path: str | Path, follower: np.ndarray, followee: np.ndarray, header: str = "",
                    chunk_edges: int = 2_000_000) -> Path:
    """Write ``follower followee`` lines (tab-separated, SNAP style) with ``header`` as ``#`` comments;
    gzipped (level 1: 30M edges in seconds, not minutes) if ``path`` ends in ``.gz``. Arrow's CSV
    writer formats the ids (numpy's ``savetxt`` formats row by row in Python). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    follower = np.asarray(follower, dtype=np.int64)
    followee = np.asarray(followee, dtype=np.int64)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    opener = (lambda: gzip.open(path, "wb", compresslevel=1)) if path.suffix == ".gz" else (lambda: open(path, "wb"))
    with opener() as fh:
        fh.write("".join(f"# {line}\n" for line in header.splitlines()).encode("utf-8"))
        for start in range(0, follower.size, chunk_edges):
            buf = pa.BufferOutputStream()
            pacsv.write_csv(pa.table({"follower": follower[start:start + chunk_edges],
                                      "followee": followee[start:start + chunk_edges]}), buf, options)
            fh.write(buf.getvalue().to_pybytes())
    return path


def follow_graph_table(follower: np.ndarray, followee: np.ndarray, source: str,
                       event_ts: pd.Timestamp | None = None) -> pa.Table:
    """The canonical ``follow_graph`` table of the edges (Arrow, so 30M edges stay ~0.5 GB):
    ``user_id`` (follower), ``author_id`` (followee) int64, ``event_ts`` timestamp[us, UTC]
    (``event_ts`` or now), ``source`` string (dictionary-encoded: one value for every row)."""
    ts = pd.Timestamp.now(tz="UTC") if event_ts is None else pd.Timestamp(event_ts)
    n = len(follower)
    return pa.Table.from_arrays([
        pa.array(np.asarray(follower, dtype=np.int64)),
        pa.array(np.asarray(followee, dtype=np.int64)),
        pa.array(np.full(n, ts.value // 1000, dtype=np.int64), type=pa.timestamp("us", tz="UTC")),
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([source])),
    ], names=list(FOLLOW_GRAPH_COLUMNS))


def write_follow_graph(state, follower: np.ndarray, followee: np.ndarray, source: str) -> Path:
    """Write the canonical ``follow_graph`` table (``StateDir.table("follow_graph")``, parquet) of the edges."""
    path = state.table("follow_graph")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(follow_graph_table(follower, followee, source), path)
    return path
