"""Simulated users for end-to-end experiments: they ask the real mixer for pages over HTTP and
engage with what it serves, by a response model learned from the shared log and independent of
the rankers under test.

This is the approach of RecSim (Ie et al. 2019, "RecSim: a configurable simulation platform for
recommender systems") and KuaiSim (Zhao et al. 2023, "KuaiSim: a comprehensive simulator for
recommender systems", built on KuaiRand): a user model fitted on logged responses stands in for
people, so a whole experiment (assignment, serving, logging, readout, the model updater's
decisions) runs end to end with a known ground truth.

**Response model** (``ResponseModel``). For each head (click, long view, like) the probability
that a user engages with a post *once they look at it* is a logistic regression on three smoothed
log rates: the user's rate, the post's rate and the user's rate on the post's tag. The rates come
from the log's first days, the regression is fitted on its last days (so the rates are not fitted
on their own labels). Rates are shrunk towards the global rate with ``prior_weight`` pseudo-
impressions (empirical-Bayes smoothing). The rankers never see this model; its only inputs are
counts of the log.

**Examination.** A user looks at slot ``k`` (0-based) of a page with probability ``1 / (1 +
k) ** eta`` (a position-based model, Joachims et al. 2017, "Unbiased learning-to-rank with biased
feedback"; ``eta = 0.5`` is an assumption, not fitted: KuaiRand's log has no positions). A post
that is not examined gets no engagement.

The simulation writes what users did as a canonical impressions table (``user_id``,
``post_id``, ``event_ts``, the heads) for the experiment readout.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

SIM_HEADS = ("click", "long_view", "like")
LOG_COLUMNS = {"click": "is_click", "long_view": "long_view", "like": "is_like"}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


@dataclass
class ResponseModel:
    """P(engage on head | examined) per (user, post) (module docstring).

    Attributes:
        global_rate: head -> the log's rate.
        user_rate, post_rate: head -> Series indexed by id of smoothed rates.
        tag_rate: head -> Series indexed by (user_id, tag) of smoothed rates.
        post_tag: post_id -> primary tag (-1 when unknown).
        coef: head -> (intercept, w_user, w_post, w_tag) of the logistic regression on the rates' logits.
        eta: position-bias exponent of examination.
    """

    global_rate: dict[str, float]
    user_rate: dict[str, pd.Series]
    post_rate: dict[str, pd.Series]
    tag_rate: dict[str, pd.Series]
    post_tag: pd.Series
    coef: dict[str, np.ndarray]
    eta: float = 0.5
    heads: tuple[str, ...] = SIM_HEADS

    @classmethod
    def fit(cls, log: pd.DataFrame, videos: pd.DataFrame, *, heads=SIM_HEADS, rate_days: int = 7,
            prior_weight: float = 20.0, eta: float = 0.5) -> "ResponseModel":
        """Fit on a KuaiRand log (``user_id``, ``video_id``, ``date`` and the heads' columns) and
        its videos (``video_id``, ``tag``: the first id of a comma list is the primary tag).

        Raises:
            ValueError: the log has fewer than ``rate_days + 1`` days, or misses a column.
        """
        from sklearn.linear_model import LogisticRegression

        missing = [c for c in ("user_id", "video_id", "date", *(LOG_COLUMNS[h] for h in heads)) if c not in log]
        if missing:
            raise ValueError(f"the log lacks column(s) {missing} the response model needs")
        days = np.sort(log["date"].unique())
        if len(days) <= rate_days:
            raise ValueError(f"the response model needs more than {rate_days} days of log (rates, then the fit); "
                             f"got {len(days)}")
        tags = pd.to_numeric(videos["tag"].astype(str).str.split(",").str[0], errors="coerce").fillna(-1)
        post_tag = pd.Series(tags.astype("int64").to_numpy(), index=videos["video_id"].astype("int64"))
        frame = pd.DataFrame({"user_id": log["user_id"].astype("int64"), "post_id": log["video_id"].astype("int64"),
                              "date": log["date"]})
        frame["tag"] = post_tag.reindex(frame["post_id"]).fillna(-1).astype("int64").to_numpy()
        early = frame["date"] <= days[rate_days - 1]
        model = cls({}, {}, {}, {}, post_tag, {}, eta, tuple(heads))
        for h in heads:
            y = log[LOG_COLUMNS[h]].astype("float64").to_numpy()
            g = float(y[early.to_numpy()].mean())
            model.global_rate[h] = g

            def smoothed(keys):
                grouped = pd.DataFrame({"y": y[early.to_numpy()]},
                                       index=pd.MultiIndex.from_frame(frame.loc[early, keys]) if len(keys) > 1
                                       else frame.loc[early, keys[0]]).groupby(level=list(range(len(keys))))["y"]
                return (grouped.sum() + prior_weight * g) / (grouped.count() + prior_weight)

            model.user_rate[h] = smoothed(["user_id"])
            model.post_rate[h] = smoothed(["post_id"])
            model.tag_rate[h] = smoothed(["user_id", "tag"])
            late = ~early.to_numpy()
            x = model._features(h, frame.loc[late, "user_id"].to_numpy(), frame.loc[late, "post_id"].to_numpy())
            lr = LogisticRegression(C=1.0, max_iter=500).fit(x, y[late])
            model.coef[h] = np.concatenate([lr.intercept_, lr.coef_[0]])
        return model

    def _features(self, head: str, users: np.ndarray, posts: np.ndarray) -> np.ndarray:
        g = self.global_rate[head]
        u = self.user_rate[head].reindex(users).fillna(g).to_numpy()
        p = self.post_rate[head].reindex(posts).fillna(g).to_numpy()
        tags = self.post_tag.reindex(posts).fillna(-1).astype("int64").to_numpy()
        t = self.tag_rate[head].reindex(pd.MultiIndex.from_arrays([users, tags])).fillna(g).to_numpy()
        return np.column_stack([_logit(u), _logit(p), _logit(t)])

    def probability(self, head: str, users, posts) -> np.ndarray:
        """P(engage on ``head`` | examined) for each (user, post) pair (float64, shape (n,))."""
        users = np.asarray(users, dtype="int64")
        posts = np.asarray(posts, dtype="int64")
        c = self.coef[head]
        z = c[0] + self._features(head, users, posts) @ c[1:]
        return 1 / (1 + np.exp(-z))

    def examination(self, positions) -> np.ndarray:
        """P(the slot is looked at) for 0-based ``positions``."""
        return 1 / (1 + np.asarray(positions, dtype="float64")) ** self.eta

    def page_value(self, head: str, user: int, posts) -> float:
        """Expected engagements on ``head`` of one page: ``sum_k exam(k) * p(user, post_k)``."""
        posts = list(posts)
        return float((self.examination(np.arange(len(posts))) *
                      self.probability(head, np.full(len(posts), user), posts)).sum())


@dataclass
class SimulationResult:
    """What the simulated users saw and did.

    Attributes:
        pages: one row per served post: ``request_id``, ``user_id``, ``arm``, ``post_id``,
            ``position``, ``team``, ``examined`` (bool), one 0/1 column per head, and the response
            model's expected value of the slot per head (``p_<head>`` = examination x probability).
        failed: requests that did not get a 200 (status -> count).
    """

    pages: pd.DataFrame
    failed: dict[int, int] = field(default_factory=dict)

    def impressions(self, served: pd.DataFrame) -> pd.DataFrame:
        """The canonical impressions table of the engaged, examined posts, stamped one second per
        slot after each request's clock (``served``: the impression log, for ``as_of``)."""
        as_of = served.drop_duplicates("request_id").set_index("request_id")["as_of"]
        seen = self.pages[self.pages["examined"]]
        ts = as_of.reindex(seen["request_id"]).to_numpy() + 1.0 + seen["position"].to_numpy()
        out = pd.DataFrame({"user_id": seen["user_id"].to_numpy(), "post_id": seen["post_id"].to_numpy(),
                            "event_ts": pd.to_datetime(np.round(ts * 1e6).astype("int64"), unit="us", utc=True)})
        for h in self.pages.columns:
            if h in SIM_HEADS:
                out[h] = seen[h].astype("int64").to_numpy()
        return out


def canonical_impressions(impressions: pd.DataFrame) -> pd.DataFrame:
    """Simulated impressions (``SimulationResult.impressions``) in the canonical impressions
    table's shape, so the feature-log labelling (``pipelines.logged_features``) and training read
    them as they read the log: ``date`` (yyyymmdd of ``event_ts``, UTC), ``tab`` (the home surface)
    and every head of ``core.schema.HEADS`` (0 for the heads the users do not simulate)."""
    from core.schema import HEADS, HOME_SURFACE

    out = impressions.copy()
    out["date"] = out["event_ts"].dt.strftime("%Y%m%d").astype("int64")
    out["tab"] = HOME_SURFACE
    for h in HEADS:
        if h not in out.columns:
            out[h] = 0
    return out


def simulate_users(base_url: str, headers: dict, model: ResponseModel, users, *, sessions: int = 2,
                   page_size: int = 10, seed: int = 0, concurrency: int = 2, timeout_s: float = 30.0,
                   progress=None) -> SimulationResult:
    """Each user asks for ``sessions`` first pages and responds to each (module docstring).

    Args:
        base_url: the mixer (or its front door); ``headers``: its bearer token.
        users: user ids (from the log, so the response model knows them).
        concurrency: requests in flight (keep it at the mixer's workers).
        progress: optional callable(done, total).

    Raises:
        httpx.TransportError: the mixer cannot be reached at all.
    """
    rng = np.random.default_rng(seed)
    jobs = [(int(u), s) for u in users for s in range(sessions)]
    rows: list[tuple] = []
    failed: dict[int, int] = {}

    def ask(client: httpx.Client, user: int):
        return client.post("/v1/home-timeline", json={"user_id": user, "limit": page_size})

    with httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s) as client, \
            cf.ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(ask, client, u): u for u, _ in jobs}
        for done, fut in enumerate(cf.as_completed(futures), 1):
            user = futures[fut]
            r = fut.result()
            if progress is not None:
                progress(done, len(jobs))
            if r.status_code != 200:
                failed[r.status_code] = failed.get(r.status_code, 0) + 1
                continue
            body = r.json()
            for pos, item in enumerate(body["items"]):
                rows.append((body["request_id"], user, body["arm"], int(item["post_id"]), pos, item.get("team", "")))
    pages = pd.DataFrame(rows, columns=["request_id", "user_id", "arm", "post_id", "position", "team"])
    if pages.empty:
        return SimulationResult(pages, failed)
    exam = model.examination(pages["position"].to_numpy())
    pages["examined"] = rng.random(len(pages)) < exam
    for h in model.heads:
        p = model.probability(h, pages["user_id"].to_numpy(), pages["post_id"].to_numpy())
        pages[f"p_{h}"] = exam * p
        pages[h] = (pages["examined"].to_numpy() & (rng.random(len(pages)) < p)).astype("int64")
    return SimulationResult(pages, failed)


