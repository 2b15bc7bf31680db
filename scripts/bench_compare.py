#!/usr/bin/env python3
"""Two builds of dev-box side by side: is one slower than the other?

Usage (as root): scripts/bench_compare.py BEFORE_BIN_DIR AFTER_BIN_DIR [ROUNDS]

Each directory holds release `sandbox`, `sandboxd` and `sandbox-init`. Each build gets a
private daemon (state, runtime dir, pool, cgroup parent of its own) and the same busybox
image. Rounds alternate between the builds (before, after, before, ...) so that a machine
getting busier or quieter weighs on both alike. Per round and build it times:

  run --rm -- true          create, start, run, destroy
  exec -- true              into a running sandbox
  snapshot                  of a sandbox holding 10 MB of changes
  rollback --to             that sandbox back to its base snapshot
  snapshot --with-processes a busybox shell loop and its sleep (CRIU), and the rollback

and prints the median of every operation per build and the after/before ratio.
"""
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

before, after = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
N = {"run --rm": 20, "exec": 40, "snapshot": 15, "rollback": 15, "checkpoint": 5, "restore": 5}


def run(cmd, env, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kw)


def busybox_tar():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for d in ["bin", "proc", "dev", "sys", "etc", "tmp", "work"]:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            t.addfile(info)
        t.add("/bin/busybox", "bin/busybox")
        for a in ["sh", "true", "echo", "cat", "sleep", "tar"]:
            info = tarfile.TarInfo(f"bin/{a}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            t.addfile(info)
        pw = b"root:x:0:0:root:/root:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(pw)
        t.addfile(info, io.BytesIO(pw))
    return buf.getvalue()


def files_tar(count):
    buf = io.BytesIO()
    block = b"x" * 10240
    with tarfile.open(fileobj=buf, mode="w") as t:
        for i in range(count):
            info = tarfile.TarInfo(f"data/f{i}")
            info.size = len(block)
            t.addfile(info, io.BytesIO(block))
    return buf.getvalue()


class Build:
    def __init__(self, label, bindir, work):
        self.label, self.bin = label, bindir
        root = os.path.join(work, label)
        os.makedirs(root)
        self.env = dict(
            os.environ,
            DEVBOX_STATE_DIR=f"{root}/state",
            DEVBOX_RUNTIME_DIR=f"{root}/run",
            DEVBOX_SOCKET=f"{root}/run/api.sock",
            DEVBOX_POOL_SIZE="4G",
            DEVBOX_CGROUP_PARENT=f"devbox-cmp-{label}-{os.getpid()}",
            DEVBOX_NO_AUTOSTART="1",
            DEVBOX_UID_REGISTRY=f"{work}/uid-ranges.json",
        )
        self.root = root
        self.daemon = subprocess.Popen(
            [f"{bindir}/sandboxd"], env=self.env, stderr=open(f"{root}/daemon.log", "w")
        )
        for _ in range(200):
            if os.path.exists(f"{root}/run/api.sock"):
                break
            time.sleep(0.05)
        tar = f"{root}/busybox.tar"
        with open(tar, "wb") as f:
            f.write(busybox_tar())
        self.sb("image", "import", tar, "--name", "cmp-busybox")
        self.sb("create", "idle", "--image", "cmp-busybox")
        self.sb("create", "snap", "--image", "cmp-busybox")
        run([f"{bindir}/sandbox", "exec", "-i", "snap", "--", "tar", "-x", "-C", "/work"],
            self.env, input=files_tar(1000))
        self.sb("snapshot", "snap", "base")
        self.sb("create", "loop", "--image", "cmp-busybox")
        self.sb("exec", "loop", "--", "sh", "-c",
                "(i=0; while :; do i=$((i+1)); sleep 0.2; done) > /dev/null 2>&1 &")
        self.times = {k: [] for k in N}

    def sb(self, *args):
        return run([f"{self.bin}/sandbox", *args], self.env)

    def timed(self, key, *args, n=None):
        for _ in range(n or N[key]):
            t = time.perf_counter()
            self.sb(*args)
            self.times[key].append((time.perf_counter() - t) * 1000)

    def round(self, i):
        self.timed("run --rm", "run", "--rm", "--image", "cmp-busybox", "--", "true")
        self.timed("exec", "exec", "idle", "--", "true")
        self.timed("snapshot", "snapshot", "snap")
        self.timed("rollback", "rollback", "snap", "--to", "base")
        for j in range(N["checkpoint"]):
            name = f"cp-{i}-{j}"
            t = time.perf_counter()
            self.sb("snapshot", "loop", name, "--with-processes")
            self.times["checkpoint"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            self.sb("rollback", "loop", "--to", name)
            self.times["restore"].append((time.perf_counter() - t) * 1000)

    def close(self):
        try:
            out = self.sb("ls", "-q").stdout.decode().split()
            if out:
                self.sb("destroy", "--force", *out)
            self.sb("image", "rm", "cmp-busybox")
        finally:
            self.daemon.terminate()
            self.daemon.wait()
            subprocess.run(["umount", f"{self.root}/state/pool"], stderr=subprocess.DEVNULL)
            for d in os.listdir("/sys/fs/cgroup"):
                p = f"/sys/fs/cgroup/{d}/{self.env['DEVBOX_CGROUP_PARENT']}"
                if os.path.isdir(p):
                    try:
                        os.rmdir(p)
                    except OSError:
                        pass


def main():
    if os.geteuid() != 0:
        sys.exit("bench_compare.py needs root")
    work = tempfile.mkdtemp(prefix="devbox-cmp-")
    os.chmod(work, 0o711)
    builds = []
    try:
        builds = [Build("before", before, work), Build("after", after, work)]
        for i in range(rounds):
            for b in builds:
                b.round(i)
        print(f"| operation (median of {rounds} rounds, ms) | before | after | after/before |")
        print("|---|---|---|---|")
        for key in N:
            a = statistics.median(builds[0].times[key])
            b = statistics.median(builds[1].times[key])
            print(f"| {key} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    finally:
        for b in builds:
            b.close()
        subprocess.run(["rm", "-rf", work])


main()
