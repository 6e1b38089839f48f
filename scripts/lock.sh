#!/usr/bin/env bash
# Regenerate requirements.lock from a resolved environment: a throwaway venv gets torch's CPU wheel
# first (any looser spec pulls CUDA), then the project with its test extras; `pip freeze` of that
# venv, minus the project itself, is the lock. Review the diff before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$PY -m venv "$TMP/venv"
"$TMP/venv/bin/pip" install -q "torch==2.13.0" >&2
"$TMP/venv/bin/pip" install -q ".[test]" >&2
{
  echo "# Exact versions of every dependency (pip freeze of a resolved environment). scripts/setup.sh installs"
  echo "# from this file with --no-deps; regenerate with scripts/lock.sh after changing pyproject.toml."
  "$TMP/venv/bin/pip" freeze --exclude home-mixer | grep -v "^-e "
} > requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) pins" >&2
