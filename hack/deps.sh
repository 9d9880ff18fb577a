#!/usr/bin/env bash
# Installs what the build and tests need beyond the Rust toolchain, then checks that each piece works.
#
# - protoc and the well-known .proto files (Debian's protobuf-compiler + libprotobuf-dev): the etcd
#   client's gRPC code is generated at build time and imports google/protobuf/descriptor.proto.
# - etcd (Debian's etcd-server): the etcd tests start a throwaway single-member etcd.
# - the real runtime (`sbxlet --runtime runc`) and its tests: runc, iptables, iproute2 (`ip`),
#   docker-registry (a throwaway registry the tests push to) and busybox-static (the test image).
# - gVisor's runsc (Debian's runsc): the `gvisor` runtime class and its tests. As root the check also
#   boots a sandbox (`runsc do true`), as sbxlet's own probe does; where that fails (no ptrace, say)
#   it warns, and the gvisor tests skip loudly.
#
# - promtool (Debian's prometheus): tests lint both binaries' /metrics with `promtool check metrics`
#   and load manifests/observability/prometheus.yml with `promtool check config`.
# - Schemathesis (PyPI, pinned, in the venv .venv-schemathesis): hack/schemathesis/run.sh fuzzes a
#   live server with it; Debian's python3-venv provides the venv module.
#
# Each check does what the build does, not only `command -v`: a protoc without its include files
# passed the old check and then failed the build on a fresh machine.
#
# `hack/deps.sh --check` only checks: it installs nothing and exits 1 naming each missing package.
# `hack/deps.sh --with-stress` also installs stress-ng (Debian), which only hack/stress-suite.sh uses.
set -euo pipefail

with_stress=0
if [ "${1:-}" = "--with-stress" ]; then
  with_stress=1
  shift
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

protoc_compiles_well_known_imports() {
  command -v protoc >/dev/null 2>&1 || return 1
  printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\nmessage Probe { google.protobuf.FileDescriptorProto f = 1; }\n' \
    >"$scratch/probe.proto"
  protoc --proto_path="$scratch" --descriptor_set_out="$scratch/probe.pb" "$scratch/probe.proto" 2>"$scratch/protoc.err"
}

etcd_runs() {
  command -v etcd >/dev/null 2>&1 && etcd --version >/dev/null 2>&1
}

runc_runs() {
  command -v runc >/dev/null 2>&1 && runc --version >/dev/null 2>&1
}

iptables_runs() {
  command -v iptables >/dev/null 2>&1 && iptables --version >/dev/null 2>&1
}

ip_runs() {
  command -v ip >/dev/null 2>&1 && ip -V >/dev/null 2>&1
}

runsc_runs() {
  command -v runsc >/dev/null 2>&1 && runsc --version >/dev/null 2>&1
}

# sbxlet's own probe: a sandbox boots on this machine's platform. Needs root.
runsc_boots() {
  local root="$scratch/runsc-root"
  runsc --root "$root" --network=none do true >"$scratch/runsc.err" 2>&1
}

registry_runs() {
  command -v docker-registry >/dev/null 2>&1 && docker-registry --version >/dev/null 2>&1
}

# The test image copies /bin/busybox into a rootfs of its own, so it must be the static build.
busybox_is_static() {
  [ -x /bin/busybox ] && /bin/busybox true 2>/dev/null && ! ldd /bin/busybox >/dev/null 2>&1
}

# Prints the Debian packages whose check fails.
missing_packages() {
  if ! command -v protoc >/dev/null 2>&1; then
    echo protobuf-compiler libprotobuf-dev
  elif ! protoc_compiles_well_known_imports; then
    echo libprotobuf-dev
  fi
  etcd_runs || echo etcd-server
  runc_runs || echo runc
  iptables_runs || echo iptables
  ip_runs || echo iproute2
  registry_runs || echo docker-registry
  runsc_runs || echo runsc
  busybox_is_static || echo busybox-static
  venv_module_works || echo python3-venv
  promtool_lints || echo prometheus
  if [ "$with_stress" = 1 ]; then
    stress_runs || echo stress-ng
  fi
}

