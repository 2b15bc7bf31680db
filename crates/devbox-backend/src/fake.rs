//! An in-memory backend for tests of the engine: no root, no namespaces, no cgroups.
//!
//! A "sandbox" is an entry in a table; its host process is a made-up pid. Commands are a
//! tiny interpreter run on a thread, with real pipes for their streams:
//! `true`, `false`, `exit N`, `echo WORDS`, `cat` (stdin to stdout), `sleep` (until a
//! signal), `write PATH TEXT` and `rm PATH` (in the sandbox's writable layer, `upper/`),
//! and `sh -c "A && B"` (each split on blanks). Anything else is "not found".
//!
//! Tests steer it: [`FakeBackend::fail_next`] makes an operation fail once,
//! [`FakeBackend::crash`] ends a sandbox's "init" as if it died, [`FakeBackend::hang`] makes
//! it stop answering, [`FakeBackend::leave_frozen`] freezes it as a killed daemon would.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::{
    Backend, BackendError, Capabilities, CheckpointSpec, ExecFailure, ExecSpec, HeldMounts,
    HostProcess, Instance, Interrupted, Io, Limits, Process, ProcessControl, ProcessExit, Recorder,
    Result, StartSpec, Started, Usage,
};

/// The kind recorded for fake sandboxes.
pub const KIND: &str = "fake";

/// The file a fake checkpoint writes.
const CHECKPOINT_FILE: &str = "fake-checkpoint";

#[derive(Debug)]
struct FakeBox {
    handle: String,
    process: HostProcess,
    running: bool,
    frozen: bool,
    hung: bool,
    volume: PathBuf,
    /// Write ends of watch pipes: dropped when the init "exits".
    watchers: Vec<OwnedFd>,
}

#[derive(Debug, Default)]
struct State {
    boxes: HashMap<String, FakeBox>,
    next_pid: i32,
    failures: HashMap<String, String>,
    calls: Vec<String>,
}

/// The fake backend. Share it (`Arc`) between the engines of one test to keep its sandboxes
/// across a simulated daemon restart.
#[derive(Debug)]
pub struct FakeBackend {
    state: Mutex<State>,
    caps: Capabilities,
}

impl Default for FakeBackend {
    fn default() -> Self {
        Self::with_capabilities(Capabilities {
            checkpoint: true,
            pty: false,
            live_snapshot: true,
        })
    }
}

impl FakeBackend {
    /// A fake that checkpoints and snapshots live, without terminals.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fake with the given capabilities.
    pub fn with_capabilities(caps: Capabilities) -> Self {
        Self {
            state: Mutex::new(State {
                next_pid: 1000,
                ..Default::default()
            }),
            caps,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next `op` (`start`, `restore`, `stop`, `exec`, `freeze`, `checkpoint`, `update`)
    /// fail with `message`.
    pub fn fail_next(&self, op: &str, message: &str) {
        self.lock()
            .failures
            .insert(op.to_string(), message.to_string());
    }

    fn failure(&self, op: &str) -> Result<()> {
        match self.lock().failures.remove(op) {
            Some(m) => Err(BackendError::Other(m)),
            None => Ok(()),
        }
    }

    /// The operations called so far (`start <id>`, `restore <id>`, `stop <id>`, ...).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Whether sandbox `id` runs.
    pub fn is_running(&self, id: &str) -> bool {
        self.lock().boxes.get(id).is_some_and(|b| b.running)
    }

    /// Whether sandbox `id` is frozen.
    pub fn is_frozen(&self, id: &str) -> bool {
        self.lock().boxes.get(id).is_some_and(|b| b.frozen)
    }

    /// Whether the backend holds anything for sandbox `id`.
    pub fn holds(&self, id: &str) -> bool {
        self.lock().boxes.contains_key(id)
    }

    /// Sandbox `id`'s init dies on its own.
    pub fn crash(&self, id: &str) {
        if let Some(b) = self.lock().boxes.get_mut(id) {
            b.running = false;
            b.watchers.clear();
        }
    }

    /// Sandbox `id` stops answering (its init still runs).
    pub fn hang(&self, id: &str) {
        if let Some(b) = self.lock().boxes.get_mut(id) {
            b.hung = true;
        }
    }

    /// Sandbox `id` stays frozen, as a daemon killed mid-snapshot leaves it.
    pub fn leave_frozen(&self, id: &str) {
        if let Some(b) = self.lock().boxes.get_mut(id) {
            b.frozen = true;
        }
    }

    /// A sandbox `id` runs that no record owns (a crashed create's leftover).
    pub fn plant_orphan(&self, id: &str) {
        let mut st = self.lock();
        st.next_pid += 1;
        let pid = st.next_pid;
        st.boxes.insert(
            id.to_string(),
            FakeBox {
                handle: format!("fake-{id}"),
                process: HostProcess {
                    pid,
                    start: Some(pid as u64),
                },
                running: true,
                frozen: false,
                hung: false,
                volume: PathBuf::new(),
                watchers: Vec::new(),
            },
        );
    }

    fn launch(&self, op: &str, spec: &StartSpec, record: Recorder<'_>) -> Result<Started> {
        self.failure(op)?;
        let handle = format!("fake-{}", spec.id);
        record(&handle)?;
        let mut st = self.lock();
        st.calls.push(format!("{op} {}", spec.id));
        st.next_pid += 1;
        let pid = st.next_pid;
        let process = HostProcess {
            pid,
            start: Some(pid as u64),
        };
        st.boxes.insert(
            spec.id.clone(),
            FakeBox {
                handle: handle.clone(),
                process,
                running: true,
                frozen: false,
                hung: false,
                volume: spec.volume.clone(),
                watchers: Vec::new(),
            },
        );
        Ok(Started { handle, process })
    }

    fn running_box<'a>(st: &'a mut State, inst: &Instance) -> Result<&'a mut FakeBox> {
        match st.boxes.get_mut(&inst.id) {
            Some(b) if b.running && Some(b.process) == inst.process => Ok(b),
            _ => Err(BackendError::Other(format!(
                "sandbox {} does not run",
                inst.name
            ))),
        }
    }
}

