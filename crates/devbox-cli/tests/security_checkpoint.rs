//! Security of checkpoints and of the seccomp filter (issue 9, findings 2 and 3), as an
//! attacker inside a sandbox would try it:
//!
//! - no process of a sandbox can ptrace its init (attach, seize, `process_vm_readv`,
//!   `/proc/1/mem`, `pidfd_getfd`, ...) before a checkpoint, in the window where init is
//!   parked (dumpable) for one, or after a restore; a dump refuses a traced init;
//! - a restore opens no host file because `checkpoint.json` names it: a tampered one is
//!   refused, the files are rolled back and the sandbox started afresh, saying why;
//! - `socket` and `socketpair` make only unix, inet, inet6 and netlink sockets.
//!
//! The attacks are Python (ctypes) scripts run inside the default "host" image.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestEnv;

/// Every way this script knows of reaching into another process's memory or files, tried
/// on a pid: `python3 attack.py once PID` prints a JSON object `{attempt: outcome}`, where
/// an outcome is `"OK"` when the attempt got through and an errno name when it did not;
/// `python3 attack.py loop PID STOP LOG` repeats them until STOP exists, counting (in LOG,
/// JSON) the rounds, the rounds run while PID was dumpable (its /proc files then belong to
/// the sandbox's root, otherwise to an unmapped uid), and every attempt that got through.
const ATTACK_PY: &str = r#"
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long
libc.syscall.restype = ctypes.c_long
PTRACE_ATTACH, PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 16, 17, 0x4206, 0x4207
SYS_process_vm_readv, SYS_process_vm_writev, SYS_pidfd_open, SYS_pidfd_getfd = 310, 311, 434, 438

class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

def name(e):
    return errno.errorcode.get(e, str(e))

def attempts(pid):
    out = {}
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
        out["attach"] = "OK"
        try:
            os.waitpid(pid, 0x40000000)
        except OSError:
            pass
        libc.ptrace(PTRACE_DETACH, pid, None, None)
    else:
        out["attach"] = name(ctypes.get_errno())
    if libc.ptrace(PTRACE_SEIZE, pid, None, None) == 0:
        out["seize"] = "OK"
        libc.ptrace(PTRACE_INTERRUPT, pid, None, None)
        try:
            os.waitpid(pid, 0x40000000)
        except OSError:
            pass
        libc.ptrace(PTRACE_DETACH, pid, None, None)
    else:
        out["seize"] = name(ctypes.get_errno())
    buf = ctypes.create_string_buffer(64)
    local = iovec(ctypes.cast(buf, ctypes.c_void_p), 64)
    remote = iovec(0x10000, 64)
    for key, nr in (("process_vm_readv", SYS_process_vm_readv), ("process_vm_writev", SYS_process_vm_writev)):
        n = libc.syscall(nr, ctypes.c_long(pid), ctypes.byref(local), ctypes.c_ulong(1),
                         ctypes.byref(remote), ctypes.c_ulong(1), ctypes.c_ulong(0))
        e = ctypes.get_errno()
        # EFAULT: access was granted, only the address was wrong.
        out[key] = "OK" if n >= 0 or e == errno.EFAULT else name(e)
    # /proc/PID/mem is checked at open; the others when read (a parked init's files
    # belong to the sandbox's root, so opening them alone proves nothing).
    for f in ("mem", "environ", "auxv", "syscall", "stack", "pagemap", "maps", "smaps",
              "io", "personality"):
        try:
            fd = os.open("/proc/%d/%s" % (pid, f), os.O_RDONLY)
            try:
                if f != "mem":
                    os.read(fd, 4096)
                out[f] = "OK"
            finally:
                os.close(fd)
        except OSError as e:
            out[f] = name(e.errno)
    try:
        fd = os.open("/proc/%d/mem" % pid, os.O_RDWR)
        os.close(fd)
        out["mem_rw"] = "OK"
    except OSError as e:
        out["mem_rw"] = name(e.errno)
    try:
        os.listdir("/proc/%d/map_files" % pid)
        out["map_files"] = "OK"
    except OSError as e:
        out["map_files"] = name(e.errno)
    # Listing /proc/PID/fd is a permission check of the directory (its owner's); what
    # matters is reaching a file through it.
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        fds = ["0", "1", "2", "3"]
    out["fd_link"] = out["fd_open"] = "EACCES"
    for n in fds:
        try:
            os.readlink("/proc/%d/fd/%s" % (pid, n))
            out["fd_link"] = "OK"
        except OSError as e:
            out["fd_link"] = out["fd_link"] if out["fd_link"] == "OK" else name(e.errno)
        try:
            os.close(os.open("/proc/%d/fd/%s" % (pid, n), os.O_RDONLY | os.O_NONBLOCK))
            out["fd_open"] = "OK"
        except OSError as e:
            if e.errno == errno.ENXIO:
                # A socket: the open got past the permission check.
                out["fd_open"] = "OK"
            elif out["fd_open"] != "OK":
                out["fd_open"] = name(e.errno)
    for link in ("exe", "cwd", "root"):
        try:
            os.readlink("/proc/%d/%s" % (pid, link))
            out[link] = "OK"
        except OSError as e:
            out[link] = name(e.errno)
    pidfd = libc.syscall(SYS_pidfd_open, ctypes.c_long(pid), ctypes.c_long(0))
    if pidfd < 0:
        out["pidfd_getfd"] = "pidfd_open " + name(ctypes.get_errno())
    else:
        fd = libc.syscall(SYS_pidfd_getfd, ctypes.c_long(pidfd), ctypes.c_long(0), ctypes.c_long(0))
        out["pidfd_getfd"] = "OK" if fd >= 0 else name(ctypes.get_errno())
        if fd >= 0:
            os.close(fd)
        os.close(pidfd)
    return out

