#!/usr/bin/env bash
# Installs what the build and tests need beyond the Rust toolchain, only if it is missing:
# protoc (the etcd client's gRPC code is generated at build time) and etcd (tests start a throwaway one).
set -euo pipefail

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "installing ${missing[*]} (Debian packages)" >&2
$sudo apt-get update -qq
# etcd-server's package starts a system etcd on 127.0.0.1:2379; tests never use it (they pick free ports).
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
