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
    path = Path(impressions) if impressions else state.table("impressions")
    if not path.exists():
        raise ExperimentDataError(f"{path} does not exist: engagements come from an impressions table "
                                  "(`home-mixer features build`, or --impressions PATH)")
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
    shares = {a.name: a.traffic_share for a in cfg.experiment.arms}
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
    shares = {a.name: a.traffic_share for a in cfg.experiment.arms}
    result = readout(labelled, shares, experiment=cfg.experiment.id, heads=model.heads)
    out = out_dir or state.reports / "experiments" / cfg.experiment.id / (
        "simulated-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    j, h = write_report(result, out, heads=model.heads)
    return SimulatedExperiment(sim, ExperimentReport(result, j, h), labelled)
