#!/usr/bin/env bash
# Run every test tier in order: lint and types, unit and property, integration (root, FUSE, loop, NBD, S3),
# faults, the real Pacemaker cluster, and the benchmark smoke run. Stops at the first failing tier.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
echo "== lint and types" >&2
.venv/bin/ruff check src tests bench
.venv/bin/mypy
echo "== tests" >&2
# One pytest run, so the closing line counts every tier.
set +e
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} $PY -m pytest -q -p no:cacheprovider tests "$@"
rc=$?
set -e
[ $rc -eq 5 ] && { echo "run-tests: no tests were collected" >&2; exit 1; }
exit $rc
