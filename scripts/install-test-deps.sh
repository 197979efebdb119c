#!/usr/bin/env bash
# Installs what the test suites need on a fresh Debian machine; a no-op when present.
set -euo pipefail
if ! command -v kcat >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq kcat >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check \
  'confluent-kafka==2.16.1' 'kafka-python==2.3.3' 'pytest>=7,<9' \
  'lz4>=4' 'zstandard>=0.22' 'cramjam>=2.8' 'python-snappy>=0.7'