def dumpable(pid):
    try:
        return os.stat("/proc/%d/status" % pid).st_uid == 0
    except OSError:
        return False

mode, pid = sys.argv[1], int(sys.argv[2])
if mode == "once":
    print(json.dumps(attempts(pid)))
    sys.exit(0)
stop, log = sys.argv[3], sys.argv[4]
state = {"rounds": 0, "dumpable_rounds": 0, "through": []}
def save():
    with open(log + ".new", "w") as f:
        json.dump(state, f)
    os.rename(log + ".new", log)
save()
while not os.path.exists(stop):
    was = dumpable(pid)
    got = attempts(pid)
    state["rounds"] += 1
    if was or dumpable(pid):
        state["dumpable_rounds"] += 1
    for k, v in got.items():
        if v == "OK":
            state["through"].append(k)
    if state["rounds"] % 50 == 0 or was:
        save()
save()
"#;

/// Tries every family with `socket` and `socketpair` (through libc and through the raw
/// system call, with the high bits of the argument set too): prints JSON
/// `{"socket <family> <type>": "OK" | errno name}`.
const SOCKETS_PY: &str = r#"
import ctypes, errno, json, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_socket, SYS_socketpair = 41, 53
families = {"unix": 1, "inet": 2, "inet6": 10, "netlink": 16, "unspec": 0, "ax25": 3,
            "ipx": 4, "appletalk": 5, "x25": 9, "key": 15, "packet": 17, "rds": 21,
            "llc": 26, "can": 29, "tipc": 30, "bluetooth": 31, "alg": 38, "nfc": 39,
            "vsock": 40, "kcm": 41, "qipcrtr": 42, "smc": 43, "xdp": 44, "mctp": 45,
            "max": 46, "minus1": -1}
types = {"stream": 1, "dgram": 2, "raw": 3, "seqpacket": 5}
out = {}
def name(e):
    return errno.errorcode.get(e, str(e))
for fname, fam in families.items():
    for tname, typ in types.items():
        proto = 0
        fd = libc.socket(fam, typ, proto)
        out["socket %s %s" % (fname, tname)] = "OK" if fd >= 0 else name(ctypes.get_errno())
        if fd >= 0:
            libc.close(fd)
        pair = (ctypes.c_int * 2)()
        r = libc.socketpair(fam, typ, proto, pair)
        out["socketpair %s %s" % (fname, tname)] = "OK" if r == 0 else name(ctypes.get_errno())
        if r == 0:
            libc.close(pair[0]); libc.close(pair[1])
    # The kernel reads an int: 1<<32 | family is that family.
    wide = (1 << 32) | (fam & 0xffffffff)
    fd = libc.syscall(SYS_socket, ctypes.c_long(wide), ctypes.c_long(1), ctypes.c_long(0))
    out["wide %s" % fname] = "OK" if fd >= 0 else name(ctypes.get_errno())
    if fd >= 0:
        libc.close(fd)
