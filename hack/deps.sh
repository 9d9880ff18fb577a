#!/usr/bin/env bash
# Installs what the build and tests need beyond the Rust toolchain, then checks that each piece works.
#
# - protoc and the well-known .proto files (Debian's protobuf-compiler + libprotobuf-dev): the etcd
#   client's gRPC code is generated at build time and imports google/protobuf/descriptor.proto.
# - etcd (Debian's etcd-server): the etcd tests start a throwaway single-member etcd.
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

# Prints the Debian packages whose check fails.
missing_packages() {
  if ! command -v protoc >/dev/null 2>&1; then
    echo protobuf-compiler libprotobuf-dev
  elif ! protoc_compiles_well_known_imports; then
    echo libprotobuf-dev
  fi
  etcd_runs || echo etcd-server
  if [ "$with_stress" = 1 ]; then
    stress_runs || echo stress-ng
  fi
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
  if [ "$with_stress" = 1 ] && ! stress_runs; then
    echo "hack/deps.sh: stress-ng not found or does not run: install Debian's stress-ng" >&2
    failed=1
  fi
  return "$failed"
}

if [ "${1:-}" = "--check" ]; then
  check_all
  exit
fi

read -r -a missing <<<"$(missing_packages | tr '\n' ' ')"
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
  fi
  echo "hack/deps.sh: installing ${missing[*]} (Debian packages)" >&2
  $sudo apt-get update -qq
  # etcd-server's package starts a system etcd on 127.0.0.1:2379; tests never use it (they pick free ports).
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
check_all
