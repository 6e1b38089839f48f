"""The readout of an online experiment: per arm, what users did with what the mixer served.

Input: the mixer's impression log (``hm:served_impressions``: one entry per served post with its
experiment, arm, request and guardrail fields; ``mixer.side_effects.ImpressionLogSideEffect``) and
the engagements that followed (a canonical impressions table: ``user_id``, ``post_id``,
``event_ts``, the ``HEADS`` labels). A served post is engaged on a head when the first impression
of the same (user, post) within ``window_s`` after the serve has that head (the join of
``pipelines.logged_features.first_impressions``, shared with training from logged features);
a served post with no such impression counts as not engaged.

Statistics, per arm and head (the user is the randomisation unit, so every variance is over users):

- **rate per impression** ``R = sum_u X_u / sum_u N_u`` (X engagements, N served posts of user u),
  with the delta-method variance of a ratio of per-user sums (Deng, Knoblich & Lu 2018, "Applying
  the delta method in metric analytics", eq. 3): ``Var(R) = (s_X^2 - 2 R s_XN + R^2 s_N^2) / (n
  mean(N)^2)``;
- **engagements per user** ``mean_u X_u`` with the normal interval;
- **relative lift** against the control arm, ``R_t / R_c - 1``, its interval from the delta method
  on ``log R_t - log R_c`` (independent arms: the variances add; Deng et al. 2018, sect. 3.3);
- **sample-ratio mismatch**: chi-square of users per arm against the configured shares; p < 0.001
  flags it (Fabijan et al. 2019, "Diagnosing sample ratio mismatch in online controlled
  experiments": the usual threshold, since SRM checks run on every experiment);
- **interleaving** arms (``team`` logged per post): per head, the users whose engagements went
  more to one team's posts, the preference statistic with a bootstrap interval over users and a
  sign test (``models.interleaving.interleaving_credit``; Chapelle et al. 2012);
- **guardrails** per arm: p99 of the request pipeline time, share of requests served degraded and
  share scored by the in-process fallback; a treatment arm breaches when its p99 exceeds the
  control's by ``max_p99_ratio`` or its degraded / fallback share by ``max_share_increase``.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core import online_layout as keys
from core.schema import HEADS
from models.interleaving import TEAM_A, TEAM_B, InterleavingResult, interleaving_credit
from pipelines.logged_features import DEFAULT_LABEL_WINDOW_S, first_impressions

Z95 = 1.959963984540054
SRM_P_VALUE = 0.001


class ExperimentDataError(ValueError):
    """The logs cannot support a readout (no impressions of the experiment, one arm only, ...);
    the message says what is missing."""


def read_served_impressions(client, experiment: str | None = None, *, since_s: float | None = None,
                            until_s: float | None = None, stream: str = keys.SERVED_IMPRESSIONS,
                            batch: int = 10_000) -> pd.DataFrame:
    """The impression log as a frame, optionally one experiment's and a time range of serves.

    Args:
        client: the online store.
        experiment: keep entries whose ``experiment`` field equals it (None: all).
        since_s, until_s: keep serves with ``since_s <= served_at < until_s`` (wall epoch s).

    Returns:
        Columns ``request_id`` (str), ``user_id``, ``post_id`` (int64), ``arm``, ``experiment``
        (str), ``position`` (int64), ``propensity``, ``served_at``, ``as_of`` (float64 epoch s),
        ``pipeline_ms`` (float64, NaN for entries logged before the field existed), ``degraded``
        (str), ``fallback`` (int64), ``page_index`` (int64), ``team`` (str: an interleaving arm's
        team arm, else empty).
    """
    rows = []
    start = "-"
    while True:
        chunk = client.xrange(stream, min=start, max="+", count=batch)
        for entry_id, f in chunk:
            rows.append({k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                         for k, v in f.items()})
        if len(chunk) < batch:
            break
        last = chunk[-1][0].decode() if isinstance(chunk[-1][0], bytes) else chunk[-1][0]
        start = "(" + last
    cols = ["request_id", "user_id", "post_id", "arm", "experiment", "position", "propensity", "served_at", "as_of",
            "pipeline_ms", "degraded", "fallback", "page_index", "team"]
    frame = pd.DataFrame(rows).reindex(columns=cols)
    for c in ("experiment", "degraded", "team"):
        frame[c] = frame[c].fillna("")
    for c in ("user_id", "post_id", "position", "page_index", "fallback"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce").fillna(0).astype("int64")
    for c in ("propensity", "served_at", "as_of", "pipeline_ms"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce").astype("float64")
    frame["propensity"] = frame["propensity"].fillna(1.0)
    keep = np.ones(len(frame), dtype=bool)
    if experiment is not None:
        keep &= (frame["experiment"] == experiment).to_numpy()
    if since_s is not None:
        keep &= (frame["served_at"] >= since_s).to_numpy()
    if until_s is not None:
        keep &= (frame["served_at"] < until_s).to_numpy()
    return frame[keep].reset_index(drop=True)


def label_served(served: pd.DataFrame, impressions: pd.DataFrame, window_s: float = DEFAULT_LABEL_WINDOW_S,
                 heads=HEADS) -> pd.DataFrame:
    """``served`` with one 0/1 float64 column per head (module docstring: unlabelled = 0) and
    ``labelled`` (bool).

    Raises:
        KeyError: a needed column is missing (names it). ValueError: ``window_s <= 0``.
    """
    serves = pd.DataFrame({"user_id": served["user_id"].to_numpy(), "post_id": served["post_id"].to_numpy(),
                           "as_of": pd.to_datetime(np.round(served["as_of"].to_numpy() * 1e6).astype("int64"),
                                                   unit="us", utc=True)})
    labels = first_impressions(serves, impressions, window_s, columns=list(heads))
    out = served.copy()
    for h in heads:
        out[h] = labels[h].fillna(0).to_numpy(dtype="float64")
    out["labelled"] = labels["event_ts"].notna().to_numpy()
    return out


@dataclass(frozen=True)
class Interval:
    """A point estimate with its standard error and 95 % interval: normal unless ``lo`` / ``hi``
    are given (a lift's interval is computed on the log scale, so it is not symmetric)."""

    value: float
    std_error: float
    lo: float | None = None
    hi: float | None = None

    @property
    def low(self) -> float:
        return self.value - Z95 * self.std_error if self.lo is None else self.lo

    @property
    def high(self) -> float:
        return self.value + Z95 * self.std_error if self.hi is None else self.hi

    def to_dict(self) -> dict:
        return {"value": self.value, "std_error": self.std_error, "ci_low": self.low, "ci_high": self.high}


def ratio_of_sums(x: np.ndarray, n: np.ndarray) -> Interval:
    """``sum(x) / sum(n)`` over users with the delta-method standard error (module docstring).

    Args:
        x, n: (users,) per-user numerator and denominator (float64).
    """
    users = len(x)
    mean_n = n.mean()
    r = x.sum() / n.sum()
    if users < 2:
        return Interval(float(r), math.inf)
    cov = np.cov(np.vstack([x, n]), ddof=1)
    var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (users * mean_n ** 2)
    return Interval(float(r), float(math.sqrt(max(var, 0.0))))


def relative_lift(treatment: Interval, control: Interval) -> Interval:
    """``t / c - 1``: the delta method on ``log t - log c`` gives its standard error, mapped back
    (``se(lift) = (1 + lift) * se(log ratio)``), and the interval ``exp(log ratio +- 1.96 se) - 1``
    (never below -100 %); NaN when a rate is 0."""
    if treatment.value <= 0 or control.value <= 0:
        return Interval(math.nan, math.nan)
    se_log = math.sqrt((treatment.std_error / treatment.value) ** 2 + (control.std_error / control.value) ** 2)
    log_ratio = math.log(treatment.value / control.value)
    lift = math.exp(log_ratio) - 1
    return Interval(lift, (1 + lift) * se_log, math.exp(log_ratio - Z95 * se_log) - 1,
                    math.exp(log_ratio + Z95 * se_log) - 1)


@dataclass
class ArmReadout:
    """One arm: its counts, per-head rates and lifts, and guardrails."""

    arm: str
    users: int
    requests: int
    impressions: int
    rate_per_impression: dict[str, Interval]
    per_user: dict[str, Interval]
    lift: dict[str, Interval] = field(default_factory=dict)
    p99_pipeline_ms: float = math.nan
    degraded_share: float = 0.0
    fallback_share: float = 0.0
    teams: tuple[str, str] | None = None  # an interleaving arm's (team A, team B) arms
    interleaving: dict[str, InterleavingResult] = field(default_factory=dict)  # head -> credit (A = teams[0])

    def to_dict(self) -> dict:
        return {"arm": self.arm, "users": self.users, "requests": self.requests, "impressions": self.impressions,
                "rate_per_impression": {h: v.to_dict() for h, v in self.rate_per_impression.items()},
                "per_user": {h: v.to_dict() for h, v in self.per_user.items()},
                "lift": {h: v.to_dict() for h, v in self.lift.items()},
                "p99_pipeline_ms": self.p99_pipeline_ms, "degraded_share": self.degraded_share,
                "fallback_share": self.fallback_share, "teams": list(self.teams) if self.teams else None,
                "interleaving": {h: r.to_dict() for h, r in self.interleaving.items()}}


@dataclass
class ExperimentReadout:
    """The whole readout; ``passed`` is False on SRM or a guardrail breach."""

    experiment: str
    control: str
    arms: list[ArmReadout]
    srm_chi2: float
    srm_p_value: float
    expected_shares: dict[str, float]
    breaches: list[str]
    labelled_share: float

    @property
    def srm(self) -> bool:
        return self.srm_p_value < SRM_P_VALUE

    @property
    def passed(self) -> bool:
        return not self.srm and not self.breaches

    def to_dict(self) -> dict:
        return {"experiment": self.experiment, "control": self.control, "passed": self.passed,
                "srm": {"chi2": self.srm_chi2, "p_value": self.srm_p_value, "flagged": self.srm,
                        "expected_shares": self.expected_shares, "threshold": SRM_P_VALUE},
                "breaches": self.breaches, "labelled_share": self.labelled_share,
                "arms": [a.to_dict() for a in self.arms]}


def readout(labelled: pd.DataFrame, shares: dict[str, float], *, experiment: str, control: str | None = None,
            heads=HEADS, max_p99_ratio: float = 1.2, max_share_increase: float = 0.01) -> ExperimentReadout:
    """The readout of labelled impressions (``label_served`` output).

    Args:
        labelled: one row per served post with ``arm``, ``user_id``, ``request_id``, the heads
            (0/1), ``pipeline_ms``, ``degraded``, ``fallback`` and ``labelled``.
        shares: arm -> configured traffic share (for the SRM test; arms in the log but not here
            are an error).
        control: the arm lifts are against (default: the first of ``shares``).
        max_p99_ratio, max_share_increase: guardrail tolerances (module docstring).

    Raises:
        ExperimentDataError: no impressions, an arm missing from ``shares``, or the control arm
            has no impressions.
    """
    from scipy.stats import chisquare

    if labelled.empty:
        raise ExperimentDataError(f"no served impressions of experiment {experiment!r} in the log: check the id "
                                  "(`experiment.id` of the mixer config) and the time range")
    unknown = sorted(set(labelled["arm"]) - set(shares))
    if unknown:
        raise ExperimentDataError(f"arms {unknown} are in the log but not in the experiment config "
                                  f"({sorted(shares)}): pass the config the mixer served with")
    control = control or next(iter(shares))
    if control not in set(labelled["arm"]):
        raise ExperimentDataError(f"the control arm {control!r} has no impressions; arms in the log: "
                                  f"{sorted(set(labelled['arm']))}")
    arms: list[ArmReadout] = []
    requests = labelled.drop_duplicates("request_id")
    for arm in shares:
        rows = labelled[labelled["arm"] == arm]
        if rows.empty:
            continue
        per_user = rows.groupby("user_id")
        n = per_user.size().to_numpy(dtype="float64")
        rates, users = {}, {}
        for h in heads:
            x = per_user[h].sum().to_numpy(dtype="float64")
            rates[h] = ratio_of_sums(x, n)
            sd = x.std(ddof=1) if len(x) > 1 else math.inf
            users[h] = Interval(float(x.mean()), float(sd / math.sqrt(len(x))))
        req = requests[requests["arm"] == arm]
        ms = req["pipeline_ms"].dropna().to_numpy()
        readout_ = ArmReadout(arm, int(len(n)), int(len(req)), int(len(rows)), rates, users,
                              p99_pipeline_ms=float(np.quantile(ms, 0.99)) if len(ms) else math.nan,
                              degraded_share=float((req["degraded"] != "").mean()),
                              fallback_share=float((req["fallback"] > 0).mean()))
        team = rows["team"] if "team" in rows else pd.Series("", index=rows.index)
        if (team != "").any():
            readout_.teams, readout_.interleaving = _interleaving(rows[team != ""], heads)
        arms.append(readout_)
    ctrl = next(a for a in arms if a.arm == control)
    breaches: list[str] = []
    for a in arms:
        if a is ctrl:
            continue
        a.lift = {h: relative_lift(a.rate_per_impression[h], ctrl.rate_per_impression[h]) for h in heads}
        if a.p99_pipeline_ms > ctrl.p99_pipeline_ms * max_p99_ratio:
            breaches.append(f"{a.arm}: p99 pipeline time {a.p99_pipeline_ms:.1f} ms > {max_p99_ratio}x the "
                            f"control's {ctrl.p99_pipeline_ms:.1f} ms")
        for name, value, base in (("degraded", a.degraded_share, ctrl.degraded_share),
                                  ("fallback", a.fallback_share, ctrl.fallback_share)):
            if value > base + max_share_increase:
                breaches.append(f"{a.arm}: {name} share {value:.3f} > the control's {base:.3f} + "
                                f"{max_share_increase}")
    present = [a.arm for a in arms]
    total_share = sum(shares[a] for a in present)
    expected = {a: shares[a] / total_share for a in present}
    observed = np.array([a.users for a in arms], dtype="float64")
    if len(arms) > 1:
        chi2, p = chisquare(observed, observed.sum() * np.array([expected[a] for a in present]))
    else:
        chi2, p = 0.0, 1.0
    return ExperimentReadout(experiment, control, arms, float(chi2), float(p), expected, breaches,
                             float(labelled["labelled"].mean()))


def _interleaving(rows: pd.DataFrame, heads) -> tuple[tuple[str, str], dict[str, InterleavingResult]]:
    """Per-user team-draft credit of an interleaving arm's posts, per head with any engagement."""
    names = sorted(set(rows["team"]))
    if len(names) != 2:
        raise ExperimentDataError(f"an interleaving arm's posts name {len(names)} teams ({names}); expected 2")
    teams = (names[0], names[1])
    side = np.where(rows["team"].to_numpy() == teams[0], TEAM_A, TEAM_B)
    out = {}
    for h in heads:
        if rows[h].sum() > 0:
            out[h] = interleaving_credit(rows["user_id"].to_numpy(), side, rows[h].to_numpy())
    return teams, out


def write_report(result: ExperimentReadout, out_dir: Path, heads=HEADS) -> tuple[Path, Path]:
    """``summary.json`` and ``report.html`` (self-contained: plotly.js inline) in ``out_dir``.

    Returns:
        (json path, html path).
    """
    import plotly.graph_objects as go

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "summary.json"
    json_path.write_text(json.dumps(result.to_dict(), indent=1, default=float))
    esc = html.escape
    figs = []
    rate = go.Figure()
    for a in result.arms:
        v = [a.rate_per_impression[h].value for h in heads]
        e = [Z95 * a.rate_per_impression[h].std_error for h in heads]
        rate.add_bar(name=a.arm, x=list(heads), y=v, error_y=dict(type="data", array=e))
    rate.update_layout(title="engagement rate per impression (95 % intervals)", barmode="group",
                       template="plotly_white", height=380)
    figs.append(rate)
    lift = go.Figure()
    for a in result.arms:
        if not a.lift:
            continue
        lift.add_scatter(name=a.arm, x=[a.lift[h].value for h in heads], y=list(heads), mode="markers",
                         error_x=dict(type="data", array=[Z95 * a.lift[h].std_error for h in heads]))
    lift.add_vline(x=0, line_color="#7f7f7f")
    lift.update_layout(title=f"relative lift against {result.control} (95 % intervals)", template="plotly_white",
                       height=380, xaxis_tickformat=".0%")
    figs.append(lift)
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    rows = "".join(
        f"<tr><td>{esc(a.arm)}</td><td>{a.users}</td><td>{a.requests}</td><td>{a.impressions}</td>"
        f"<td>{a.p99_pipeline_ms:.1f}</td><td>{a.degraded_share:.3f}</td><td>{a.fallback_share:.3f}</td></tr>"
        for a in result.arms)
    inter = "".join(
        f"<tr><td>{esc(a.arm)}</td><td>{esc(h)}</td><td>{esc(a.teams[0])} vs {esc(a.teams[1])}</td>"
        f"<td>{r.wins_a}</td><td>{r.wins_b}</td><td>{r.ties}</td><td>{r.preference:+.3f} [{r.ci_low:+.3f}, "
        f"{r.ci_high:+.3f}]</td><td>{r.p_value:.3g}</td></tr>"
        for a in result.arms if a.teams for h, r in a.interleaving.items())
    if inter:
        inter = ("<h2>interleaving (per user; preference &gt; 0 favours the first team)</h2><table><tr><th>arm</th>"
                 "<th>head</th><th>teams</th><th>wins A</th><th>wins B</th><th>ties</th><th>preference</th>"
                 f"<th>sign test p</th></tr>{inter}</table>")
    status = "passed" if result.passed else "FAILED"
    breaches = "".join(f"<li>{esc(b)}</li>" for b in result.breaches) or "<li>none</li>"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>experiment {esc(result.experiment)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 10px;text-align:right}</style>"
            f"</head><body><h1>experiment {esc(result.experiment)}: {status}</h1>"
            f"<p>sample-ratio mismatch: chi2 {result.srm_chi2:.2f}, p {result.srm_p_value:.4g} "
            f"({'FLAGGED' if result.srm else 'ok'}, threshold {SRM_P_VALUE}); labelled share of impressions "
            f"{result.labelled_share:.3f}</p><h2>guardrail breaches</h2><ul>{breaches}</ul>"
            "<table><tr><th>arm</th><th>users</th><th>requests</th><th>impressions</th><th>p99 ms</th>"
            f"<th>degraded</th><th>fallback</th></tr>{rows}</table>{inter}{''.join(parts)}</body></html>")
    html_path = out_dir / "report.html"
    html_path.write_text(page)
    return json_path, html_path
