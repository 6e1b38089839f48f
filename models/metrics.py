"""Ranking and calibration metrics, vectorised with numpy/pandas (no Python loop over users).

Every function takes 1-D arrays of equal length: ``y`` labels in {0, 1}, ``p`` scores or
probabilities (finite floats), ``groups`` a per-row group key (the user id). A metric that is
undefined on its input (one class only, no eligible user) returns ``nan`` rather than raising,
so a report over rare heads (a day without a ``forward``) still renders; malformed input raises
``ValueError`` saying what was wrong.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _as_1d(name: str, a, n: int | None = None) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} rows but the labels have {n}")
    return arr


def _labels(y) -> np.ndarray:
    y = _as_1d("y", y)
    yf = y.astype(np.float64)
    if len(yf) and not np.isin(yf, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1 (binary); got other values")
    return yf


def _scores(p, n: int) -> np.ndarray:
    p = _as_1d("p", p, n).astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError("scores must be finite numbers (no NaN/inf); impute or drop those rows first")
    return p


def _group_codes(groups, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, keys)``: each row's group index 0..G-1 and the G group keys in first-seen order."""
    g = _as_1d("groups", groups, n)
    codes, uniques = pd.factorize(g, sort=False)
    if (codes < 0).any():
        raise ValueError("groups must not contain missing values")
    return codes, uniques


def auc(y, p) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    AUC = (sum of ranks of positives - n_pos (n_pos + 1) / 2) / (n_pos n_neg), ranks 1-based with
    ties given their average rank (Hanley & McNeil 1982). Equals ``sklearn.metrics.roc_auc_score``.

    Returns:
        float in [0, 1]; ``nan`` when ``y`` holds a single class (AUC is undefined).
    """
    y = _labels(y)
    p = _scores(p, len(y))
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(p).rank(method="average").to_numpy()
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def group_aucs(y, p, groups) -> pd.DataFrame:
    """Per-group AUC of the groups that have both a positive and a negative row.

    Ranks within each group with ties given their average rank, so a group whose scores are all
    equal (a feature shared by every row of a request) has AUC 0.5 exactly.

    Args:
        y: labels in {0, 1}; p: finite scores; groups: group key per row (user or request id).

    Returns:
        DataFrame indexed by group key with ``n`` (rows, float64), ``positives`` (float64) and
        ``auc`` (float64 in [0, 1]); empty when no group has both classes.
    """
    y = _labels(y)
    p = _scores(p, len(y))
    codes, uniques = _group_codes(groups, len(y))
    if len(y) == 0:
        return pd.DataFrame({"n": [], "positives": [], "auc": []}, dtype=np.float64)
    ranks = pd.Series(p).groupby(codes).rank(method="average").to_numpy()
    n = np.bincount(codes).astype(np.float64)
    pos = np.bincount(codes, weights=y)
    neg = n - pos
    rank_sum_pos = np.bincount(codes, weights=ranks * y)
    ok = (pos > 0) & (neg > 0)
    auc_g = (rank_sum_pos[ok] - pos[ok] * (pos[ok] + 1) / 2) / (pos[ok] * neg[ok])
    return pd.DataFrame({"n": n[ok], "positives": pos[ok], "auc": auc_g}, index=pd.Index(uniques[ok], name="group"))


def gauc(y, p, groups) -> float:
    """Group AUC: per-group AUC averaged over groups, weighted by their impression count.

    GAUC = sum_g n_g AUC_g / sum_g n_g over groups g (users, or requests) having both a positive
    and a negative row, n_g = the group's row (impression) count. Definition of Zhou et al. 2018,
    "Deep Interest Network for Click-Through Rate Prediction" (KDD), eq. (7) with impression weights.

    Returns:
        float in [0, 1]; ``nan`` when no group has both classes.
    """
    return gauc_of_parts(group_aucs(y, p, groups))


def gauc_of_parts(parts: pd.DataFrame) -> float:
    """GAUC from :func:`group_aucs`' output: ``sum_g n_g AUC_g / sum_g n_g`` (``nan`` if empty)."""
    if parts.empty:
        return float("nan")
    return float(np.sum(parts["n"] * parts["auc"]) / np.sum(parts["n"]))


def groups_with_both_classes(y, groups) -> int:
    """How many groups have both a positive and a negative row (the groups a GAUC can use)."""
    y = _labels(y)
    codes, _ = _group_codes(groups, len(y))
    if len(y) == 0:
        return 0
    n = np.bincount(codes)
    pos = np.bincount(codes, weights=y)
    return int(np.sum((pos > 0) & (pos < n)))


