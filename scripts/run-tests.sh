#!/usr/bin/env bash
# Runs the whole suite against the services scripts/setup.sh started.
# pytest's "no tests ran" (exit 5) is a failure here, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -ra -p no:cacheprovider "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "run-tests: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
