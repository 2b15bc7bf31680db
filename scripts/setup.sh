#!/usr/bin/env bash
# One command to set dev-box up and run it: installs the Debian packages it needs, builds it,
# installs `sandbox`, `sandboxd` and `sandbox-init` into $PREFIX/bin (default /usr/local),
# (re)starts the daemon and runs a first sandbox.
# Usage (as root): scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) != 0 ]]; then
  echo "scripts/setup.sh needs root: run it as root (or with sudo)" >&2
  exit 1
fi
prefix=${PREFIX:-/usr/local}
state=${DEVBOX_STATE_DIR:-/var/lib/dev-box}

scripts/deps.sh
echo "building dev-box (release)..." >&2
cargo build --release --locked
out=${CARGO_TARGET_DIR:-target}/release
install -d "$prefix/bin"
install -m 0755 "$out/sandbox" "$out/sandboxd" "$out/sandbox-init" "$prefix/bin/"

# Replace a daemon left by an earlier install; its sandboxes keep running.
if [[ -s $state/daemon.lock ]]; then
  old=$(cat "$state/daemon.lock")
  if kill -0 "$old" 2>/dev/null; then
    kill -TERM "$old"
    for _ in $(seq 50); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
  fi
fi

# The CLI starts the daemon on first use.
"$prefix/bin/sandbox" run --rm -- sh -c 'echo "dev-box is ready: a sandbox ran as $(id -un) on $(uname -sr)"'
"$prefix/bin/sandbox" pool info
