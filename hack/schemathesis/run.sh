#!/usr/bin/env bash
# Fuzzes a live sandboxd-o with Schemathesis against its own /openapi.json, every check on,
# seeded and bounded. Exits non-zero on any failure.
#
#   hack/schemathesis/run.sh [SANDBOXD_O_BINARY] [MAX_EXAMPLES]   (SCHEMATHESIS_SEED=N for another seed)
#
# The server runs on 127.0.0.1 with an in-memory store and two simulated agents, and with
# SANDBOXD_LOOPBACK_ONLY=1, so nodes the fuzzer registers at random addresses are refused (400)
# or, when named by host name, accepted but never called.
# Schemathesis comes from the venv hack/deps.sh makes (.venv-schemathesis, pinned version).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-$root/target/debug/sandboxd-o}"
examples="${2:-25}"
st="$root/.venv-schemathesis/bin/st"
if [ ! -x "$st" ]; then
  echo "hack/schemathesis/run.sh: $st missing: run hack/deps.sh first" >&2
  exit 1
fi

workdir="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    # A server that does not stop within 10 s is killed, so a hang cannot hold CI.
    for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$workdir"
}
trap cleanup EXIT

port=18382
agent_port=18380
# Plain HTTP so that the fuzzer needs no CA, but with a token: the document declares bearer auth,
# and Schemathesis checks that requests without it are refused.
token="sbx_fuzz_$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
printf '%s\n' "$token" >"$workdir/admin.token"
SANDBOXD_LOOPBACK_ONLY=1 RUST_LOG=warn "$bin" serve --insecure-listen "127.0.0.1:$port" --store memory:// \
  --auth-token-file "$workdir/admin.token" \
  --demo-agents 2 --demo-agent-port "$agent_port" >"$workdir/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null || { cat "$workdir/server.log" >&2; exit 1; }

curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$port/openapi.json" >"$workdir/openapi.json"

cd "$here"
status=0
SCHEMATHESIS_HOOKS=hooks PYTHONPATH="$here" "$st" --config-file "$here/schemathesis.toml" run \
  "$workdir/openapi.json" --url "http://127.0.0.1:$port" -H "Authorization: Bearer $token" \
  --max-examples "$examples" --seed "${SCHEMATHESIS_SEED:-20261202}" --request-timeout 5 --no-color || status=$?
if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "hack/schemathesis/run.sh: the server died during the run:" >&2
  tail -50 "$workdir/server.log" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "hack/schemathesis/run.sh: failures above; the server's last log lines:" >&2
  tail -30 "$workdir/server.log" >&2
fi
exit "$status"