def gauc_interval(y, p, groups, clusters, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0, parts: pd.DataFrame | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`gauc`, resampling whole clusters (users).

    Requests of one user are not independent, so the resampling unit is the user (the cluster
    bootstrap, Field & Welsh 2007, "Bootstrapping clustered data", JRSS-B): each replicate draws
    users with replacement and recomputes GAUC = sum_g n_g AUC_g / sum_g n_g over the drawn
    users' groups (Efron & Tibshirani 1993, percentile interval).

    Args:
        y, p, groups: as :func:`gauc`.
        clusters: cluster key per row (user id); every group must lie inside one cluster.
        n_boot: bootstrap replicates (>= 10); level: interval coverage in (0, 1); seed: RNG seed.
        parts: ``group_aucs(y, p, groups)`` when the caller has it already (not recomputed).

    Returns:
        ``(low, high)``; ``(nan, nan)`` when no group has both classes.

    Raises:
        ValueError: bad ``n_boot`` / ``level``, a group spanning two clusters, malformed input.
    """
    if n_boot < 10 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 10 and 0 < level < 1, got n_boot={n_boot}, level={level}")
    parts = group_aucs(y, p, groups) if parts is None else parts
    if parts.empty:
        return float("nan"), float("nan")
    stats = _cluster_bootstrap(parts, [parts["auc"].to_numpy()], groups, clusters, len(np.asarray(y)),
                               n_boot, seed)[0]
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _cluster_bootstrap(parts: pd.DataFrame, aucs: list[np.ndarray], groups, clusters, n: int,
                       n_boot: int, seed: int) -> list[np.ndarray]:
    """Bootstrap replicates of ``sum n_g auc_g / sum n_g`` for each AUC column in ``aucs`` (aligned
    with ``parts``' groups), all from the same draws of clusters: ``[n_boot]`` arrays (NaN where a
    draw has no eligible group)."""
    g = _as_1d("groups", groups, n)
    c = _as_1d("clusters", clusters, len(g))
    owner = pd.Series(c).groupby(pd.Series(g)).agg(["first", "nunique"])
    if (owner["nunique"] > 1).any():
        raise ValueError("a group spans several clusters: requests must belong to one user")
    cluster_of_group = owner.loc[parts.index, "first"].to_numpy()
    ccodes, _ = pd.factorize(cluster_of_group)
    # Only clusters with an eligible group carry weight; the others are drawn too (they dilute
    # nothing but count in the resample size), so per replicate the number of eligible draws is
    # Binomial(n_clusters, n_eligible / n_clusters) and those draws are uniform over the eligible.
    nc, ne = len(pd.unique(c)), int(ccodes.max()) + 1
    size = parts["n"].to_numpy()
    w = np.bincount(ccodes, weights=size, minlength=ne)
    was = [np.bincount(ccodes, weights=size * a, minlength=ne) for a in aucs]
    rng = np.random.default_rng(seed)
    stats = [np.full(n_boot, np.nan) for _ in aucs]
    for b, k in enumerate(rng.binomial(nc, ne / nc, n_boot)):
        idx = rng.integers(0, ne, k)
        den = w[idx].sum()
        if den > 0:
            for out, wa in zip(stats, was):
                out[b] = wa[idx].sum() / den
    return stats


def gauc_difference_interval(y, p, q, groups, clusters, n_boot: int = 1000, level: float = 0.95,
                             seed: int = 0) -> tuple[float, float, float]:
    """``GAUC(p) - GAUC(q)`` on the same rows and its paired cluster-bootstrap interval.

    Both scores are measured on the same resampled users in every replicate (a paired bootstrap),
    so the interval is of the difference itself, much narrower than comparing two separate
    intervals (Efron & Tibshirani 1993, sec. 16; the cluster resampling of :func:`gauc_interval`).
    "p is better than q" is supported at ``level`` when the low end is above 0.

    Args:
        y, groups, clusters: as :func:`gauc_interval`; p, q: the two scores ``[N]``.

    Returns:
        ``(difference, low, high)``; NaNs when no group has both classes.

    Raises:
        ValueError: as :func:`gauc_interval`.
    """
    if n_boot < 10 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 10 and 0 < level < 1, got n_boot={n_boot}, level={level}")
    parts_p, parts_q = group_aucs(y, p, groups), group_aucs(y, q, groups)
    if parts_p.empty:
        return float("nan"), float("nan"), float("nan")
    parts_q = parts_q.loc[parts_p.index]  # same groups: eligibility depends on the labels only
    bp, bq = _cluster_bootstrap(parts_p, [parts_p["auc"].to_numpy(), parts_q["auc"].to_numpy()],
                                groups, clusters, len(np.asarray(y)), n_boot, seed)
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(bp - bq, [alpha, 1 - alpha])
    return gauc_of_parts(parts_p) - gauc_of_parts(parts_q), float(lo), float(hi)


def log_loss(y, p, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy ``-mean(y log p + (1 - y) log(1 - p))`` in nats.

    ``p`` is clipped to ``[eps, 1 - eps]`` so a confident miss costs ``-log(eps)`` (16.1 nats at
    the default) instead of infinity.

    Raises:
        ValueError: ``p`` lies outside [0, 1], or the input is malformed / empty.
    """
    y = _labels(y)
    p = _scores(p, len(y))
    if len(y) == 0:
        raise ValueError("log_loss of an empty set is undefined")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("log_loss needs probabilities in [0, 1]")
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def expected_calibration_error(y, p, n_bins: int = 15, strategy: str = "equal_mass") -> float:
    """Expected calibration error: sum over bins of (bin share) x |mean label - mean prediction|.

    ECE = sum_b (n_b / N) |mean(y_b) - mean(p_b)| (Naeini, Cooper & Hauskrecht 2015, "Obtaining
    Well Calibrated Probabilities Using Bayesian Binning", AAAI; 15 bins as in Guo et al. 2017).

    Args:
        n_bins: number of bins (default 15).
        strategy: ``"equal_mass"`` (default): rows sorted by ``p`` and cut into ``n_bins`` bins of
            equal size (+-1 row; tied predictions may straddle a cut). Chosen as default because
            rare heads put almost every prediction below 1/15, where equal-width bins would
            collapse to a single bin and hide miscalibration. ``"equal_width"``: bins
            ``[i/n_bins, (i+1)/n_bins)``, the last one closed; empty bins contribute 0.

    Returns:
        float in [0, 1]; ``nan`` for empty input.

    Raises:
        ValueError: unknown ``strategy``, ``n_bins < 1``, ``p`` outside [0, 1], malformed input.
    """
    y = _labels(y)
    p = _scores(p, len(y))
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("expected_calibration_error needs probabilities in [0, 1]")
    n = len(y)
    if n == 0:
        return float("nan")
    if strategy == "equal_mass":
        order = np.argsort(p, kind="stable")
        bins = np.empty(n, dtype=np.int64)
        bins[order] = (np.arange(n) * n_bins) // n
    elif strategy == "equal_width":
        bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    else:
        raise ValueError(f"strategy must be 'equal_mass' or 'equal_width', got {strategy!r}")
    sum_y = np.bincount(bins, weights=y, minlength=n_bins)
    sum_p = np.bincount(bins, weights=p, minlength=n_bins)
    # per bin: (n_b / N) |sum_y/n_b - sum_p/n_b| = |sum_y - sum_p| / N
    return float(np.sum(np.abs(sum_y - sum_p)) / n)


def ndcg_per_user(gain, score, groups, k: int = 10) -> pd.Series:
    """NDCG@k of each user's ranking by ``score`` (descending) with graded relevance ``gain``.

    DCG@k = sum_{r=1..k} gain_r / log2(r + 1) over the user's rows in score order; NDCG@k =
    DCG@k / IDCG@k, IDCG from the rows sorted by gain (Jarvelin & Kekalainen 2002, "Cumulated
    gain-based evaluation of IR techniques", TOIS, with the log2(r + 1) discount of Burges et al.
    2005). Ties in ``score`` keep the input row order (stable sort): to rank ties on purpose,
    encode the tie-break in ``score``.

    Args:
        gain: non-negative graded relevance per row (e.g. weighted sum of engagement labels).
        score: finite ranking score per row; higher is ranked first.
        groups: user id per row.
        k: cut-off, >= 1.

    Returns:
        ``pd.Series`` indexed by group key, NDCG@k in [0, 1] for users whose total gain is > 0
        (users without any positive gain have no ideal ranking and are left out).

    Raises:
        ValueError: negative or non-finite gains, ``k < 1``, malformed input.
    """
    g = _as_1d("gain", gain).astype(np.float64)
    n = len(g)
    s = _scores(score, n)
    if not np.isfinite(g).all() or (g < 0).any():
        raise ValueError("gains must be finite and >= 0")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    codes, uniques = _group_codes(groups, n)
    n_groups = len(uniques)
    if n == 0:
        return pd.Series([], dtype=np.float64)

    def dcg(sort_key: np.ndarray) -> np.ndarray:
        # sort by group, then by key descending; stable keeps input order on ties
        order = np.lexsort((-sort_key, codes))  # lexsort is stable
        c = codes[order]
        starts = np.r_[0, np.flatnonzero(np.diff(c)) + 1]
        first = np.repeat(starts, np.diff(np.r_[starts, n]))
        rank = np.arange(n) - first + 1  # 1-based position within the user
        contrib = np.where(rank <= k, g[order] / np.log2(rank + 1.0), 0.0)
        return np.bincount(c, weights=contrib, minlength=n_groups)

    dcg_u = dcg(s)
    idcg_u = dcg(g)
    ok = idcg_u > 0
    return pd.Series(dcg_u[ok] / idcg_u[ok], index=pd.Index(uniques[ok], name="group"), name=f"ndcg@{k}")


def ndcg_at_k(gain, score, groups, k: int = 10) -> float:
    """Mean of :func:`ndcg_per_user` over users with positive total gain (``nan`` if none)."""
    per_user = ndcg_per_user(gain, score, groups, k)
    return float(per_user.mean()) if len(per_user) else float("nan")
