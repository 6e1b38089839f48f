"""An incremental update of the light ranker against a full retrain, on the real log (issue 22,
must-have 6's option), in one run.

The dev frame of the KuaiRand log (``tests.dev_frame``; features in pandas) is split as training
does: the last ``VALIDATION_DAYS`` days are held out. A champion is trained on the training days
but the newest (its last day early-stops), as if yesterday's model. Then the newest day arrives:

- **full**: retrain from scratch on every training day (the newest early-stops);
- **incremental**: continue the champion's booster (LightGBM ``init_model``: its trees kept, new
  trees fit on the day before the newest, the newest early-stopping), as
  ``home-mixer train --model light --continue-from champion`` does.

Prints each model's training seconds, trees, and its AUC and request GAUC of ``engaged`` on the
validation days, with the ratios incremental / full.

    .venv/bin/python bench/light_update.py [--users-mod 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from core.state import DEFAULT_DATA_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="KuaiRand-Pure folder")
    ap.add_argument("--users-mod", type=int, default=2, help="keep users with user_id %% N == 0 (1: all)")
    args = ap.parse_args(argv)

    from models import metrics as M
    from models.light_ranker import LightRankerParams, engaged_label, fit_light_ranker
    from models.split import split_by_days
    from tests.dev_frame import build_dev_frame

    frame = build_dev_frame(Path(args.data), user_sample_mod=args.users_mod)
    train, valid = split_by_days(frame, valid_days=2)
    days = sorted(train["date"].unique())
    params = LightRankerParams(num_threads=1)
    t = time.perf_counter()
    champion = fit_light_ranker(train[train["date"] < days[-1]], params)
    champion_s = time.perf_counter() - t
    t = time.perf_counter()
    full = fit_light_ranker(train, params)
    full_s = time.perf_counter() - t
    t = time.perf_counter()
    incremental = fit_light_ranker(train[train["date"].isin(days[-2:])], params, init_model=champion.booster)
    incremental_s = time.perf_counter() - t
    y = engaged_label(valid)
    requests = valid["request_id"].to_numpy()
    rows = {}
    for name, fit, seconds in (("champion (yesterday)", champion, champion_s), ("full retrain", full, full_s),
                               ("incremental update", incremental, incremental_s)):
        p = fit.predict(valid)[:, 0]
        rows[name] = (seconds, fit.booster.num_trees(), M.auc(y, p), M.gauc(y, p, requests))
    print(f"\n== light ranker: incremental update vs full retrain ({len(train):,} training rows over {len(days)} days, "
          f"validation {len(valid):,} rows on {[int(d) for d in sorted(valid['date'].unique())]}) ==")
    for name, (s, trees, auc, gauc) in rows.items():
        print(f"{name:<22} train {s:6.1f} s  trees {trees:4d}  engaged AUC {auc:.4f}  request GAUC {gauc:.4f}")
    f, i = rows["full retrain"], rows["incremental update"]
    print(f"incremental / full: time {i[0] / f[0]:.2f}x, AUC {i[2] - f[2]:+.4f}, GAUC {i[3] - f[3]:+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