# Sockets that work still do their job: a TCP round trip on loopback, a unix pair, a
# netlink route dump, an inet6 socket bound.
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.bind(("127.0.0.1", 0)); srv.listen(1)
cli = socket.create_connection(srv.getsockname())
conn, _ = srv.accept(); cli.sendall(b"ping")
out["tcp roundtrip"] = "OK" if conn.recv(4) == b"ping" else "broken"
a, b = socket.socketpair(); a.sendall(b"x")
out["unix pair"] = "OK" if b.recv(1) == b"x" else "broken"
nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0); nl.bind((0, 0))
req = bytearray(b"\x14\x00\x00\x00\x12\x00\x01\x03\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")
nl.send(bytes(req))
out["netlink dump"] = "OK" if len(nl.recv(65536)) > 16 else "broken"
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
try:
    s6.bind(("::1", 0)); out["inet6 bind"] = "OK"
except OSError as e:
    out["inet6 bind"] = "OK" if e.errno == errno.EADDRNOTAVAIL else name(e.errno)
try:
    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    out["python vsock"] = "OK"
except OSError as e:
    out["python vsock"] = name(e.errno)
print(json.dumps(out))
"#;

/// Capability bit of CAP_SYS_PTRACE, the guard init keeps in its permitted set alone.
const GUARD_BIT: u64 = 1 << 19;

/// Writes `text` into the sandbox as `path`.
fn put(env: &TestEnv, name: &str, path: &str, text: &str) {
    env.ok(&[
        "exec",
        name,
        "--",
        "python3",
        "-c",
        "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
        path,
        text,
    ]);
}

/// A sandbox of the default image, with the attack scripts in /tmp, and a policy that lets
/// everything through (the isolation must hold without the command checks).
fn sandbox(env: &TestEnv, name: &str) {
    env.ok(&["create", name]);
    put(env, name, "/tmp/attack.py", ATTACK_PY);
    put(env, name, "/tmp/sockets.py", SOCKETS_PY);
}

