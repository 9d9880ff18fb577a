#!/usr/bin/env bash
# Runs the whole test suite N times in a row (default 10) while stress-ng keeps both cores busy,
# and prints each run's result and time: the check that no test depends on an idle machine.
#
#   hack/stress-suite.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-10}"
bash hack/deps.sh --with-stress
cargo test --workspace --no-run -q 2>/dev/null

stress-ng --cpu 2 --timeout 0 --quiet &
stress=$!
trap 'kill "$stress" 2>/dev/null || true' EXIT

passed=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  if cargo test --workspace -q >"target/stress-run-$i.log" 2>&1; then
    passed=$((passed + 1))
    verdict=passed
  else
    verdict="FAILED (target/stress-run-$i.log)"
  fi
  echo "run $i: $verdict in $(($(date +%s) - start)) s"
done
echo "$passed of $runs runs passed under stress-ng --cpu 2"
[ "$passed" = "$runs" ]
