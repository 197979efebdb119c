#!/usr/bin/env bash
# Installs what the test suites need on a fresh Debian machine; a no-op when present.
# System packages come from apt (as root, or through sudo): kcat, a C toolchain for the
# bundled librdkafka (gcc, make), python3-venv, and nftables + iproute2 for the fault
# harness (tests/fault). The Python clients go into a virtual
# environment, ./.venv (VENV to move it), never into the system Python, which Debian
# marks externally managed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-$PWD/.venv}"

missing=()
command -v kcat >/dev/null 2>&1 || missing+=(kcat)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
# The fault harness (tests/fault): network namespaces, nftables rules, tc shaping.
command -v nft >/dev/null 2>&1 || missing+=(nftables)
{ command -v ip && command -v tc; } >/dev/null 2>&1 || missing+=(iproute2)
if [ ! -x "$venv/bin/python" ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  echo "== apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust 1.89 or newer with rustup (https://rustup.rs)" >&2
  exit 1
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
  'confluent-kafka==2.16.1' 'kafka-python==3.0.12' 'pytest>=7,<9' \
  'lz4>=4' 'zstandard>=0.22' 'cramjam>=2.8' 'python-snappy>=0.7'
