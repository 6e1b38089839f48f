"""``home-mixer experiment report``: an experiment's readout from the state's impression log and
impressions table (``monitoring.experiment_report``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.online_store import connect
from core.schema import HEADS
from core.state import StateDir
from home_mixer import jobs
from mixer.config import load_config
from monitoring.experiment_report import (
    ExperimentDataError, ExperimentReadout, label_served, read_served_impressions, readout, write_report)
from pipelines.logged_features import DEFAULT_LABEL_WINDOW_S

EXIT_FAILED = 4  # SRM or a guardrail breach (3 is the drift gate's)


@dataclass
class ExperimentReport:
    """A written readout: the result and its two files."""

    result: ExperimentReadout
    json: Path
    html: Path


def _impressions_path(state: StateDir, impressions: Path | None) -> Path:
    """The impressions table with the engagements: ``impressions``, else the state's.

    Raises:
        ExperimentDataError: it does not exist.
    """
    path = Path(impressions) if impressions else state.table("impressions")
    if not path.exists():
        raise ExperimentDataError(f"{path} does not exist: engagements come from an impressions table "
                                  "(`home-mixer features build`, or --impressions PATH)")
    return path


def report_experiment(state: StateDir, experiment: str | None = None, *, config: Path | None = None,
                      impressions: Path | None = None, control: str | None = None,
                      window_s: float = DEFAULT_LABEL_WINDOW_S, since_s: float | None = None,
                      until_s: float | None = None, out_dir: Path | None = None,
                      max_p99_ratio: float = 1.2, max_share_increase: float = 0.01) -> ExperimentReport:
    """Read the impression log of ``experiment`` (default: the config's ``experiment.id``), label
    it from the impressions table, and write ``summary.json`` + ``report.html``.

    Args:
        config: the mixer config the experiment ran with (arms and shares; default: embedded).
        impressions: a canonical impressions parquet (default ``<state>/tables/impressions``).
        out_dir: default ``<state>/reports/experiments/<id>/<UTC time>``.

    Raises:
        ExperimentDataError: no impressions table, no served impressions of the experiment, or
            arms that do not match the config.
        core.services.ServiceError: no Redis for the state.
    """
    cfg = load_config(config)
    exp_id = experiment or cfg.experiment.id
    path = _impressions_path(state, impressions)
    client = connect(jobs.redis_url_for(state))
    try:
        served = read_served_impressions(client, exp_id, since_s=since_s, until_s=until_s)
    finally:
        client.close()
    if served.empty:
        raise ExperimentDataError(f"no served impressions of experiment {exp_id!r} in the impression log; the "
                                  f"config's experiment is {cfg.experiment.id!r}")
    users = sorted(int(u) for u in pd.unique(served["user_id"]))
    imp = pd.read_parquet(path, columns=["user_id", "post_id", "event_ts", *HEADS],
                          filters=[("user_id", "in", users)])
    labelled = label_served(served, imp, window_s)
    shares = cfg.experiment.assignment_shares()  # the holdout included
    result = readout(labelled, shares, experiment=exp_id, control=control, max_p99_ratio=max_p99_ratio,
                     max_share_increase=max_share_increase)
    out = out_dir or state.reports / "experiments" / exp_id / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    j, h = write_report(result, out)
    return ExperimentReport(result, j, h)


def readout_text(result: ExperimentReadout, heads=("click", "long_view", "like")) -> str:
    """A terminal table: per arm users, impressions, the rates of ``heads`` and lifts."""
    lines = [f"experiment {result.experiment}: {'passed' if result.passed else 'FAILED'} "
             f"(SRM p = {result.srm_p_value:.3g}{', FLAGGED' if result.srm else ''}; labelled "
             f"{result.labelled_share:.1%} of impressions)"]
    head = f"{'arm':<18}{'users':>8}{'impr.':>9}" + "".join(f"{h + ' rate':>16}{'lift':>18}" for h in heads)
    lines.append(head)
    for a in result.arms:
        row = f"{a.arm:<18}{a.users:>8}{a.impressions:>9}"
        for h in heads:
            r = a.rate_per_impression[h]
            lift = a.lift.get(h)
            lift_s = "control" if lift is None else f"{lift.value:+.1%} [{lift.low:+.1%},{lift.high:+.1%}]"
            row += f"{r.value:>9.4f}±{1.96 * r.std_error:.4f}{lift_s:>18}"
        lines.append(row)
    for a in result.arms:
        for h, r in a.interleaving.items():
            lines.append(f"interleaving {a.arm} ({a.teams[0]} vs {a.teams[1]}), {h}: users won {r.wins_a} vs "
                         f"{r.wins_b} ({r.ties} ties), preference {r.preference:+.3f} [{r.ci_low:+.3f}, "
                         f"{r.ci_high:+.3f}], sign test p {r.p_value:.3g}")
    lines += [f"guardrail breach: {b}" for b in result.breaches]
    return "\n".join(lines)


@dataclass
class SimulatedExperiment:
    """A simulated run: the simulation, its readout and where the report went."""

    simulation: "object"  # home_mixer.simulator.SimulationResult
    report: ExperimentReport
    served: pd.DataFrame
    model: "object" = None  # home_mixer.simulator.ResponseModel the users responded with


def simulate_experiment(state: StateDir, *, config: Path | None, users: int, sessions: int = 2, seed: int = 0,
                        data_dir: Path | None = None, page_size: int = 10, workers: int = 1,
                        out_dir: Path | None = None, progress=None) -> SimulatedExperiment:
    """Start a mixer with ``config`` on the state, let ``users`` simulated users (drawn from the
    log, ``seed``) ask for ``sessions`` pages each and respond (``home_mixer.simulator``), stop the
    mixer, and read the experiment out from what it logged and what the users did.

    Raises:
        ExperimentDataError: no page was served, or as :func:`report_experiment`.
        core.services.ServiceError: the mixer did not start (its log's end in the message).
    """
    import numpy as np

    from core.state import DEFAULT_DATA_DIR
    from home_mixer.simulator import load_response_model, simulate_users
    from mixer.server import MixerServer
    from pipelines.raw import LOG_FILE

    data_dir = Path(data_dir or DEFAULT_DATA_DIR)
    cfg = load_config(config)
    model = load_response_model(data_dir)
    log_users = pd.read_csv(data_dir / LOG_FILE, usecols=["user_id"])["user_id"].drop_duplicates().to_numpy()
    if users > len(log_users):
        raise ExperimentDataError(f"--users {users} is more than the log's {len(log_users)} users")
    chosen = np.random.default_rng(seed).choice(log_users, users, replace=False)
    since = time.time()
    srv = MixerServer(state, name="mixer-simulation", config=config, redis_url=jobs.redis_url_for(state),
                      workers=workers).start(timeout_s=300)
    try:
        sim = simulate_users(srv.url, srv.auth_headers, model, chosen, sessions=sessions, page_size=page_size,
                             seed=seed, concurrency=workers, progress=progress)
    finally:
        srv.stop()
    if sim.pages.empty:
        raise ExperimentDataError(f"the mixer served no page to the simulated users (statuses {sim.failed}); "
                                  f"see {srv.log_file}")
    client = connect(jobs.redis_url_for(state))
    try:
        served = read_served_impressions(client, cfg.experiment.id, since_s=since)
    finally:
        client.close()
    labelled = label_served(served, sim.impressions(served), DEFAULT_LABEL_WINDOW_S, heads=model.heads)
    shares = cfg.experiment.assignment_shares()  # the holdout included
    result = readout(labelled, shares, experiment=cfg.experiment.id, heads=model.heads)
    out = out_dir or state.reports / "experiments" / cfg.experiment.id / (
        "simulated-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    j, h = write_report(result, out, heads=model.heads)
    return SimulatedExperiment(sim, ExperimentReport(result, j, h), labelled, model)


@dataclass
class OffPolicyRow:
    """One target policy's off-policy estimates (``monitoring.ope_report.evaluate``) and, on
    simulated traffic, its true value."""

    name: str
    target: "object"  # monitoring.ope_report.TargetPolicy; None for the logging policy itself
    estimates: dict
    truth: float | None = None

    def to_dict(self) -> dict:
        """The row as a JSON-ready dict."""
        policy = {} if self.target is None else {"weights": self.target.weights, "temperature": self.target.temperature,
                                                 "light_score_exponent": self.target.light_score_exponent}
        return {"name": self.name, **policy, "truth": self.truth, **{k: e.to_dict() for k, e in self.estimates.items()}}


def ope_targets(cfg, temperature: float | None = None, weights: dict | None = None) -> dict:
    """The target policies of ``home-mixer experiment ope``: each arm with weights of the config,
    greedy (or a softmax at ``temperature``), and ``custom`` when ``weights`` are given."""
    from monitoring.ope_report import TargetPolicy

    targets = {a.name: TargetPolicy(dict(a.weights), a.light_score_exponent, temperature)
               for a in cfg.experiment.arms if a.interleave is None}
    if weights:
        targets["custom"] = TargetPolicy(dict(weights), 0.0, temperature)
    return targets


def _exploring_arm(cfg, arm: str | None) -> str:
    exploring = [a.name for a in cfg.experiment.arms if a.exploration is not None]
    if arm is None:
        if not exploring:
            raise ExperimentDataError("the config has no exploring arm (`exploration:` on an arm): off-policy "
                                      "evaluation needs pages served with propensities")
        return exploring[0]
    if arm not in exploring:
        raise ExperimentDataError(f"arm {arm!r} does not explore; exploring arms: {exploring or 'none'}")
    return arm


def evaluate_off_policy(state: StateDir, *, config: Path | None = None, arm: str | None = None,
                        head: str = "click", temperature: float | None = None, weights: dict | None = None,
                        impressions: Path | None = None, window_s: float = DEFAULT_LABEL_WINDOW_S,
                        since_s: float | None = None) -> list[OffPolicyRow]:
    """Each target policy's value on ``head`` per decision, estimated from the exploring ``arm``'s
    logged pages (``hm:exploration``) and the engagements in the impressions table.

    Raises:
        ExperimentDataError: no exploring arm, or no impressions table.
        monitoring.ope_report.OffPolicyDataError: no exploration log entries.
    """
    from monitoring.ope_report import decision_rewards, evaluate, read_exploration_log

    cfg = load_config(config)
    arm = _exploring_arm(cfg, arm)
    path = _impressions_path(state, impressions)
    client = connect(jobs.redis_url_for(state))
    try:
        log = read_exploration_log(client, arm=arm, since_s=since_s)
        served = read_served_impressions(client, cfg.experiment.id, since_s=since_s)
    finally:
        client.close()
    served = served[served["request_id"].isin(set(log.request_id))]
    users = sorted(int(u) for u in pd.unique(served["user_id"]))
    imp = pd.read_parquet(path, columns=["user_id", "post_id", "event_ts", *HEADS], filters=[("user_id", "in", users)])
    reward = decision_rewards(log, label_served(served, imp, window_s), head)
    return [OffPolicyRow(name, t, evaluate(log, reward, t, head)) for name, t in
            ope_targets(cfg, temperature, weights).items()]


def simulate_off_policy(state: StateDir, *, config: Path | None, users: int, sessions: int = 2, seed: int = 0,
                        head: str = "click", temperature: float | None = None, weights: dict | None = None,
                        data_dir: Path | None = None, workers: int = 1, progress=None) -> list[OffPolicyRow]:
    """Simulated users against a mixer whose experiment has an exploring arm; then each target's
    estimates from the logged pages and its true value, which the response model knows:
    ``mean_i sum_a pi_e(a|x_i) exam(k_i) p(user_i, a)`` over the logged decisions
    (``monitoring.ope_report``). The row ``logged`` is the serving policy itself (its truth: the
    drawn posts' expected reward).

    Raises:
        ExperimentDataError: no exploring arm, or as :func:`simulate_experiment`.
    """
    from monitoring.ope_report import read_exploration_log

    cfg = load_config(config)
    arm = _exploring_arm(cfg, None)
    since = time.time()
    run = simulate_experiment(state, config=config, users=users, sessions=sessions, seed=seed, data_dir=data_dir,
                              workers=workers, progress=progress)
    model = run.model
    if head not in model.heads:
        raise ExperimentDataError(f"the response model simulates {list(model.heads)}, not {head!r}")
    client = connect(jobs.redis_url_for(state))
    try:
        log = read_exploration_log(client, arm=arm, since_s=since)
    finally:
        client.close()
    return off_policy_against_truth(log, run.simulation.pages, model, ope_targets(cfg, temperature, weights), head)


def off_policy_against_truth(log, pages: pd.DataFrame, model, targets: dict, head: str = "click") -> list[OffPolicyRow]:
    """Each target's estimates from simulated users' logged decisions (``log``: a
    ``monitoring.ope_report.DecisionLog``; ``pages``: ``SimulationResult.pages``) beside its true
    value, which the response model knows: ``mean_i sum_a pi_e(a|x_i) exam(k_i) p(user_i, a)``.
    The last row, ``logged``, is the serving policy itself (its truth: the drawn posts' expected
    reward)."""
    import numpy as np

    from monitoring.ope_report import decision_rewards, evaluate

    reward = decision_rewards(log, pages, head)
    n, m = log.post_ids.shape
    flat_users = np.repeat(log.user_id, m)
    flat_posts = np.where(log.mask, log.post_ids, log.logged_post[:, None]).ravel()  # padding: any real post
    expected = (model.probability(head, flat_users, flat_posts).reshape(n, m) *
                model.examination(log.position)[:, None])
    expected = np.where(log.mask, expected, 0.0)
    rows = []
    for name, target in targets.items():
        rows.append(OffPolicyRow(name, target, evaluate(log, reward, target, head),
                                 float((target.probabilities(log) * expected).sum(axis=1).mean())))
    logged = evaluate(log, reward, next(iter(targets.values())), head)["logged"]
    rows.append(OffPolicyRow("logged", None, {"logged": logged}, float(expected[np.arange(n), log.action].mean())))
    return rows


def off_policy_text(rows: list[OffPolicyRow], head: str) -> str:
    """A terminal table: per target the estimates with 95 % intervals and ESS (and the truth)."""
    lines = [f"value per decision ({head}), 95 % intervals; ESS = effective sample size of the weights"]
    for r in rows:
        truth = "" if r.truth is None else f"  truth {r.truth:.4f}"
        parts = []
        for k in ("ips", "snips", "dr", "logged"):
            e = r.estimates.get(k)
            if e is not None:
                parts.append(f"{k} {e.value:.4f} [{e.ci_low:.4f}, {e.ci_high:.4f}]")
        ess = r.estimates.get("ips")
        ess_s = f"  ESS {ess.effective_n:.0f}/{ess.n}" if ess is not None and r.name != "logged" else ""
        lines.append(f"{r.name:<18}{truth}  " + "; ".join(parts) + ess_s)
    return "\n".join(lines)