/// Runs the attack on init once, from inside; returns `{attempt: outcome}`.
fn attack_once(env: &TestEnv, name: &str) -> serde_json::Map<String, serde_json::Value> {
    let out = env.ok(&["exec", name, "--", "python3", "/tmp/attack.py", "once", "1"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("attack output");
    v.as_object().cloned().expect("an object")
}

/// Asserts that no attempt got through.
fn all_refused(results: &serde_json::Map<String, serde_json::Value>, when: &str) {
    assert!(results.len() >= 15, "{when}: {results:?}");
    let through: Vec<&String> = results
        .iter()
        .filter(|(_, v)| v.as_str() == Some("OK"))
        .map(|(k, _)| k)
        .collect();
    assert!(
        through.is_empty(),
        "{when}: got through to init: {through:?} ({results:?})"
    );
    // ptrace itself is refused by the kernel's permission check, not for want of a pid.
    for k in ["attach", "seize", "process_vm_readv"] {
        assert_eq!(results[k], "EPERM", "{when}: {k}: {results:?}");
    }
}

/// TracerPid, CapPrm, CapEff and CapBnd of a host process.
fn status(pid: i32) -> (i64, u64, u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap()
            .trim()
            .to_string()
    };
    let hex = |s: String| u64::from_str_radix(&s, 16).unwrap();
    (
        field("TracerPid").parse().unwrap(),
        hex(field("CapPrm")),
        hex(field("CapEff")),
        hex(field("CapBnd")),
    )
}

/// Init holds the guard in its permitted set only; nothing traces it.
fn assert_guarded(env: &TestEnv, name: &str, when: &str) {
    let pid = env.init_pid(name).expect("init pid");
    let (tracer, prm, eff, bnd) = status(pid);
    assert_eq!(tracer, 0, "{when}: init is traced");
    assert_ne!(prm & GUARD_BIT, 0, "{when}: CapPrm {prm:x}");
    assert_eq!(eff & GUARD_BIT, 0, "{when}: CapEff {eff:x}");
    assert_eq!(bnd & GUARD_BIT, 0, "{when}: CapBnd {bnd:x}");
    // What init starts holds nothing init's permitted set lacks, and never the guard.
    let out = env.ok(&[
        "exec",
        name,
        "--",
        "grep",
        "-E",
        "^Cap(Prm|Eff|Bnd)",
        "/proc/self/status",
    ]);
    for line in out.lines() {
        let v = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
        assert_eq!(v & GUARD_BIT, 0, "{when}: an exec holds the guard: {line}");
        assert_eq!(v & !prm, 0, "{when}: an exec holds more than init: {line}");
    }
}

/// Reads the attack loop's log from inside.
fn loop_log(env: &TestEnv, name: &str) -> serde_json::Value {
    let out = env.ok(&["exec", name, "--", "cat", "/tmp/attack.log"]);
    serde_json::from_str(out.trim()).expect("loop log")
}

/// Starts the attack loop in the background, inside.
fn start_loop(env: &TestEnv, name: &str) {
    env.ok(&[
        "exec",
        name,
        "rm -f /tmp/attack.stop; nohup python3 /tmp/attack.py loop 1 /tmp/attack.stop /tmp/attack.log >/dev/null 2>&1 &",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.sh(name, "test -s /tmp/attack.log").0 != 0 {
        assert!(Instant::now() < deadline, "the attack loop did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops the attack loop and returns its final log.
fn stop_loop(env: &TestEnv, name: &str) -> serde_json::Value {
    env.ok(&["exec", name, "touch /tmp/attack.stop"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.sh(name, "pgrep -f 'attack[.]py loop' >/dev/null").0 == 0 {
        assert!(Instant::now() < deadline, "the attack loop did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    loop_log(env, name)
}

fn assert_nothing_through(log: &serde_json::Value, when: &str) {
    assert!(
        log["through"].as_array().is_some_and(|a| a.is_empty()),
        "{when}: attempts got through to init: {log}"
    );
    assert!(log["rounds"].as_u64().unwrap_or(0) > 0, "{when}: {log}");
}

fn sandbox_id(env: &TestEnv, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", name])).unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// `checkpoint.json` of a sandbox's snapshot.
fn checkpoint_json(env: &TestEnv, name: &str, snapshot: &str) -> PathBuf {
    let snap = env
        .snapshots(name)
        .into_iter()
        .find(|s| s["name"] == snapshot)
        .expect("snapshot");
    env.state
        .join("checkpoints")
        .join(sandbox_id(env, name))
        .join(snap["id"].as_str().unwrap())
        .join("checkpoint.json")
}

#[test]
fn sandbox_processes_cannot_trace_init_before_during_or_after_a_checkpoint() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    sandbox(&env, "victim");

    // Before any checkpoint: init is guarded, every attempt fails.
    assert_guarded(&env, "victim", "fresh");
    all_refused(&attack_once(&env, "victim"), "fresh");

    // During: the loop attacks while snapshots with processes park init (dumpable) again
    // and again; it must have run rounds in that window, and none got through.
    start_loop(&env, "victim");
    let mut taken = 0;
    let mut log = loop_log(&env, "victim");
    while taken < 5 || (log["dumpable_rounds"].as_u64().unwrap_or(0) == 0 && taken < 60) {
        env.ok(&[
            "snapshot",
            "victim",
            &format!("p{taken}"),
            "--with-processes",
        ]);
        taken += 1;
        log = loop_log(&env, "victim");
        assert_nothing_through(&log, &format!("snapshot {taken}"));
        assert_guarded(&env, "victim", &format!("after snapshot {taken}"));
    }
    assert!(
        log["dumpable_rounds"].as_u64().unwrap_or(0) > 0,
        "the attack never ran while init was parked, in {taken} snapshots: {log}"
    );

    // After a restore: the restored loop attacks the restored init (parked until the
    // launcher resumes it), then a fresh attack; the restored init is guarded too.
    let out = env.sb(&["rollback", "victim", "--to", "p1"]);
    assert!(
        out.status.success(),
        "rollback: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_guarded(&env, "victim", "restored");
    all_refused(&attack_once(&env, "victim"), "restored");
    let log = stop_loop(&env, "victim");
    assert_nothing_through(&log, "restored loop");

    // Rolled back once more while nothing attacks: still guarded, and a restored init can
    // itself be checkpointed again.
    env.ok(&["rollback", "victim", "--to", "p2"]);
    assert_guarded(&env, "victim", "restored twice");
    env.ok(&["exec", "victim", "touch /tmp/attack.stop"]);
    env.ok(&["snapshot", "victim", "again", "--with-processes"]);
    all_refused(
        &attack_once(&env, "victim"),
        "after a checkpoint of a restored init",
    );
}

/// A host process that PTRACE_SEIZEs `pid` and keeps it seized (passing on any stop) until
/// its stdin closes.
fn host_tracer(pid: i32) -> Child {
    const TRACER_PY: &str = r#"
import ctypes, os, select, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
pid = int(sys.argv[1])
if libc.ptrace(0x4206, pid, None, None) != 0:
    print("failed", ctypes.get_errno(), flush=True)
    sys.exit(1)
print("seized", flush=True)
while True:
    r, _, _ = select.select([sys.stdin], [], [], 0.05)
    try:
        got, st = os.waitpid(pid, os.WNOHANG | 0x40000000)
        if got == pid and os.WIFSTOPPED(st):
            sig = os.WSTOPSIG(st)
            libc.ptrace(7, pid, None, ctypes.c_void_p(0 if sig == 5 else sig))
    except ChildProcessError:
        pass
    if r and not sys.stdin.read(1):
        break
"#;
    let mut child = Command::new("python3")
        .args(["-c", TRACER_PY, &pid.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 on the host");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "seized", "the host tracer: {line}");
    child
}

#[test]
fn a_traced_init_is_not_checkpointed() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "traced"]);
    env.ok(&["exec", "traced", "echo before > /work/f"]);
    let pid = env.init_pid("traced").unwrap();
    let mut tracer = host_tracer(pid);
    assert_eq!(status(pid).0, tracer.id() as i64);

    let err = env.fails(&["snapshot", "traced", "t", "--with-processes"]);
    assert!(
        err.contains("traced") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(env.snapshot_names("traced").is_empty(), "no snapshot taken");
    // The sandbox goes on, served as before.
    assert_eq!(env.ok(&["exec", "traced", "cat /work/f"]), "before\n");

    drop(tracer.stdin.take());
    tracer.wait().unwrap();
    assert_eq!(status(pid).0, 0);
    env.ok(&["snapshot", "traced", "t", "--with-processes"]);
    assert_eq!(env.snapshot_names("traced"), vec!["t".to_string()]);
}

/// Watches `path` for opens with inotify from a host process; `finish` returns how many.
struct OpenWatch(Child);

impl OpenWatch {
    fn new(path: &Path) -> Self {
        const WATCH_PY: &str = r#"
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_NONBLOCK)
if fd < 0 or libc.inotify_add_watch(fd, sys.argv[1].encode(), 0x20) < 0:
    print("failed", ctypes.get_errno(), flush=True)
    sys.exit(1)
print("watching", flush=True)
sys.stdin.read()
n = 0
try:
    data = os.read(fd, 65536)
    off = 0
    while off < len(data):
        _, mask, _, ln = struct.unpack_from("iIII", data, off)
        off += 16 + ln
        if mask & 0x20:
            n += 1
except BlockingIOError:
    pass
print(n, flush=True)
"#;
        let mut child = Command::new("python3")
            .args(["-c", WATCH_PY, path.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 on the host");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "watching", "{line}");
        OpenWatch(child)
    }

    fn finish(mut self) -> u64 {
        drop(self.0.stdin.take());
        let out = self.0.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

/// A counter loop in the background, as in tests/checkpoint.rs.
const COUNTER: &str =
    "sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done' >/dev/null 2>&1 &";

fn counter_running(env: &TestEnv, name: &str) -> bool {
    env.sh(name, "pgrep -f 'while [:]' >/dev/null").0 == 0
}

#[test]
fn a_tampered_checkpoint_opens_no_host_file() {
    require_root!();
    let env = TestEnv::new();
    env.ok(&["create", "tamper"]);
    env.ok(&["exec", "tamper", "echo one > /work/f"]);
    env.ok(&["exec", "tamper", COUNTER]);
    env.ok(&["snapshot", "tamper", "live", "--with-processes"]);
    let json_path = checkpoint_json(&env, "tamper", "live");
    let original = std::fs::read_to_string(&json_path).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&original).unwrap();
    let files = meta["files"].as_array().unwrap().clone();
    assert!(!files.is_empty(), "{meta}");
    // What a dump records are sandbox-init and its libraries, by device and inode.
    for f in &files {
        let path = Path::new(f["path"].as_str().unwrap());
        let m = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
        assert_eq!(f["ino"].as_u64(), Some(m), "{f}");
        assert_eq!(std::fs::canonicalize(path).unwrap(), path, "canonical: {f}");
    }
    assert!(
        files
            .iter()
            .any(|f| f["path"].as_str().unwrap().ends_with("/sandbox-init")),
        "{meta}"
    );

    // A host-only secret, and the identity of a real library under another name.
    let dir = tempfile::Builder::new()
        .prefix("devbox-secret-")
        .tempdir_in("/tmp")
        .unwrap();
    let secret = dir.path().join("secret.so");
    std::fs::write(&secret, "host-only secret 7f3a9c\n").unwrap();
    let sm = std::fs::metadata(&secret).unwrap();
    use std::os::unix::fs::MetadataExt;
    let secret_entry = serde_json::json!({
        "key": format!("file[1:{:x}]", sm.ino()),
        "path": secret,
        "dev": sm.dev(),
        "ino": sm.ino(),
        "size": sm.len(),
    });
    let link = dir.path().join("link.so");
    std::os::unix::fs::symlink(&secret, &link).unwrap();

    let mut variants: Vec<(&str, serde_json::Value)> = Vec::new();
    let with_files = |files: Vec<serde_json::Value>| {
        let mut m = meta.clone();
        m["files"] = serde_json::Value::Array(files);
        m
    };
    // The secret's path in place of a library's, the library's identity kept.
    let mut v = files.clone();
    v[0]["path"] = serde_json::json!(secret);
    variants.push(("path swapped", with_files(v)));
    // The secret's path and its true identity.
    let mut v = files.clone();
    let mut e = secret_entry.clone();
    e["key"] = serde_json::json!(format!(
        "{}:{:x}]",
        v[0]["key"].as_str().unwrap().rsplit_once(':').unwrap().0,
        sm.ino()
    ));
    v[0] = e;
    variants.push(("entry replaced", with_files(v)));
    // An extra entry for the secret.
    let mut v = files.clone();
    v.push(secret_entry.clone());
    variants.push(("entry added", with_files(v)));
    // A symlink to the secret.
    let mut v = files.clone();
    let mut e = secret_entry.clone();
    e["path"] = serde_json::json!(link);
    v.push(e);
    variants.push(("symlink", with_files(v)));
    // A library's identity under a path naming it through a symlink.
    let mut v = files.clone();
    let ld = Path::new("/lib64/ld-linux-x86-64.so.2");
    if let Some(i) = v.iter().position(|f| {
        std::fs::canonicalize(ld).ok().as_deref() == f["path"].as_str().map(Path::new)
    }) {
        v[i]["path"] = serde_json::json!(ld);
        variants.push(("library through a symlink", with_files(v)));
    }
    // An older dev-box's checkpoint.json: paths and sizes only.
    let mut v = files.clone();
    v.push(secret_entry.clone());
    for f in &mut v {
        let o = f.as_object_mut().unwrap();
        o.remove("dev");
        o.remove("ino");
    }
    variants.push(("no devices or inodes", with_files(v)));
    // A malformed key.
    let mut v = files.clone();
    v[0]["key"] = serde_json::json!(format!("file[1:{:x}", sm.ino()));
    variants.push(("bad key", with_files(v)));

    for (what, tampered) in variants {
        env.ok(&["exec", "tamper", "echo two > /work/f"]);
        std::fs::write(&json_path, serde_json::to_vec_pretty(&tampered).unwrap()).unwrap();
        let watch = OpenWatch::new(&secret);
        let err = env.fails(&["rollback", "tamper", "--to", "live"]);
        // A control open: the watch sees opens.
        drop(std::fs::File::open(&secret).unwrap());
        assert_eq!(watch.finish(), 1, "{what}: the restore opened the secret");
        assert!(
            err.contains("could not be restored") && err.contains("started afresh"),
            "{what}: {err}"
        );
        assert_eq!(
            env.ok(&["exec", "tamper", "cat /work/f"]),
            "one\n",
            "{what}: the files are rolled back"
        );
        assert!(!counter_running(&env, "tamper"), "{what}: started afresh");
        assert_guarded(&env, "tamper", what);
    }
    // The error says why, for a file the daemon does not trust.
    env.ok(&["exec", "tamper", "echo two > /work/f"]);
    let mut v = files.clone();
    v.push(secret_entry.clone());
    std::fs::write(&json_path, serde_json::to_vec(&with_files(v)).unwrap()).unwrap();
    let err = env.fails(&["rollback", "tamper", "--to", "live"]);
    assert!(
        err.contains("is not sandbox-init or one of its libraries"),
        "{err}"
    );

    // The checkpoint as the dump wrote it still restores the processes.
    std::fs::write(&json_path, &original).unwrap();
    let out = env.sb(&["rollback", "tamper", "--to", "live"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(counter_running(&env, "tamper"), "processes restored");
    assert_guarded(&env, "tamper", "restored");
}

/// Runs the socket script inside; returns `{attempt: outcome}`.
fn sockets(env: &TestEnv, name: &str) -> serde_json::Map<String, serde_json::Value> {
    let out = env.ok(&["exec", name, "--", "python3", "/tmp/sockets.py"]);
    serde_json::from_str::<serde_json::Value>(out.trim())
        .expect("sockets output")
        .as_object()
        .cloned()
        .unwrap()
}

fn assert_socket_families(r: &serde_json::Map<String, serde_json::Value>, when: &str) {
    let allowed = ["unix", "inet", "inet6", "netlink"];
    for (k, v) in r {
        let mut words = k.split(' ');
        let (call, family) = (words.next().unwrap(), words.next().unwrap_or(""));
        if !matches!(call, "socket" | "socketpair" | "wide") {
            continue;
        }
        if allowed.contains(&family) {
            assert_ne!(v, "EAFNOSUPPORT", "{when}: {k} is refused: {r:?}");
        } else {
            assert_eq!(v, "EAFNOSUPPORT", "{when}: {k}: {r:?}");
        }
    }
    for k in [
        "socket unix stream",
        "socket unix dgram",
        "socket unix seqpacket",
        "socketpair unix stream",
        "socketpair unix seqpacket",
        "socket inet stream",
        "socket inet dgram",
        "socket inet6 stream",
        "socket inet6 dgram",
        "socket netlink raw",
        "socket netlink dgram",
        "wide unix",
        "tcp roundtrip",
        "unix pair",
        "netlink dump",
        "inet6 bind",
    ] {
        assert_eq!(r[k], "OK", "{when}: {k}: {r:?}");
    }
    assert_eq!(r["python vsock"], "EAFNOSUPPORT", "{when}: {r:?}");
    assert_eq!(r["wide vsock"], "EAFNOSUPPORT", "{when}: {r:?}");
}

#[test]
fn only_unix_inet_and_netlink_sockets() {
    require_root!();
    let env = TestEnv::new();
    env.allow_everything();
    sandbox(&env, "net");
    assert_socket_families(&sockets(&env, "net"), "fresh");

    // As another user, and from a process that outlives its exec.
    let out = env.ok(&[
        "exec",
        "net",
        "--user",
        "1000:1000",
        "--",
        "python3",
        "/tmp/sockets.py",
    ]);
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_socket_families(r.as_object().unwrap(), "non-root");

    // The filter survives a checkpoint and restore: a process restored with it, and the
    // processes the restored init starts.
    env.ok(&[
        "exec",
        "net",
        "nohup sh -c 'while [ ! -e /tmp/go ]; do sleep 0.05; done; python3 /tmp/sockets.py > /tmp/late.json' >/dev/null 2>&1 &",
    ]);
    env.ok(&["snapshot", "net", "s", "--with-processes"]);
    env.ok(&["rollback", "net", "--to", "s"]);
    assert_socket_families(&sockets(&env, "net"), "restored");
    env.ok(&["exec", "net", "touch /tmp/go"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.sh("net", "test -s /tmp/late.json").0 != 0 {
        assert!(
            Instant::now() < deadline,
            "the restored process did not run"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let late = env.ok(&["exec", "net", "cat /tmp/late.json"]);
    let r: serde_json::Value = serde_json::from_str(late.trim()).unwrap();
    assert_socket_families(r.as_object().unwrap(), "restored background process");
}
