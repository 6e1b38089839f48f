#!/usr/bin/env bash
# Create the virtual environment from requirements.lock and install system services (redis-server,
# redis-sentinel, prometheus + promtool, chromium, haproxy, wrk).
# Idempotent: a venv whose lock hash matches is reused. Prints the venv path on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "[setup] installing Debian's redis-server" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >&2
fi
# Debian starts a system redis on 6379 after install; we never use it (ours run on free ports).

# redis-sentinel: the three Sentinels of `home-mixer services start --ha` (primary + replica + Sentinels).
if ! command -v redis-sentinel >/dev/null 2>&1; then
  echo "[setup] installing Debian's redis-sentinel" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-sentinel >&2
  # the package may start a system Sentinel on :26379; ours run per state folder on free ports
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now redis-sentinel >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/redis-sentinel ]; then
    $SUDO /etc/init.d/redis-sentinel stop >/dev/null 2>&1 || true
  fi
fi

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "[setup] installing Debian's prometheus (with promtool)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >&2
  # The package may start a system prometheus on :9090; we run our own per state folder
  # (`home-mixer monitor start`), so stop and disable the system one.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ]; then
    $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    if command -v update-rc.d >/dev/null 2>&1; then $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true; fi
  fi
fi

# Headless chromium for the dashboard browser tests (Playwright drives Debian's build: it cannot
# download its own browsers here).
if ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] installing Debian's chromium and chromium-driver" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
fi

# HAProxy: the mixer's front door (`home-mixer serve mixer --replicas N`, mixer/haproxy.py); 2.6 in
# Debian 12, with the Prometheus exporter built in.
if ! command -v haproxy >/dev/null 2>&1; then
  echo "[setup] installing Debian's haproxy" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends haproxy >&2
  # The package may start a system haproxy from /etc/haproxy; ours run per state folder from a
  # generated config, so stop and disable the system one.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now haproxy >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/haproxy ]; then
    $SUDO /etc/init.d/haproxy stop >/dev/null 2>&1 || true
    if command -v update-rc.d >/dev/null 2>&1; then $SUDO update-rc.d haproxy disable >/dev/null 2>&1 || true; fi
  fi
fi

# wrk: the HTTP load generator of bench/load.py.
if ! command -v wrk >/dev/null 2>&1; then
  echo "[setup] installing Debian's wrk" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends wrk >&2
fi

PY=${PYTHON:-python3.11}
# One venv per (lock, interpreter, checkout): the project is installed editable, so two checkouts
# must not share a venv (the last install would win for both).
hash=$( (cat requirements.lock; $PY --version; pwd -P) | sha256sum | cut -c1-12)
VENV=${HOME_MIXER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/home-mixer/venv-$hash}
if [ ! -f "$VENV/.complete" ]; then
  echo "[setup] creating $VENV (first run installs ~200 packages, a few minutes)" >&2
  rm -rf "$VENV"
  $PY -m venv "$VENV"
  # torch first, from its exact CPU wheel; any looser spec pulls a multi-GB CUDA build.
  "$VENV/bin/pip" install -q "torch==2.13.0" >&2
  "$VENV/bin/pip" install -q --no-deps -r requirements.lock >&2
  touch "$VENV/.complete"
fi
"$VENV/bin/pip" install -q --no-deps -e . >&2
ln -sfn "$VENV" .venv
echo "$VENV"
