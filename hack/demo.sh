#!/usr/bin/env bash
# A scripted tour of sandboxd-o that exits 0 only if every step worked. CI runs it.
# Usage: hack/demo.sh   (env: PROFILE=release to use release binaries; default debug)
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-debug}"
if [ "$profile" = release ]; then cargo build --workspace --release --bins -q; else cargo build --workspace --bins -q; fi
bin="target/$profile"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
agent_port=$(free_port)
work=$(mktemp -d)
# Secure by default, as a newcomer runs it: HTTPS, tokens, and the client config sbxctl reads.
export SANDBOXD_CONFIG="$work/data/client.json" SANDBOXD_LOOPBACK_ONLY=1
unset SANDBOXD_SERVER SANDBOXD_TOKEN
sbxctl() { "$bin/sbxctl" "$@"; }
step() { printf '\n== %s\n' "$*"; }
fail() { echo "DEMO FAILED: $*" >&2; echo "--- server log ---" >&2; tail -n 40 "$work/server.log" >&2; exit 1; }

"$bin/sandboxd-o" serve --listen "127.0.0.1:$port" --data-dir "$work/data" --store "sqlite://$work/store.db" \
  --demo-agents 3 --demo-agent-port "$agent_port" --heartbeat-interval 500ms --heartbeat-timeout 400ms >"$work/server.log" 2>&1 &
server=$!
cleanup() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

step "wait for the server"
for _ in $(seq 1 100); do sbxctl get nodes >/dev/null 2>&1 && break; sleep 0.1; done
sbxctl get nodes >/dev/null || fail "server did not answer"

step "HTTPS only, and nothing without the token"
[ "$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/data/pki/ca.crt" "https://127.0.0.1:$port/api/v1/nodes")" = 401 ] \
  || fail "a request without a token was not refused"
curl -s --max-time 2 "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && fail "plain HTTP answered"
sbxctl auth whoami | grep -q "^admin (role admin" || fail "whoami is not the bootstrap admin"

step "three demo nodes become Ready"
for _ in $(seq 1 100); do
  [ "$(sbxctl get nodes | grep -c ' Ready ')" = 3 ] && break; sleep 0.1
done
sbxctl get nodes
[ "$(sbxctl get nodes | grep -c ' Ready ')" = 3 ] || fail "nodes not Ready"

step "apply the examples (created), then again (unchanged)"
sbxctl apply -f manifests/examples/ | tee "$work/apply1"
grep -q "sandbox/sbx-demo-1 created" "$work/apply1" || fail "first apply did not create"
sbxctl apply -f manifests/examples/sandbox-web.yaml | grep -q "sandbox/sbx-demo-1 unchanged" || fail "second apply changed something"

step "sandboxes converge to Running, gated by their readiness probes"
sbxctl wait sandbox/sbx-demo-1 --for phase=Running --timeout 30s || fail "sbx-demo-1 not Running"
sbxctl wait sandbox/sbx-multi-1 --for phase=Running --timeout 30s || fail "sbx-multi-1 not Running"
sbxctl wait sandbox/sbx-isolated --for phase=Running --timeout 30s || fail "sbx-isolated (gvisor class) not Running"
sbxctl get sandboxes -o wide

step "the unschedulable one says why"
sbxctl get sandbox sbx-too-big -o json | grep -q '"reason": "Unschedulable"' || fail "no Unschedulable reason"
if sbxctl wait sandbox/sbx-too-big --for phase=Running --timeout 1s; then fail "wait should have timed out"; fi

step "the published port answers at external:host_port"
external=$(sbxctl get sandbox sbx-demo-1 -o json | python3 -c 'import json,sys; s=json.load(sys.stdin)["status"]; print(s["external"]+":"+str(s["assigned_ports"][0]["host_port"]))')
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$external/")
[ "$code" = 200 ] || fail "published port answered $code"
echo "http://$external/ -> $code"

step "logs through the node proxy"
sbxctl logs sbx-demo-1 --tail 2 | grep -q '^\[web\]' || fail "no logs"

step "drain sbx-demo-1's node: it is created again on another node under the same id"
node_of() { sbxctl get sandbox "$1" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"].get("node_name", ""))'; }
drained=$(node_of sbx-demo-1)
sbxctl drain "$drained" --grace-period 1s --timeout 60s || fail "drain of $drained did not finish"
sbxctl wait sandbox/sbx-demo-1 --for phase=Running --timeout 30s || fail "sbx-demo-1 not Running after the drain"
moved=$(node_of sbx-demo-1)
[ -n "$moved" ] && [ "$moved" != "$drained" ] || fail "sbx-demo-1 did not move off $drained (on '$moved')"
sbxctl describe sandbox sbx-demo-1 | grep -q "^Reschedules: *1" || fail "describe does not show the reschedule"
sbxctl get nodes | grep "^$drained " | grep -q SchedulingDisabled || fail "$drained is not left cordoned"
echo "sbx-demo-1: $drained -> $moved"
sbxctl uncordon "$drained"

step "delete and wait until it is gone from the store and its agent"
sbxctl delete sandbox sbx-demo-1 --wait --timeout 30s || fail "delete --wait"
if sbxctl get sandbox sbx-demo-1 >/dev/null 2>&1; then fail "sbx-demo-1 still there"; fi

step "graceful stop"
kill -TERM "$server"
wait "$server" || fail "server exited non-zero on SIGTERM"
trap 'rm -rf "$work"' EXIT
echo
echo "demo: every step passed"
