#!/usr/bin/env bash
# The fault-injection tests, several times, under synthetic CPU load: one busy process per core (plus LOAD_EXTRA
# more) runs for the whole time, so the tests meet the load that made the timed kills of old flaky (load average
# 6-21). Every fault test waits for events (rows in OUT, a checkpoint folder), so each round must pass.
#
#   scripts/stress_faults.sh [ROUNDS]      (default 3; PYTHON=.venv/bin/python, TESTS=..., LOAD_EXTRA=0)
#
# Prints one line per round and a summary; exits 1 if any round failed. The busy processes are this script's
# children and are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PYTHON=${PYTHON:-.venv/bin/python}
TESTS=${TESTS:-"tests/test_hardening_faults.py tests/test_hardening_ranks.py"}
LOAD_EXTRA=${LOAD_EXTRA:-0}
CORES=$(nproc)
BUSY=$((CORES + LOAD_EXTRA))
busy_pids=()
stop_busy() { for p in "${busy_pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop_busy EXIT
for _ in $(seq "$BUSY"); do
    ( while :; do :; done ) &
    busy_pids+=("$!")
done
echo "stress_faults: $BUSY busy processes on $CORES cores; $ROUNDS rounds of: $TESTS"
failed=0
for r in $(seq "$ROUNDS"); do
    start=$(date +%s)
    load0=$(cut -d' ' -f1 /proc/loadavg)
    if out=$("$PYTHON" -m pytest -q -p no:cacheprovider $TESTS 2>&1); then status=pass; else status=FAIL; failed=$((failed + 1)); fi
    load1=$(cut -d' ' -f1 /proc/loadavg)
    echo "round $r: $status in $(( $(date +%s) - start )) s, load average $load0 -> $load1: $(echo "$out" | tail -1)"
    [ "$status" = pass ] || echo "$out" | tail -40
done
echo "stress_faults: $((ROUNDS - failed))/$ROUNDS rounds passed"
[ "$failed" -eq 0 ]
