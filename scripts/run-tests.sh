#!/usr/bin/env bash
# Run every test tier in order: lint and types, unit and property, integration (root, FUSE, loop, NBD, S3),
# faults, the real Pacemaker cluster, the VM tier (tests/vm: QEMU guests with dm-era and dm-snapshot), and the
# benchmark smoke run. Stops at the first failing tier.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
echo "== lint and types" >&2
.venv/bin/ruff check src tests bench
.venv/bin/mypy
echo "== tests" >&2
# Fixed, printed seed for every randomised test (Hypothesis and the crash/failover tests); override with
# BATON_SEED to replay or explore. The record model runs BATON_MODEL_EXAMPLES x 50 steps (tens of thousands).
export BATON_SEED=${BATON_SEED:-20261124}
export BATON_MODEL_EXAMPLES=${BATON_MODEL_EXAMPLES:-400}
# The whole-lifecycle model (tests/property/test_lifecycle_model.py): 500 runs of up to 50 steps, and the run
# fails if fewer than 10,000 steps were executed.
export BATON_LIFECYCLE_EXAMPLES=${BATON_LIFECYCLE_EXAMPLES:-500}
export BATON_LIFECYCLE_MIN_STEPS=${BATON_LIFECYCLE_MIN_STEPS:-10000}
echo "== seed: BATON_SEED=$BATON_SEED (hypothesis seed too); record model examples: $BATON_MODEL_EXAMPLES; lifecycle model examples: $BATON_LIFECYCLE_EXAMPLES" >&2
# One pytest run, so the closing line counts every tier.
set +e
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} $PY -m pytest -q -p no:cacheprovider --hypothesis-seed="$BATON_SEED" \
  tests "$@"
rc=$?
set -e
[ $rc -eq 5 ] && { echo "run-tests: no tests were collected" >&2; exit 1; }
exit $rc
