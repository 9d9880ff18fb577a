#!/usr/bin/env bash
# Builds sandboxd-o and starts the orchestrator with N simulated agents in the foreground (Ctrl-C stops it).
# Usage: hack/local-up.sh [AGENTS]   (env: LISTEN=127.0.0.1:8082 STORE=sqlite://./sandboxd-data/store.db)
set -euo pipefail
cd "$(dirname "$0")/.."
agents="${1:-3}"
listen="${LISTEN:-127.0.0.1:8082}"
store="${STORE:-sqlite://./sandboxd-data/store.db}"

cargo build --workspace --release --bins
cat <<TXT

sandboxd-o on http://$listen with $agents simulated agents (127.0.2.1 ... ). Try, in another terminal:

  export SANDBOXD_SERVER=http://$listen PATH=\$PWD/target/release:\$PATH
  sbxctl get nodes
  sbxctl apply -f manifests/examples/
  sbxctl get sandboxes -w
  sbxctl wait sandbox/sbx-demo-1 --for phase=Running
  sbxctl describe sandbox sbx-too-big
  sbxctl logs sbx-demo-1 --tail 5

TXT
exec env SANDBOXD_LOOPBACK_ONLY=1 target/release/sandboxd-o serve --insecure-listen "$listen" --store "$store" --demo-agents "$agents"
