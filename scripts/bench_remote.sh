#!/usr/bin/env bash
# The API over TCP: exec round trips of `true` through a daemon listening on 127.0.0.1 with
# TLS (a self-signed certificate made here) and a token, beside the same over its Unix
# socket; one client (the round trip), then 100 concurrent clients each running 50 execs
# (errors and p99). REST exec and the exec WebSocket both. Loopback only; every loop is
# bounded. Target: one exec over TCP+TLS with a token in 5 ms median or less.
#
# Usage (as root): scripts/bench_remote.sh [BIN_DIR]
#   BIN_DIR: where sandbox, sandboxd, sandbox-init and the bench_remote example are
#   (default: the release build; build them with
#   `cargo build --release --workspace && cargo build --release --example bench_remote -p devbox-cli`).
#   BENCH_REMOTE_N (200 execs alone), BENCH_REMOTE_CLIENTS (100), BENCH_REMOTE_EACH (50).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "scripts/bench_remote.sh needs root" >&2; exit 1; }
bin=${1:-${CARGO_TARGET_DIR:-$PWD/target}/release}
n=${BENCH_REMOTE_N:-200}
clients=${BENCH_REMOTE_CLIENTS:-100}
each=${BENCH_REMOTE_EACH:-50}
bench=$bin/examples/bench_remote
for b in sandbox sandboxd sandbox-init examples/bench_remote; do
  [[ -x $bin/$b ]] || { echo "missing $bin/$b: build it first (see the usage above)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/devbox-bench-remote.XXXXXX)
chmod 711 "$work"
export DEVBOX_STATE_DIR=$work/state DEVBOX_RUNTIME_DIR=$work/run DEVBOX_POOL_SIZE=4G
export DEVBOX_SOCKET=$work/run/api.sock
export DEVBOX_CGROUP_PARENT=devbox-bench-remote DEVBOX_NO_AUTOSTART=1
unset DEVBOX_POOL DEVBOX_HOST DEVBOX_TOKEN DEVBOX_CA_CERT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -addext basicConstraints=critical,CA:FALSE \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
daemon_pid=
cleanup() {
  set +e
  "$bin/sandbox" destroy --force bench >/dev/null 2>&1
  [[ -n $daemon_pid ]] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  umount "$work/state/pool" 2>/dev/null
  rm -rf "$work"
  rmdir /sys/fs/cgroup/*/devbox-bench-remote /sys/fs/cgroup/devbox-bench-remote 2>/dev/null
}
trap cleanup EXIT
"$bin/sandboxd" --listen 127.0.0.1:0 --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" \
  --token-rate 100000 --token-max-execs 1000 2>>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 300); do [[ -S $DEVBOX_SOCKET && -s $work/run/api.addr ]] && break; sleep 0.1; done
[[ -s $work/run/api.addr ]] || { echo "the daemon did not start:" >&2; cat "$work/daemon.log" >&2; exit 1; }
addr=$(cat "$work/run/api.addr")
"$bin/sandbox" create bench >/dev/null
token=$("$bin/sandbox" token create bench --scope read,exec 2>/dev/null)

echo "== one client, $n execs of true"
echo -n "unix socket, root:        "; "$bench" bench 1 "$n"
echo -n "unix socket, root:        "; "$bench" bench 1 "$n" --stream
echo -n "TCP+TLS, token:           "; DEVBOX_HOST=https://localhost:${addr##*:} DEVBOX_TOKEN=$token DEVBOX_CA_CERT=$work/cert.pem "$bench" bench 1 "$n"
echo -n "TCP+TLS, token:           "; DEVBOX_HOST=https://localhost:${addr##*:} DEVBOX_TOKEN=$token DEVBOX_CA_CERT=$work/cert.pem "$bench" bench 1 "$n" --stream
echo "== $clients concurrent clients, $each execs each"
echo -n "TCP+TLS, token:           "; DEVBOX_HOST=https://localhost:${addr##*:} DEVBOX_TOKEN=$token DEVBOX_CA_CERT=$work/cert.pem "$bench" bench "$clients" "$each"
echo -n "TCP+TLS, token:           "; DEVBOX_HOST=https://localhost:${addr##*:} DEVBOX_TOKEN=$token DEVBOX_CA_CERT=$work/cert.pem "$bench" bench "$clients" "$each" --stream
