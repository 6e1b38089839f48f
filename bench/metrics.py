"""Offline metrics at evaluation size: ``models.metrics`` GAUC and NDCG@10 against scikit-learn
applied group by group (the peer a per-user loop would be).

Synthetic rows of KuaiRand's shape: ``--rows`` impressions over ``--groups`` users (about 5 rows
each, as a validation day has), 10 % positives. Checks both give the same value first, then prints
seconds per call and the ratio. Evaluation computes these for 7 heads on every split.

    .venv/bin/python bench/metrics.py [--rows 40000] [--groups 8000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import ndcg_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import metrics as M  # noqa: E402


def _peer_gauc(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> float:
    num = den = 0.0
    for _, idx in pd.Series(np.arange(len(y))).groupby(groups):
        yy = y[idx.to_numpy()]
        if 0 < yy.sum() < len(yy):
            num += len(yy) * roc_auc_score(yy, p[idx.to_numpy()])
            den += len(yy)
    return num / den


def _peer_ndcg(gain: np.ndarray, p: np.ndarray, groups: np.ndarray, k: int) -> float:
    vals = []
    for _, idx in pd.Series(np.arange(len(gain))).groupby(groups):
        i = idx.to_numpy()
        if gain[i].sum() > 0:  # sklearn refuses one document; its NDCG is 1 by definition
            vals.append(ndcg_score(gain[i][None], p[i][None], k=k) if len(i) > 1 else 1.0)
    return float(np.mean(vals))


def _seconds(fn) -> tuple[float, float]:
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--groups", type=int, default=8_000)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    groups = rng.integers(0, args.groups, args.rows)
    y = (rng.random(args.rows) < 0.1).astype(int)
    p = rng.random(args.rows)
    gain = y * 3.0

    rows = []
    for name, ours, peer in (
            ("GAUC", lambda: M.gauc(y, p, groups), lambda: _peer_gauc(y, p, groups)),
            ("NDCG@10", lambda: M.ndcg_at_k(gain, p, groups, k=10), lambda: _peer_ndcg(gain, p, groups, 10))):
        t_ours, v_ours = _seconds(ours)
        t_peer, v_peer = _seconds(peer)
        rows.append((name, t_ours, t_peer, v_ours, v_peer))
    print(f"{args.rows} rows over {args.groups} groups, one call each, s:")
    for name, t_ours, t_peer, v_ours, v_peer in rows:
        print(f"  {name:8s} models.metrics {t_ours:7.3f}   sklearn per group {t_peer:7.3f}   "
              f"ratio {t_peer / t_ours:6.0f}x   values {v_ours:.6f} / {v_peer:.6f}")


if __name__ == "__main__":
    main()
