#!/usr/bin/env bash
# Benchmarks dev-box against its peers, side by side, on the same busybox root filesystem:
#
#   start+run+destroy: `sandbox run --rm -- true`  vs  `podman run --rm`, `runc run`, `bwrap`
#   the same with a network: `sandbox run --rm --network allow --allow example.test -- true`
#              vs without one, vs `podman run --rm --network bridge` (podman's default
#              bridge, netavark; the command is `true`, so no packet leaves the host)
#   exec into a running sandbox: `sandbox exec`      vs  `podman exec`
#   idle cost: host memory per idle sandbox (50 by default; BENCH_IDLE=500 for the scale test)
#   snapshots: snapshot and rollback with 10 MB, 200 MB and 1 GB of changes  vs  podman commit,
#              cp -a; diff between two snapshots 10,000 files apart (scripts/bench_snapshots.py)
#   command checks: parse + rules + policies for commands up to 4 KB
#                   (crates/devbox-safety/benches/validate.rs)
#   networks: netns+veth+nft create/remove, a cached allowed name from the daemon's resolver,
#             TCP throughput sandbox->world through veth, rules and NAT vs from the daemon's
#             namespace (crates/devbox-net/tests/net.rs bench_network, in namespaces it makes)
#   monitoring: `sandbox stats` of 200 running sandboxes in one call (BENCH_STATS to change),
#               CLI included, and the daemon's side alone (GET /v1/stats, scripts/bench_stats.py);
#               the daemon's CPU over a minute with 200 idle sandboxes, monitoring loops on vs
#               off (scripts/bench_monitoring.sh; BENCH_MON_SANDBOXES, BENCH_MON_SECONDS)
#   idle wake: `sandbox exec -- true` into a sandbox its idle handling froze (spec.idle,
#              after 100ms; each run waits 300 ms first so that it is frozen) vs into a running
#              one (same wait); and the thaw alone as the daemon measured it (idle.wake took_us)
#
# Prints medians and ratios and writes them to bench-results/. Needs root. Installs the peers
# from Debian (scripts/deps.sh bench) and builds dev-box in release mode.
# Usage (as root): scripts/bench.sh            (BENCH_RUNS=100 BENCH_IDLE=500 to change sizes;
#                                              BENCH_SKIP_SNAPSHOTS=1 leaves out the slow part)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "scripts/bench.sh needs root" >&2; exit 1; }

runs=${BENCH_RUNS:-60}
idle=${BENCH_IDLE:-50}
scripts/deps.sh bench
cargo build --release --locked -q
bin=${CARGO_TARGET_DIR:-$PWD/target}/release