/// A fake command's control: the thread running it stores the exit, then writes a byte to
/// the ready pipe.
#[derive(Debug)]
struct FakeProcess {
    ready: OwnedFd,
    exit: Mutex<Option<ProcessExit>>,
    signal: Mutex<Option<i32>>,
    signalled: Condvar,
}

impl ProcessControl for FakeProcess {
    fn ready_fd(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }

    fn try_wait(&self) -> std::io::Result<Option<ProcessExit>> {
        match *self.exit.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Ok(Some(e)),
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }

    fn signal(&self, signal: i32) -> std::io::Result<()> {
        *self.signal.lock().unwrap_or_else(|p| p.into_inner()) = Some(signal);
        self.signalled.notify_all();
        Ok(())
    }

    fn resize(&self, _rows: u16, _cols: u16) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "fake commands have no terminal",
        ))
    }
}

/// Runs one fake command; returns its exit code and the signal that ended it.
fn interpret(
    argv: &[String],
    upper: &Path,
    stdin: Option<std::fs::File>,
    out: &mut Option<std::fs::File>,
    control: &FakeProcess,
) -> (i32, Option<i32>) {
    let arg = |i: usize| argv.get(i).map(String::as_str).unwrap_or("");
    let mut say = |text: &str| {
        if let Some(o) = out.as_mut() {
            let _ = o.write_all(text.as_bytes());
        }
    };
    let inside = |p: &str| upper.join(p.trim_start_matches('/'));
    match arg(0) {
        "true" => (0, None),
        "false" => (1, None),
        "exit" => (arg(1).parse().unwrap_or(1), None),
        "echo" => {
            say(&format!("{}\n", argv[1..].join(" ")));
            (0, None)
        }
        "cat" => {
            let mut text = Vec::new();
            if let Some(mut i) = stdin {
                let _ = i.read_to_end(&mut text);
            }
            say(&String::from_utf8_lossy(&text));
            (0, None)
        }
        "write" => {
            let path = inside(arg(1));
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match std::fs::write(&path, argv[2..].join(" ")) {
                Ok(()) => (0, None),
                Err(_) => (1, None),
            }
        }
        "rm" => match std::fs::remove_file(inside(arg(1))) {
            Ok(()) => (0, None),
            Err(_) => (1, None),
        },
        "sleep" => {
            let mut sig = control.signal.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(s) = *sig {
                    return (128 + s, Some(s));
                }
                sig = control
                    .signalled
                    .wait_timeout(sig, Duration::from_secs(60))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        "sh" if arg(1) == "-c" => {
            // `A && B && ...`, each split on blanks.
            let mut stdin = stdin;
            let mut last = (0, None);
            for part in arg(2).split("&&") {
                let words: Vec<String> = part.split_whitespace().map(String::from).collect();
                last = interpret(&words, upper, stdin.take(), out, control);
                if last.0 != 0 {
                    break;
                }
            }
            last
        }
        _ => (127, None),
    }
}

fn known(argv: &[String]) -> bool {
    match argv.first().map(String::as_str) {
        Some("sh") => argv.get(1).map(String::as_str) == Some("-c"),
        Some(c) => matches!(
            c,
            "true" | "false" | "exit" | "echo" | "cat" | "write" | "rm" | "sleep"
        ),
        None => false,
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = std::io::pipe().map_err(|e| BackendError::failed("pipe", e))?;
    Ok((r.into(), w.into()))
}

impl Backend for FakeBackend {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn start(&self, spec: &StartSpec, record: Recorder<'_>) -> Result<Started> {
        self.launch("start", spec, record)
    }

    fn restore(
        &self,
        spec: &StartSpec,
        checkpoint: &CheckpointSpec,
        record: Recorder<'_>,
    ) -> Result<Started> {
        if !self.checkpoint_complete(&checkpoint.images) {
            return Err(BackendError::Checkpoint(format!(
                "restoring the processes of sandbox {}: no checkpoint in {}",
                spec.name,
                checkpoint.images.display()
            )));
        }
        self.launch("restore", spec, record)
    }

    fn stop(
        &self,
        inst: &Instance,
        _grace: Duration,
        hold_mounts: bool,
    ) -> Result<Option<HeldMounts>> {
        self.failure("stop")?;
        let mut st = self.lock();
        st.calls.push(format!("stop {}", inst.id));
        st.boxes.remove(&inst.id);
        Ok(hold_mounts.then(|| Box::new(()) as HeldMounts))
    }

    fn remove(&self, inst: &Instance) {
        let mut st = self.lock();
        if st.boxes.remove(&inst.id).is_some() {
            st.calls.push(format!("remove {}", inst.id));
        }
    }

    fn alive(&self, inst: &Instance) -> bool {
        let st = self.lock();
        st.boxes
            .get(&inst.id)
            .is_some_and(|b| b.running && Some(b.process) == inst.process)
    }

    fn ping(&self, inst: &Instance, _timeout: Duration) -> bool {
        self.alive(inst)
            && self
                .lock()
                .boxes
                .get(&inst.id)
                .is_some_and(|b| !b.hung && !b.frozen)
    }

    fn watch(&self, inst: &Instance) -> Option<OwnedFd> {
        let mut st = self.lock();
        let b = Self::running_box(&mut st, inst).ok()?;
        let (r, w) = pipe().ok()?;
        b.watchers.push(w);
        Some(r)
    }

    fn exec(&self, inst: &Instance, spec: ExecSpec) -> Result<Process> {
        self.failure("exec")?;
        let upper = {
            let mut st = self.lock();
            let b = Self::running_box(&mut st, inst)?;
            if b.frozen || b.hung {
                return Err(BackendError::Other(format!(
                    "sandbox {} does not answer",
                    inst.name
                )));
            }
            b.volume.join("upper")
        };
        if spec.tty.is_some() {
            return Err(BackendError::Unsupported(
                "fake commands have no terminal".into(),
            ));
        }
        if !known(&spec.argv) {
            return Err(BackendError::Exec {
                kind: ExecFailure::NotFound,
                message: format!(
                    "{}: command not found",
                    spec.argv.first().map(String::as_str).unwrap_or("")
                ),
            });
        }
        let mut theirs: [Option<OwnedFd>; 3] = [None, None, None];
        let mut ours: [Option<OwnedFd>; 3] = [None, None, None];
        for (i, io) in [spec.stdin, spec.stdout, spec.stderr]
            .into_iter()
            .enumerate()
        {
            match io {
                Io::Null => {}
                Io::File(f) => theirs[i] = Some(f),
                Io::Pipe => {
                    let (r, w) = pipe()?;
                    let (t, o) = if i == 0 { (r, w) } else { (w, r) };
                    theirs[i] = Some(t);
                    ours[i] = Some(o);
                }
            }
        }
        let (ready_r, ready_w) = pipe()?;
        let control = Arc::new(FakeProcess {
            ready: ready_r,
            exit: Mutex::new(None),
            signal: Mutex::new(None),
            signalled: Condvar::new(),
        });
        let pid = {
            let mut st = self.lock();
            st.next_pid += 1;
            st.calls
                .push(format!("exec {} {}", inst.id, spec.argv.join(" ")));
            st.next_pid
        };
        let c2 = control.clone();
        let argv = spec.argv;
        let [stdin, stdout, stderr] = theirs;
        std::thread::spawn(move || {
            let mut out = stdout.map(std::fs::File::from);
            let (code, signal) = interpret(&argv, &upper, stdin.map(Into::into), &mut out, &c2);
            drop(out);
            drop(stderr);
            *c2.exit.lock().unwrap_or_else(|p| p.into_inner()) = Some(ProcessExit {
                code,
                signal,
                cpu_usec: 1,
                max_rss_kib: 1,
            });
            let _ = std::fs::File::from(ready_w).write_all(b"x");
        });
        let [stdin, stdout, stderr] = ours;
        Ok(Process {
            pid,
            stdin,
            stdout,
            stderr,
            tty: None,
            control,
        })
    }

    fn freeze(&self, inst: &Instance) -> Result<()> {
        self.failure("freeze")?;
        let mut st = self.lock();
        Self::running_box(&mut st, inst)?.frozen = true;
        Ok(())
    }

    fn thaw(&self, inst: &Instance) -> Result<()> {
        let mut st = self.lock();
        Self::running_box(&mut st, inst)?.frozen = false;
        Ok(())
    }

    fn thaw_leftover(&self, inst: &Instance) -> Result<bool> {
        let mut st = self.lock();
        Ok(match st.boxes.get_mut(&inst.id) {
            Some(b) if b.frozen => {
                b.frozen = false;
                true
            }
            _ => false,
        })
    }

    fn checkpoint_ready(&self) -> Result<Option<PathBuf>> {
        if self.caps.checkpoint {
            Ok(None)
        } else {
            Err(BackendError::Unsupported(
                "the fake backend cannot checkpoint processes".into(),
            ))
        }
    }

    fn checkpoint(
        &self,
        inst: &Instance,
        spec: &CheckpointSpec,
        files: &mut dyn FnMut() -> std::result::Result<(), Interrupted>,
    ) -> Result<()> {
        self.checkpoint_ready()?;
        if let Err(e) = self.failure("checkpoint") {
            return Err(BackendError::Checkpoint(format!(
                "cannot checkpoint the processes of {}: {e}; nothing was changed",
                inst.name
            )));
        }
        self.freeze(inst)?;
        let dumped = std::fs::create_dir_all(&spec.images)
            .and_then(|()| std::fs::write(spec.images.join(CHECKPOINT_FILE), &inst.id))
            .map_err(|e| BackendError::failed("writing the checkpoint", e));
        let result = dumped.and_then(|()| files().map_err(BackendError::from));
        let _ = self.thaw(inst);
        self.lock().calls.push(format!("checkpoint {}", inst.id));
        result
    }

    fn checkpoint_complete(&self, images: &Path) -> bool {
        images.join(CHECKPOINT_FILE).exists()
    }

    fn usage(&self, inst: &Instance) -> Usage {
        Usage {
            pids: u64::from(self.alive(inst)),
            ..Usage::default()
        }
    }

    fn oom_kills(&self, inst: &Instance) -> Option<u64> {
        self.alive(inst).then_some(0)
    }

    fn update_limits(&self, inst: &Instance, _old: &Limits, new: &Limits) -> Result<()> {
        self.failure("update")?;
        if !self.alive(inst) {
            return Err(BackendError::Other(format!("{} does not run", inst.name)));
        }
        self.lock().calls.push(format!(
            "update {} memory={} pids={} cpu={}",
            inst.id, new.memory_bytes, new.pids, new.cpu_millis
        ));
        Ok(())
    }

    fn processes(&self, inst: &Instance) -> Vec<(i32, String)> {
        inst.process
            .filter(|_| self.alive(inst))
            .map(|p| vec![(p.pid, "fake-init".to_string())])
            .unwrap_or_default()
    }

    fn orphans(&self, owned: &[Instance]) -> Vec<String> {
        let st = self.lock();
        st.boxes
            .iter()
            .filter(|(id, b)| {
                !owned
                    .iter()
                    .any(|i| &i.id == *id && i.handle.as_deref() == Some(b.handle.as_str()))
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn remove_orphan(&self, orphan: &str) {
        let mut st = self.lock();
        if st.boxes.remove(orphan).is_some() {
            st.calls.push(format!("remove-orphan {orphan}"));
        }
    }
}
