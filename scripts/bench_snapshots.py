#!/usr/bin/env python3
"""Snapshot benchmark (called by scripts/bench.sh, which sets up the daemon and podman).

For sandboxes holding 10 MB, 200 MB and 1 GB of changes in 10 KiB files, measures
`sandbox snapshot` and `sandbox rollback` (medians), and side by side `podman commit` of a
container holding the same files and a plain `cp -a` of the files. Then `sandbox diff`
between two snapshots 10,000 changed files apart. Last, a checkpoint and restore of a small
process tree (a shell loop and its `sleep`): `sandbox snapshot --with-processes` and a
rollback to it, against `podman container checkpoint` and `restore` of the same loop.
Prints a Markdown section.
"""
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time

sandbox, podman_cmd, work, runs = sys.argv[1], sys.argv[2].split(), sys.argv[3], int(sys.argv[4])
FILE = 10 * 1024


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def timed(cmd, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        run(cmd)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def files_tar(count, tag):
    """A tar of `count` 10 KiB files under data/, contents depending on `tag`."""
    buf = io.BytesIO()
    block = (tag.encode() * (FILE // len(tag) + 1))[:FILE]
    with tarfile.open(fileobj=buf, mode="w") as t:
        for i in range(count):
            info = tarfile.TarInfo(f"data/d{i // 1000}/f{i}")
            info.size = FILE
            t.addfile(info, io.BytesIO(block))
    return buf.getvalue()


rows = []
for label, count in [("10 MB", 1000), ("200 MB", 20000), ("1 GB", 100000)]:
    name = f"snapbench-{count}"
    run([sandbox, "create", name, "--image", "bench-busybox", "--memory", "2Gi"])
    data = files_tar(count, f"size{count}")
    run([sandbox, "exec", "-i", name, "--", "busybox", "tar", "-x", "-C", "/work"], input=data)
    run([sandbox, "snapshot", name, "base"])
    snap = timed([sandbox, "snapshot", name], runs)
    roll = timed([sandbox, "rollback", name, "--to", "base"], runs)
    # Peers: a container with the same files, committed; a plain copy of the files.
    ctr = f"snapbench-{count}"
    run(podman_cmd + ["run", "-d", "--name", ctr, "--network=none", "bench-busybox", "sleep", "100000"])
    run(podman_cmd + ["exec", "-i", ctr, "busybox", "tar", "-x", "-C", "/"], input=data)
    commit = timed(podman_cmd + ["commit", "-q", ctr, f"snapbench-img-{count}"], max(2, runs // 10))
    src = os.path.join(work, f"copy-src-{count}")
    os.makedirs(src, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        t.extractall(src)
    copies = []
    for i in range(max(2, runs // 10)):
        dst = os.path.join(work, f"copy-dst-{count}-{i}")
        t = time.perf_counter()
        run(["cp", "-a", src, dst])
        copies.append((time.perf_counter() - t) * 1000)
        run(["rm", "-rf", dst])
    copy = statistics.median(copies)
    run(["rm", "-rf", src])
    run(podman_cmd + ["rm", "-f", ctr])
    run(podman_cmd + ["rmi", "-f", f"snapbench-img-{count}"])
    rows.append((label, count, snap, roll, commit, copy))
    if count == 100000:
        big = name
    else:
        run([sandbox, "destroy", "--force", name])

run([sandbox, "destroy", "--force", big])

# Diff: two snapshots 10,000 new files apart.
run([sandbox, "create", "diffbench", "--image", "bench-busybox"])
run([sandbox, "snapshot", "diffbench", "empty"])
run([sandbox, "exec", "-i", "diffbench", "--", "busybox", "tar", "-x", "-C", "/work"], input=files_tar(10000, "changed"))
run([sandbox, "snapshot", "diffbench", "changed"])
diff_args = [sandbox, "diff", "diffbench", "--from", "empty", "--to", "changed", "--format", "json"]
diff = timed(diff_args, runs)
changes = len(json.loads(run(diff_args).stdout)["changes"])
run([sandbox, "destroy", "--force", "diffbench"])

# Processes: a shell loop (and its sleep) checkpointed and restored.
LOOP = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"
run([sandbox, "create", "cprbench", "--image", "bench-busybox"])
run([sandbox, "exec", "cprbench", f"sh -c '{LOOP}' >/dev/null 2>&1 &"])
time.sleep(0.3)
run([sandbox, "snapshot", "cprbench", "live", "--with-processes"])
cp_runs = max(5, runs // 2)
checkpoint = timed([sandbox, "snapshot", "cprbench", "--with-processes"], cp_runs)
restore = timed([sandbox, "rollback", "cprbench", "--to", "live"], cp_runs)
loop_count = run([sandbox, "exec", "cprbench", "cat /tmp/count"]).stdout.decode().strip()
run([sandbox, "destroy", "--force", "cprbench"])
ctr = "cprbench"
run(podman_cmd + ["run", "-d", "--name", ctr, "--network=none", "bench-busybox", "sh", "-c", LOOP])
time.sleep(0.3)
p_checkpoint, p_restore = [], []
for _ in range(max(3, runs // 4)):
    t = time.perf_counter()
    run(podman_cmd + ["container", "checkpoint", ctr])
    p_checkpoint.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    run(podman_cmd + ["container", "restore", ctr])
    p_restore.append((time.perf_counter() - t) * 1000)
run(podman_cmd + ["rm", "-f", ctr])
p_checkpoint, p_restore = statistics.median(p_checkpoint), statistics.median(p_restore)

small = rows[0]
print("## Snapshots and rollback (changes in 10 KiB files)")
print()
print("| changes | files | sandbox snapshot | sandbox rollback | podman commit | cp -a | snapshot vs 10 MB |")
print("|---|---|---|---|---|---|---|")
for label, count, snap, roll, commit, copy in rows:
    print(f"| {label} | {count} | {snap:.1f} ms | {roll:.1f} ms | {commit:.0f} ms | {copy:.0f} ms | {snap / small[2]:.2f}x |")
print()
print(f"`sandbox diff` between two snapshots {changes} changes apart: {diff:.1f} ms (median of {runs}).")
print()
print("## Checkpoint and restore with processes (a shell loop and its sleep)")
print()
print("| | dev-box | podman | ratio |")
print("|---|---|---|---|")
print(f"| checkpoint | {checkpoint:.0f} ms (`snapshot --with-processes`; keeps running) | {p_checkpoint:.0f} ms (`container checkpoint`; stops) | {p_checkpoint / checkpoint:.1f}x |")
print(f"| restore | {restore:.0f} ms (`rollback --to`: stop, files back, restore) | {p_restore:.0f} ms (`container restore`) | {p_restore / restore:.1f}x |")
print()
print(f"Medians of {cp_runs} (dev-box) and {max(3, runs // 4)} (podman) runs; the loop's count after the rollbacks: {loop_count}.")
print()
