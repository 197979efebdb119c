#!/usr/bin/env bash
# The one test command (README): installs what the tests need on a fresh machine, then
# runs every test: lints, Rust unit/property/integration tests (rdkafka against a real
# `ferrite server`), and the Python (confluent-kafka, kafka-python) and kcat suites.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh

echo "== rustfmt"
cargo fmt --all --check

echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --workspace --locked

echo "== fuzz targets build (runs need nightly; the same properties run as proptests above)"
cargo check --manifest-path fuzz/Cargo.toml

echo "== python + kcat suites"
export FERRITE_BIN="$PWD/target/debug/ferrite"
python3 -m pytest -q -p no:cacheprovider tests/python
