#!/usr/bin/env bash
# Runs every benchmark scenario (or the named ones) on release binaries and prints one JSON line each plus a table.
# Usage: hack/bench.sh [all|store-create|store-create-etcd|heartbeats|burst-1k|scheduling-basic|scheduling-only|startup-latency|burst|scale|api-latency|failover|soak ...] [--smoke]
# soak runs 50 minutes (SOAK_WARMUP_S, SOAK_MEASURE_S and SOAK_BASE_IP change it); the others take seconds to minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --release --bins -q
exec target/release/sandboxd-bench --bin-dir target/release "${@:-all}"
