#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace.
# Needs root (the integration tests make real namespaces, cgroups, mounts and btrfs pools).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) != 0 ]]; then
  echo "scripts/test.sh needs root: run it as root (or with sudo)" >&2
  exit 1
fi
scripts/deps.sh
# Style and lints are part of the tests: formatting, and clippy with warnings as errors.
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --all-targets --locked
# The OpenAPI document validates as OpenAPI 3.1 (openapi-spec-validator, from PyPI, in a
# virtual environment kept in the target directory).
target=${CARGO_TARGET_DIR:-target}
venv=$target/pyenv
if [[ ! -x $venv/bin/openapi-spec-validator ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q openapi-spec-validator==0.9.0
fi
"$target/debug/sandbox" api openapi > "$target/openapi.json"
"$venv/bin/openapi-spec-validator" "$target/openapi.json"
cargo test --workspace --locked -- --test-threads="${DEVBOX_TEST_THREADS:-4}"