work=$(mktemp -d /tmp/devbox-bench.XXXXXX)
chmod 711 "$work"
out=$PWD/bench-results
mkdir -p "$out"
export DEVBOX_STATE_DIR=$work/state DEVBOX_RUNTIME_DIR=$work/run DEVBOX_POOL_SIZE=8G
export DEVBOX_CGROUP_PARENT=devbox-bench DEVBOX_NO_AUTOSTART=1
export CONTAINERS_CONF=$work/containers.conf
podman=(podman --root "$work/podman/storage" --runroot "$work/podman/run")
daemon_pid=
cleanup() {
  set +e
  "$bin/sandbox" ls -q 2>/dev/null | xargs -r -n 50 "$bin/sandbox" destroy --force >/dev/null 2>&1
  [[ -n $daemon_pid ]] && kill "$daemon_pid" && wait "$daemon_pid" 2>/dev/null
  "${podman[@]}" rm -f -a >/dev/null 2>&1
  "${podman[@]}" system reset -f >/dev/null 2>&1
  umount "$work/state/pool" 2>/dev/null
  umount -R "$work/podman/storage/overlay" 2>/dev/null
  rm -rf "$work"
  # The (now empty) parent cgroup of the bench's sandboxes.
  rmdir /sys/fs/cgroup/*/devbox-bench /sys/fs/cgroup/devbox-bench 2>/dev/null
}
trap cleanup EXIT

# The common root filesystem: busybox.
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,proc,dev,sys,etc,tmp,work}
cp /bin/busybox "$rootfs/bin/"
for a in sh true echo cat sleep; do ln -sf busybox "$rootfs/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
tar -C "$rootfs" -cf "$work/busybox.tar" .

# dev-box
"$bin/sandboxd" 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do [[ -S $work/run/api.sock ]] && break; sleep 0.1; done
"$bin/sandbox" image import "$work/busybox.tar" --name bench-busybox >/dev/null
"$bin/sandbox" create bench-exec --image bench-busybox >/dev/null

# podman
cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
EOF
"${podman[@]}" import "$work/busybox.tar" bench-busybox >/dev/null
"${podman[@]}" run -d --name bench-exec --network=none bench-busybox sleep 100000 >/dev/null

# runc
mkdir -p "$work/bundle"
(cd "$work/bundle" && runc spec)
python3 - "$work/bundle/config.json" "$rootfs" <<'EOF'
import json, sys
path, rootfs = sys.argv[1], sys.argv[2]
c = json.load(open(path))
c["root"] = {"path": rootfs, "readonly": True}
c["process"]["args"] = ["/bin/true"]
c["process"]["terminal"] = False
json.dump(c, open(path, "w"))
EOF

echo "== start, run \`true\`, destroy ($runs runs each)"
hyperfine -N --warmup 5 --runs "$runs" --export-json "$work/start.json" \
  -n "dev-box (sandbox run --rm)" "$bin/sandbox run --rm --image bench-busybox -- true" \
  -n "dev-box, host image" "$bin/sandbox run --rm -- true" \
  -n "podman run --rm" "${podman[*]} run --rm --network=none bench-busybox true" \
  -n "runc run" "runc run -b $work/bundle bench-runc" \
  -n "bwrap" "bwrap --unshare-all --ro-bind $rootfs / --proc /proc --dev /dev /bin/true" \
  >/dev/null

echo "== start, run \`true\`, destroy, with a network ($runs runs each)"
hyperfine -N --warmup 5 --runs "$runs" --export-json "$work/start_net.json" \
  -n "dev-box, no network (sandbox run --rm)" "$bin/sandbox run --rm --image bench-busybox -- true" \
  -n "dev-box, --network allow --allow example.test" "$bin/sandbox run --rm --image bench-busybox --network allow --allow example.test -- true" \
  -n "dev-box, --network open" "$bin/sandbox run --rm --image bench-busybox --network open -- true" \
  -n "podman run --rm --network bridge" "${podman[*]} run --rm --network=bridge bench-busybox true" \
  >/dev/null

echo "== exec into a running sandbox ($runs runs each)"
hyperfine -N --warmup 5 --runs "$runs" --export-json "$work/exec.json" \
  -n "dev-box (sandbox exec)" "$bin/sandbox exec bench-exec -- true" \
  -n "dev-box (sandbox exec --timeout, own cgroup)" "$bin/sandbox exec --timeout 1h bench-exec -- true" \
  -n "podman exec" "${podman[*]} exec bench-exec true" \
  >/dev/null

echo "== idle cost ($idle idle sandboxes)"
mem_used() { awk '/MemTotal/{t=$2} /MemAvailable/{a=$2} END{print (t-a)*1024}' /proc/meminfo; }
daemon_rss() { awk '/VmRSS/{print $2*1024}' "/proc/$daemon_pid/status"; }
sync
sleep 1
before=$(mem_used)
rss_before=$(daemon_rss)
begin=$(date +%s.%N)
for i in $(seq 1 "$idle"); do
  "$bin/sandbox" create "idle-$i" --image bench-busybox >/dev/null
done
end=$(date +%s.%N)
sleep 2
after=$(mem_used)
rss_after=$(daemon_rss)
running=$("$bin/sandbox" ls --format json | python3 -c 'import json,sys; print(sum(1 for s in json.load(sys.stdin) if s["state"]=="running" and s["name"].startswith("idle-")))')
last_ok=$("$bin/sandbox" exec "idle-$idle" -- echo ok)
cgmem=$("$bin/sandbox" ls --format json | python3 -c 'import json,sys; l=[s["usage"]["memory_bytes"] for s in json.load(sys.stdin) if s["name"].startswith("idle-")]; print(sum(l)//max(len(l),1))')
pss=0
for p in $(pgrep -f "sandbox-init launch"); do
  if grep -q "NSpid:.*[0-9][[:space:]]\+1$" "/proc/$p/status" 2>/dev/null; then
    pss=$((pss + $(awk '/^Pss:/{print $2*1024}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)))
  fi
done
for i in $(seq 1 "$idle"); do echo "idle-$i"; done | xargs -n 50 "$bin/sandbox" destroy --force

echo "== monitoring: sandbox stats with ${BENCH_STATS:-200} running sandboxes"
nstats=${BENCH_STATS:-200}
for i in $(seq 1 "$nstats"); do
  "$bin/sandbox" create "stats-$i" --image bench-busybox >/dev/null
done
# One warm-up (it gives each sandbox the CPU sample later calls average from).
"$bin/sandbox" stats --format json >/dev/null
hyperfine -N --warmup 3 --runs "$runs" --export-json "$work/stats.json" \
  -n "sandbox stats ($nstats running, CLI included)" "$bin/sandbox stats --format json" \
  >/dev/null
python3 scripts/bench_stats.py "$work/run/api.sock" "$runs" > "$work/stats_api.txt"
for i in $(seq 1 "$nstats"); do echo "stats-$i"; done | xargs -n 50 "$bin/sandbox" destroy --force

echo "== idle wake: exec into a frozen idle sandbox vs a running one ($runs runs each)"
for n in awake frozen; do
  idle_spec=
  [[ $n == frozen ]] && idle_spec="  idle: {after: 100ms, action: freeze}"
  printf 'apiVersion: sandbox.io/v1\nkind: Sandbox\nmetadata: {name: bench-%s}\nspec:\n  image: bench-busybox\n%s\n' \
    "$n" "$idle_spec" > "$work/idle-$n.yaml"
  "$bin/sandbox" create -f "$work/idle-$n.yaml" >/dev/null
done
hyperfine -N --warmup 3 --runs "$runs" --prepare "sleep 0.3" --export-json "$work/idle.json" \
  -n "exec into a running sandbox" "$bin/sandbox exec bench-awake -- true" \
  -n "exec into a frozen idle sandbox (thawed first)" "$bin/sandbox exec bench-frozen -- true" \
  >/dev/null
"$bin/sandbox" audit --format json --sandbox bench-frozen > "$work/idle_audit.json"
"$bin/sandbox" destroy --force bench-awake bench-frozen >/dev/null
echo "== monitoring cost: ${BENCH_MON_SANDBOXES:-200} idle sandboxes, daemon CPU with and without monitoring"
scripts/bench_monitoring.sh "$bin" > "$work/monitoring_cost.md"

echo "== snapshots (10 MB, 200 MB, 1 GB of changes)"
if [[ -n ${BENCH_SKIP_SNAPSHOTS:-} ]]; then
  echo "(snapshots skipped: BENCH_SKIP_SNAPSHOTS)" > "$work/snapshots.md"
else
  python3 scripts/bench_snapshots.py "$bin/sandbox" "${podman[*]}" "$work" "${BENCH_SNAP_RUNS:-20}" > "$work/snapshots.md"
fi

echo "== command checks (in-process: parse, rules, policies)"
cargo bench -q -p devbox-safety --bench validate 2>/dev/null | grep '^|' > "$work/validate.md"

echo "== networks (in test-made namespaces only)"
cargo test -q --release -p devbox-net --test net -- --ignored bench_network --nocapture 2>/dev/null \
  | grep '^bench' | sed 's/^bench /- /' > "$work/network.md"

python3 - "$work" "$out" "$idle" "$before" "$after" "$rss_before" "$rss_after" "$running" "$last_ok" "$cgmem" "$pss" "$begin" "$end" <<'EOF'
import json, sys, platform, datetime
work, out, idle = sys.argv[1], sys.argv[2], int(sys.argv[3])
before, after, rss_b, rss_a = (int(float(x)) for x in sys.argv[4:8])
running, last_ok, cgmem, pss = int(sys.argv[8]), sys.argv[9], int(sys.argv[10]), int(sys.argv[11])
begin, end = float(sys.argv[12]), float(sys.argv[13])
lines = [f"# dev-box benchmark, {datetime.date.today()} ({platform.node()}, {platform.release()}, 2 cores)", ""]
def table(path, title):
    rs = json.load(open(path))["results"]
    base = rs[0]["median"]
    lines.append(f"## {title}")
    lines.append("")
    lines.append("| command | median | mean ± σ | min | ratio to dev-box |")
    lines.append("|---|---|---|---|---|")
    for r in rs:
        lines.append(f"| {r['command']} | {r['median']*1000:.1f} ms | {r['mean']*1000:.1f} ± {r['stddev']*1000:.1f} ms | {r['min']*1000:.1f} ms | {r['median']/base:.1f}x |")
    lines.append("")
table(f"{work}/start.json", "Start, run `true`, destroy")
table(f"{work}/start_net.json", "Start, run `true`, destroy, with a network")
rs = {r["command"]: r["median"] for r in json.load(open(f"{work}/start_net.json"))["results"]}
none = rs["dev-box, no network (sandbox run --rm)"]
allow = rs["dev-box, --network allow --allow example.test"]
podman_net = rs["podman run --rm --network bridge"]
lines += [f"- `--network allow` / no network: {allow / none:.2f}x (target: at most 1.5x)",
          f"- podman with its bridge / dev-box `--network allow`: {podman_net / allow:.1f}x (target: at least 10x)", ""]
table(f"{work}/exec.json", "Exec into a running sandbox")
mib = 1 << 20
lines += [
    f"## Idle sandboxes: {idle}",
    "",
    f"- all running: {running == idle} ({running} of {idle}); exec into the last one: {last_ok!r}",
    f"- created in {end - begin:.1f} s ({(end - begin) / idle * 1000:.1f} ms each, CLI included)",
    f"- host memory per idle sandbox (MemTotal - MemAvailable, delta / {idle}): {(after - before) / idle / mib:.2f} MiB",
    f"- of which charged to each sandbox's cgroup (its init, page tables, kernel objects): {cgmem / mib:.2f} MiB",
    f"- proportional set size of each sandbox's init process: {pss / max(idle,1) / mib:.2f} MiB",
    f"- daemon RSS growth per sandbox: {(rss_a - rss_b) / idle / 1024:.1f} KiB",
    "",
]
lines.append(open(f"{work}/snapshots.md").read())
lines += ["", "## Command checks (what a check adds to an exec, default policy)", "", open(f"{work}/validate.md").read()]
lines += ["", "## Networks", "", open(f"{work}/network.md").read()]
lines.append("")
table(f"{work}/stats.json", "Monitoring: `sandbox stats` of running sandboxes in one call")
lines += [f"- the daemon's side alone (GET /v1/stats over the socket), median: {open(f'{work}/stats_api.txt').read().strip()} ms", ""]
table(f"{work}/idle.json", "Idle wake: exec into a frozen idle sandbox")
rs = {r["command"]: r["median"] for r in json.load(open(f"{work}/idle.json"))["results"]}
awake = rs["exec into a running sandbox"]
frozen = rs["exec into a frozen idle sandbox (thawed first)"]
recs = json.load(open(f"{work}/idle_audit.json"))
wakes = sorted(r["detail"]["took_us"] for r in recs if r["action"] == "idle.wake" and "took_us" in r["detail"])
freezes = sum(1 for r in recs if r["action"] == "idle.freeze")
lines += [f"- waking adds (median frozen - median running): {(frozen - awake) * 1000:.2f} ms (target: at most 5 ms)",
          f"- the thaw alone, as the daemon measured it (idle.wake took_us), median of {len(wakes)}: "
          + (f"{wakes[len(wakes) // 2] / 1000:.2f} ms" if wakes else "none recorded"),
          f"- freezes recorded: {freezes} (one before each run that woke it)", ""]
lines += ["", open(f"{work}/monitoring_cost.md").read()]
text = "\n".join(lines)
print(text)
open(f"{out}/results.md", "w").write(text + "\n")
EOF