# What the tests run: promtool linting a one-family exposition.
promtool_lints() {
  command -v promtool >/dev/null 2>&1 || return 1
  printf '# HELP probe_total A probe.\n# TYPE probe_total counter\nprobe_total 1\n' | promtool check metrics >/dev/null 2>&1
}

stress_runs() {
  command -v stress-ng >/dev/null 2>&1 && stress-ng --version >/dev/null 2>&1
}

# Exits non-zero with a message that names the package behind each failing check.
check_all() {
  local failed=0
  if ! command -v protoc >/dev/null 2>&1; then
    echo "hack/deps.sh: protoc not found: install Debian's protobuf-compiler" >&2
    failed=1
  elif ! protoc_compiles_well_known_imports; then
    echo "hack/deps.sh: protoc cannot import google/protobuf/descriptor.proto: install Debian's libprotobuf-dev" >&2
    sed 's/^/  protoc: /' "$scratch/protoc.err" >&2 || true
    failed=1
  fi
  if ! etcd_runs; then
    echo "hack/deps.sh: etcd not found or does not run: install Debian's etcd-server" >&2
    failed=1
  fi
  local check
  for check in "runc_runs runc" "iptables_runs iptables" "ip_runs iproute2" "registry_runs docker-registry" \
    "busybox_is_static busybox-static" "runsc_runs runsc" "promtool_lints prometheus"; do
    set -- $check
    if ! "$1"; then
      echo "hack/deps.sh: $1 failed: install Debian's $2" >&2
      failed=1
    fi
  done
  if runsc_runs && [ "$(id -u)" -eq 0 ] && ! runsc_boots; then
    echo "hack/deps.sh: WARNING: runsc is installed but cannot boot a sandbox here; the gvisor tests will skip:" >&2
    sed 's/^/  runsc: /' "$scratch/runsc.err" >&2 || true
  fi
  if [ "$with_stress" = 1 ] && ! stress_runs; then
    echo "hack/deps.sh: stress-ng not found or does not run: install Debian's stress-ng" >&2
    failed=1
  fi
  return "$failed"
}

SCHEMATHESIS_VERSION="4.32.5"
venv_dir="$(cd "$(dirname "$0")/.." && pwd)/.venv-schemathesis"

schemathesis_runs() {
  [ -x "$venv_dir/bin/st" ] && "$venv_dir/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"
}

venv_module_works() {
  python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' >/dev/null 2>&1
}

install_schemathesis() {
  schemathesis_runs && return 0
  rm -rf "$venv_dir"
  python3 -m venv "$venv_dir"
  "$venv_dir/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
  if ! schemathesis_runs; then
    echo "hack/deps.sh: schemathesis $SCHEMATHESIS_VERSION did not install into $venv_dir" >&2
    return 1
  fi
}

if [ "${1:-}" = "--check" ]; then
  status=0
  check_all || status=1
  if ! venv_module_works; then
    echo "hack/deps.sh: python3 cannot make a venv: install Debian's python3-venv" >&2
    status=1
  fi
  if ! schemathesis_runs; then
    echo "hack/deps.sh: schemathesis $SCHEMATHESIS_VERSION missing from $venv_dir: run hack/deps.sh" >&2
    status=1
  fi
  exit "$status"
fi

read -r -a missing <<<"$(missing_packages | tr '\n' ' ')"
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
  fi
  echo "hack/deps.sh: installing ${missing[*]} (Debian packages)" >&2
  $sudo apt-get update -qq
  # etcd-server's package starts a system etcd on 127.0.0.1:2379, and prometheus' a Prometheus on :9090,
  # where systemd runs; tests never use them (they pick free ports and run promtool only).
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
check_all
install_schemathesis