def load_response_model(data_dir: Path) -> ResponseModel:
    """``ResponseModel.fit`` on the KuaiRand log and videos in ``data_dir`` (~10 s)."""
    from pipelines.raw import LOG_FILE, VIDEOS_FILE

    log = pd.read_csv(Path(data_dir) / LOG_FILE, usecols=["user_id", "video_id", "date", *LOG_COLUMNS.values()])
    videos = pd.read_csv(Path(data_dir) / VIDEOS_FILE, usecols=["video_id", "tag"])
    return ResponseModel.fit(log, videos)


def decision_sample_sizes(labelled: pd.DataFrame, *, control: str, treatment: str, interleaved: str,
                          head: str = "click", sizes=(25, 50, 100, 150, 200, 300, 400, 600, 800),
                          repeats: int = 10, seed: int = 0) -> dict[str, int | None]:
    """How many users each design needs to find that ``treatment`` is worse than ``control`` on
    ``head`` (Chapelle et al. 2012 compare designs this way): the smallest user count at which 8 of
    10 random user subsets decide it.

    - A/B: half the users from each arm; decided when the lift's 95 % interval is below 0.
    - interleaving: users of ``interleaved`` (whose teams are ``control`` first, ``treatment``
      second); decided when the preference's 95 % interval is above 0 (``control`` preferred).

    Args:
        labelled: ``monitoring.experiment_report.label_served`` output of the experiment.

    Returns:
        ``{"ab": n or None, "interleaving": n or None}`` (None: not decided at the largest size
        the data allows).
    """
    from models.interleaving import TEAM_A, TEAM_B, interleaving_credit
    from monitoring.experiment_report import ratio_of_sums, relative_lift

    def per_user(arm: str) -> pd.DataFrame:
        rows = labelled[labelled["arm"] == arm]
        return rows.groupby("user_id").agg(x=(head, "sum"), n=(head, "size"))

    ctrl, trt = per_user(control), per_user(treatment)
    rng = np.random.default_rng(seed)

    def ab(n: int) -> bool:
        half = n // 2
        if half > len(ctrl) or half > len(trt):
            raise _TooFew
        c = ctrl.iloc[rng.choice(len(ctrl), half, replace=False)]
        t = trt.iloc[rng.choice(len(trt), half, replace=False)]
        lift = relative_lift(ratio_of_sums(t["x"].to_numpy(float), t["n"].to_numpy(float)),
                             ratio_of_sums(c["x"].to_numpy(float), c["n"].to_numpy(float)))
        return lift.high < 0

    inter = labelled[(labelled["arm"] == interleaved) & (labelled["team"] != "")]
    inter_users = inter["user_id"].unique()

    def il(n: int) -> bool:
        if n > len(inter_users):
            raise _TooFew
        rows = inter[inter["user_id"].isin(rng.choice(inter_users, n, replace=False))]
        side = np.where(rows["team"].to_numpy() == control, TEAM_A, TEAM_B)
        if rows[head].sum() == 0:
            return False
        return interleaving_credit(rows["user_id"].to_numpy(), side, rows[head].to_numpy(), n_boot=300).ci_low > 0

    out: dict[str, int | None] = {}
    for name, decide in (("ab", ab), ("interleaving", il)):
        out[name] = None
        for n in sizes:
            try:
                wins = sum(decide(n) for _ in range(repeats))
            except _TooFew:
                break
            if wins >= math.ceil(0.8 * repeats):
                out[name] = n
                break
    return out


class _TooFew(Exception):
    """A subset larger than the users the arm has."""
