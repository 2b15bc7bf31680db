#!/usr/bin/env bash
# The daemon's monitoring cost with idle sandboxes: its CPU time (utime + stime, plus
# cutime + cstime of the children it waited for, such as `nft`, from /proc/PID/stat) over a
# window, once with the monitoring loops off (DEVBOX_MONITORING=off:
# no monitor rounds, no blocked-connection poll) and once with them on (the default, with
# global alert rules for memory, disk, exec duration and denied commands, so every rule is
# evaluated). The same sandboxes keep running across the daemon's restart. Prints both CPU
# times, the difference as a share of one core, and the ratio; target: at most 1% of a core.
#
# Usage (as root): scripts/bench_monitoring.sh [BIN_DIR]
#   BIN_DIR: where sandbox, sandboxd and sandbox-init are (default: the release build)
#   BENCH_MON_SANDBOXES (200), BENCH_MON_SECONDS (60), BENCH_MON_SETTLE (10) change sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "scripts/bench_monitoring.sh needs root" >&2; exit 1; }
bin=${1:-${CARGO_TARGET_DIR:-$PWD/target}/release}
n=${BENCH_MON_SANDBOXES:-200}
secs=${BENCH_MON_SECONDS:-60}
settle=${BENCH_MON_SETTLE:-10}

work=$(mktemp -d /tmp/devbox-bench-mon.XXXXXX)
chmod 711 "$work"
export DEVBOX_STATE_DIR=$work/state DEVBOX_RUNTIME_DIR=$work/run DEVBOX_POOL_SIZE=4G
export DEVBOX_CGROUP_PARENT=devbox-bench-mon DEVBOX_NO_AUTOSTART=1
unset DEVBOX_POOL DEVBOX_MONITOR_INTERVAL
cat > "$work/config.yaml" <<'YAML'
alerts:
  memory: 90%
  disk: 90%
  execDuration: 1h
  deniedCommands: {count: 5, within: 10m}
YAML
daemon_pid=
start_daemon() {
  env "$@" "$bin/sandboxd" --config "$work/config.yaml" 2>>"$work/daemon.log" &
  daemon_pid=$!
  for _ in $(seq 300); do [[ -S $work/run/api.sock ]] && return; sleep 0.1; done
  echo "the daemon did not start:" >&2; cat "$work/daemon.log" >&2; exit 1
}
stop_daemon() {
  [[ -n $daemon_pid ]] || return 0
  kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null || true
  daemon_pid=
  rm -f "$work/run/api.sock"
}
cleanup() {
  set +e
  if [[ -z $daemon_pid ]]; then start_daemon; fi
  "$bin/sandbox" ls -q 2>/dev/null | xargs -r -n 50 "$bin/sandbox" destroy --force >/dev/null 2>&1
  stop_daemon
  umount "$work/state/pool" 2>/dev/null
  rm -rf "$work"
  rmdir /sys/fs/cgroup/*/devbox-bench-mon /sys/fs/cgroup/devbox-bench-mon 2>/dev/null
}
trap cleanup EXIT

# CPU seconds the daemon used in `secs` seconds, after `settle` seconds.
cpu_over_window() {
  sleep "$settle"
  local tck a b
  tck=$(getconf CLK_TCK)
  a=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$daemon_pid/stat")
  sleep "$secs"
  b=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$daemon_pid/stat")
  python3 -c "print(f'{($b - $a) / $tck:.2f}')"
}

rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,proc,dev,sys,etc,tmp,work}
cp /bin/busybox "$rootfs/bin/"
for a in sh true sleep; do ln -sf busybox "$rootfs/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
tar -C "$rootfs" -cf "$work/busybox.tar" .

start_daemon
"$bin/sandbox" image import "$work/busybox.tar" --name bench-busybox >/dev/null
for i in $(seq 1 "$n"); do
  "$bin/sandbox" create "mon-$i" --image bench-busybox >/dev/null
done
running=$("$bin/sandbox" ls --format json | python3 -c 'import json,sys; print(sum(1 for s in json.load(sys.stdin) if s["state"]=="running"))')

stop_daemon
start_daemon DEVBOX_MONITORING=off
off=$(cpu_over_window)
stop_daemon
start_daemon
on=$(cpu_over_window)
limit_events=$("$bin/sandbox" events --kind limit,alert --format json | wc -l)

python3 - "$n" "$running" "$secs" "$off" "$on" "$limit_events" <<'PY'
import sys
n, running, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
off, on, events = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
cost = (on - off) / secs * 100
print(f"## Monitoring cost: {n} idle sandboxes ({running} running), daemon CPU over {secs:.0f} s")
print()
print(f"- monitoring loops off (DEVBOX_MONITORING=off): {off:.2f} s CPU ({off / secs * 100:.2f}% of a core)")
print(f"- monitoring on (monitor every 5 s with 4 alert rules, blocked-connection poll every 1 s): {on:.2f} s CPU ({on / secs * 100:.2f}% of a core)")
ratio = f"{on / off:.1f}x" if off > 0 else "off used less than one clock tick (10 ms)"
print(f"- monitoring's cost: {cost:.2f}% of one core (target: at most 1%); on / off: {ratio}")
print(f"- limit and alert events recorded meanwhile: {events}")
PY
