//! Engine tests against the fake backend (`devbox_backend::fake`): no root, no processes.
//! Each test has a private state dir, a copy-driver pool in a temp dir and its own SQLite
//! database. A daemon "killed" is a tokio runtime shut down; the fake keeps its sandboxes
//! across, as a host keeps its processes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devbox_backend::fake::FakeBackend;
use devbox_backend::{Backend, Capabilities};
use devbox_store::{SandboxState, SnapshotState};

use crate::model::{CreateSandboxRequest, ExecRequest, RollbackRequest, SnapshotRequest};
use crate::snapshots::Pending;
use crate::{Caller, Engine, EngineConfig, EngineError};

/// Who the tests are to the engine.
fn me() -> Caller {
    Caller::new("tester")
}

struct Daemon {
    rt: tokio::runtime::Runtime,
    engine: Arc<Engine>,
}

struct Host {
    dir: tempfile::TempDir,
    fake: Arc<FakeBackend>,
}

impl Host {
    fn new() -> Self {
        Self::with(FakeBackend::new())
    }

    fn with(fake: FakeBackend) -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            fake: Arc::new(fake),
        }
    }

    fn config(&self) -> EngineConfig {
        let root = self.dir.path();
        let mut cfg = EngineConfig::new(root.join("state"), root.join("run"), None);
        cfg.pool = devbox_storage::PoolSource::Directory(root.join("pool"));
        cfg.uid_registry = root.join("uids.json");
        cfg.warm_launchers = 0;
        cfg.retention_days = None;
        cfg
    }

    /// Starts a daemon on this host.
    fn daemon(&self) -> Daemon {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let fake = self.fake.clone();
        let engine = rt
            .block_on(Engine::open_with(self.config(), move |_| {
                Ok(crate::backends::Backends::with(
                    fake as Arc<dyn Backend>,
                    Vec::new(),
                ))
            }))
            .expect("engine opens");
        Daemon { rt, engine }
    }

    fn volume(&self, d: &Daemon, name: &str) -> PathBuf {
        let rec = d.engine.record(name).expect("record");
        d.engine.sandbox_volume(&rec.id)
    }
}

impl Daemon {
    fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// Kills the daemon: its tasks end where they are.
    fn kill(self) {
        drop(self.engine);
        self.rt.shutdown_timeout(Duration::from_secs(2));
    }

    fn create(&self, name: &str, start: bool) -> crate::model::SandboxInfo {
        self.create_with(name, start, None)
    }

    fn create_with(
        &self,
        name: &str,
        start: bool,
        manifest: Option<devbox_spec::SandboxManifest>,
    ) -> crate::model::SandboxInfo {
        self.run(self.engine.create(
            &me(),
            CreateSandboxRequest {
                name: Some(name.into()),
                manifest,
                start,
            },
        ))
        .expect("create")
    }

    /// Runs `argv`; returns its exit code and stdout.
    fn exec(&self, name: &str, argv: &[&str]) -> Result<(i32, String), EngineError> {
        self.exec_req(
            name,
            ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        )
    }

    fn exec_req(&self, name: &str, req: ExecRequest) -> Result<(i32, String), EngineError> {
        self.run(async {
            let mut s = self.engine.exec(&me(), name, &req, false).await?;
            let mut out = Vec::new();
            if let Some(o) = s.stdout.as_mut() {
                while let Some(chunk) = o.recv().await {
                    out.extend_from_slice(&chunk);
                }
            }
            let exit = s.wait().await?;
            s.settle(&self.engine, &exit).await?;
            Ok((exit.code, String::from_utf8_lossy(&out).into_owned()))
        })
    }

    fn snapshot(&self, name: &str, snap: &str) -> crate::model::SnapshotInfo {
        self.run(self.engine.snapshot(
            &me(),
            name,
            SnapshotRequest {
                name: Some(snap.into()),
                ..Default::default()
            },
        ))
        .expect("snapshot")
    }

    fn rollback(&self, name: &str, to: &str) -> crate::model::SandboxInfo {
        self.run(self.engine.rollback(
            &me(),
            name,
            RollbackRequest {
                to: to.into(),
                paths: Vec::new(),
            },
        ))
        .expect("rollback")
    }

    fn state(&self, name: &str) -> SandboxState {
        self.engine.record(name).expect("record").state
    }
}

fn read(vol: &Path, path: &str) -> Option<String> {
    std::fs::read_to_string(vol.join("upper").join(path)).ok()
}

#[test]
fn a_sandbox_lives_runs_commands_and_goes() {
    let host = Host::new();
    let d = host.daemon();
    let info = d.create("a", true);
    assert_eq!(info.state, SandboxState::Running);
    assert!(host.fake.is_running(&info.id));
    let rec = d.engine.record("a").unwrap();
    assert_eq!(rec.backend, "fake");
    assert_eq!(
        rec.handle.as_deref(),
        Some(format!("fake-{}", info.id).as_str())
    );

    assert_eq!(
        d.exec("a", &["echo", "hello"]).unwrap(),
        (0, "hello\n".into())
    );
    assert_eq!(d.exec("a", &["exit", "3"]).unwrap().0, 3);
    let missing = d.exec("a", &["nonesuch"]).unwrap_err();
    assert_eq!(missing.code(), "exec_failed", "{missing}");

    let inspected = d.run(d.engine.inspect("a")).unwrap();
    assert_eq!(inspected.processes.len(), 1);
    assert_eq!(inspected.usage.map(|u| u.pids), Some(1));

    let stopped = d.run(d.engine.stop(&me(), "a", None)).unwrap();
    assert_eq!(stopped.state, SandboxState::Stopped);
    assert!(!host.fake.is_running(&info.id));
    let refused = d.exec("a", &["true"]).unwrap_err();
    assert_eq!(refused.code(), "wrong_state");

    d.run(d.engine.start(&me(), "a")).unwrap();
    assert_eq!(d.state("a"), SandboxState::Running);
    let vol = host.volume(&d, "a");
    assert!(vol.is_dir());
    d.run(d.engine.destroy(&me(), "a", false)).unwrap();
    assert!(d.engine.record("a").is_err());
    assert!(!host.fake.holds(&info.id));
    assert!(!vol.exists());
}

#[test]
fn an_init_that_exits_on_its_own_is_recorded_stopped() {
    let host = Host::new();
    let d = host.daemon();
    let info = d.create("a", true);
    host.fake.crash(&info.id);
    for _ in 0..200 {
        if d.state("a") == SandboxState::Stopped {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let rec = d.engine.record("a").unwrap();
    assert_eq!(rec.state, SandboxState::Stopped);
    assert!(rec.last_error.unwrap().contains("exited unexpectedly"));
}

#[test]
fn a_failed_start_leaves_nothing_behind() {
    let host = Host::new();
    let d = host.daemon();
    host.fake.fail_next("start", "no room at the inn");
    let e = d
        .run(d.engine.create(
            &me(),
            CreateSandboxRequest {
                name: Some("a".into()),
                manifest: None,
                start: true,
            },
        ))
        .unwrap_err();
    assert!(e.to_string().contains("no room at the inn"), "{e}");
    assert!(d.engine.record("a").is_err());
    assert!(
        std::fs::read_dir(d.engine.pool.sandboxes_dir())
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn snapshots_form_a_tree_and_rollback_moves_the_head() {
    let host = Host::new();
    let d = host.daemon();
    d.create("a", true);
    d.exec("a", &["write", "/f", "one"]).unwrap();
    let s1 = d.snapshot("a", "s1");
    assert!(s1.head && s1.parent.is_none());
    d.exec("a", &["write", "/f", "two"]).unwrap();
    let s2 = d.snapshot("a", "s2");
    assert_eq!(s2.parent.as_deref(), Some("s1"));

    let id_before = d.engine.record("a").unwrap().init_pid;
    d.rollback("a", "s1");
    let rec = d.engine.record("a").unwrap();
    assert_eq!(
        rec.state,
        SandboxState::Running,
        "a running sandbox runs again"
    );
    assert_ne!(rec.init_pid, id_before, "on a fresh start");
    assert_eq!(rec.pending, None);
    assert_eq!(read(&host.volume(&d, "a"), "f").as_deref(), Some("one"));

    // Changing things after a rollback starts a branch.
    d.exec("a", &["write", "/f", "three"]).unwrap();
    let s3 = d.snapshot("a", "s3");
    assert_eq!(s3.parent.as_deref(), Some("s1"));
    let all = d.run(d.engine.snapshots("a")).unwrap();
    let names: Vec<_> = all.iter().map(|s| (s.name.as_str(), s.head)).collect();
    assert_eq!(names, [("s1", false), ("s2", false), ("s3", true)]);

    // Deleting a snapshot a clone came from is refused unless forced.
    d.run(d.engine.clone_sandbox(
        &me(),
        "a",
        crate::model::CloneRequest {
            snapshot: "s2".into(),
            name: "b".into(),
            start: false,
        },
    ))
    .unwrap();
    assert_eq!(read(&host.volume(&d, "b"), "f").as_deref(), Some("two"));
    let refused = d
        .run(d.engine.delete_snapshot(&me(), "a", "s2", false))
        .unwrap_err();
    assert_eq!(refused.code(), "wrong_state");
    d.run(d.engine.delete_snapshot(&me(), "a", "s2", true))
        .unwrap();
    assert_eq!(d.run(d.engine.snapshots("a")).unwrap().len(), 2);
}

#[test]
fn a_snapshot_with_processes_is_restored_running() {
    let host = Host::new();
    let d = host.daemon();
    let info = d.create("a", true);
    d.exec("a", &["write", "/f", "one"]).unwrap();
    let snap = d
        .run(d.engine.snapshot(
            &me(),
            "a",
            SnapshotRequest {
                name: Some("p".into()),
                with_processes: true,
                ..Default::default()
            },
        ))
        .unwrap();
    assert!(snap.processes);
    assert!(
        !host.fake.is_frozen(&info.id),
        "thawed after the checkpoint"
    );
    d.exec("a", &["write", "/f", "two"]).unwrap();
    d.rollback("a", "p");
    assert!(host.fake.calls().contains(&format!("restore {}", info.id)));
    assert_eq!(read(&host.volume(&d, "a"), "f").as_deref(), Some("one"));

    // A restore that fails falls back to a fresh start and says so.
    std::fs::remove_dir_all(d.engine.state_dir_for_tests().join("checkpoints")).unwrap();
    let e = d
        .run(d.engine.rollback(
            &me(),
            "a",
            RollbackRequest {
                to: "p".into(),
                paths: Vec::new(),
            },
        ))
        .unwrap_err();
    assert_eq!(e.code(), "checkpoint_failed");
    assert!(e.to_string().contains("started afresh"), "{e}");
    assert_eq!(d.state("a"), SandboxState::Running);
}

#[test]
fn what_a_backend_cannot_do_is_refused_before_anything_changes() {
    let host = Host::with(FakeBackend::with_capabilities(Capabilities {
        checkpoint: false,
        pty: false,
        live_snapshot: false,
    }));
    let d = host.daemon();
    d.create("a", true);
    let tty = d
        .exec_req(
            "a",
            ExecRequest {
                argv: vec!["true".into()],
                tty: Some(crate::model::TtySize { rows: 24, cols: 80 }),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_eq!(tty.code(), "invalid_request");
    assert!(tty.to_string().contains("no terminals"), "{tty}");
    let live = d
        .run(d.engine.snapshot(&me(), "a", SnapshotRequest::default()))
        .unwrap_err();
    assert_eq!(live.code(), "wrong_state");
    d.run(d.engine.stop(&me(), "a", None)).unwrap();
    d.snapshot("a", "cold");
    d.run(d.engine.start(&me(), "a")).unwrap();
    let ck = d
        .run(d.engine.snapshot(
            &me(),
            "a",
            SnapshotRequest {
                with_processes: true,
                ..Default::default()
            },
        ))
        .unwrap_err();
    // (refused as a live snapshot first: this backend can do neither)
    assert!(matches!(ck.code(), "wrong_state" | "invalid_request"));
    assert_eq!(d.run(d.engine.snapshots("a")).unwrap().len(), 1);
}

#[test]
fn a_failed_command_under_rollback_on_failure_is_undone() {
    let host = Host::new();
    let d = host.daemon();
    d.create("a", true);
    d.exec("a", &["write", "/f", "kept"]).unwrap();
    let (code, _) = d
        .exec_req(
            "a",
            ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "write /f lost && exit 1".into()],
                rollback_on_failure: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_ne!(code, 0);
    assert_eq!(read(&host.volume(&d, "a"), "f").as_deref(), Some("kept"));
    assert_eq!(d.state("a"), SandboxState::Running);
}

#[test]
fn automatic_snapshots_are_kept_to_the_specs_retention() {
    let host = Host::new();
    let d = host.daemon();
    let mut m = devbox_spec::SandboxManifest::new(None, Default::default());
    m.spec.rollback.auto_snapshot = true;
    m.spec.rollback.keep = Some(2);
    d.create_with("a", true, Some(m));
    for i in 0..4 {
        d.exec("a", &["write", "/f", &i.to_string()]).unwrap();
    }
    let snaps = d.run(d.engine.snapshots("a")).unwrap();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert!(snaps.iter().all(|s| s.auto));
    // The newest automatic snapshot holds the state before the last exec.
    let newest = snaps.iter().max_by_key(|s| s.created_at.clone()).unwrap();
    d.rollback("a", &newest.name);
    assert_eq!(read(&host.volume(&d, "a"), "f").as_deref(), Some("2"));
}

#[test]
fn approvals_gate_a_command_until_someone_decides() {
    let host = Host::new();
    let d = host.daemon();
    d.create("a", true);
    d.run(
        d.engine.add_policy(
            &me(),
            "gate".into(),
            None,
            r#"package devbox.gate
import rego.v1
default decision := "allow"
decision := "require_approval" if {
    some c in input.commands
    c.program == "echo"
    c.args[0] == "gated"
}
reasons contains "echo gated needs a human" if decision == "require_approval"
"#
            .into(),
        ),
    )
    .unwrap();
    assert_eq!(d.exec("a", &["echo", "free"]).unwrap().0, 0);
    let gated = || ExecRequest {
        argv: vec!["echo".into(), "gated".into()],
        ..Default::default()
    };
    let approval = match d.exec_req("a", gated()) {
        Err(EngineError::ApprovalRequired(a)) => a,
        other => panic!("expected an approval, got {other:?}"),
    };
    assert!(approval.reasons.iter().any(|r| r.contains("needs a human")));
    // Not approved yet: naming it does not help.
    let mut named = gated();
    named.approval = Some(approval.id.clone());
    assert!(d.exec_req("a", named.clone()).is_err());
    d.run(d.engine.decide(&me(), &approval.id, true, None))
        .unwrap();
    assert_eq!(
        d.exec_req("a", named.clone()).unwrap(),
        (0, "gated\n".into())
    );
    // Used once.
    assert!(d.exec_req("a", named).is_err());

    // A denied one stays denied.
    let second = match d.exec_req("a", gated()) {
        Err(EngineError::ApprovalRequired(a)) => a,
        other => panic!("expected an approval, got {other:?}"),
    };
    d.run(d.engine.decide(&me(), &second.id, false, Some("no".into())))
        .unwrap();
    let mut named = gated();
    named.approval = Some(second.id.clone());
    assert!(d.exec_req("a", named).is_err());
    let log = d.run(d.engine.audit_log(None, None, 1000)).unwrap();
    assert!(log.iter().any(|r| r.action == "exec"));
    // Each record names the caller the engine was given.
    assert!(log.iter().all(|r| r.actor == "tester"), "{log:?}");
    let decided = d.run(d.engine.approval(&approval.id)).unwrap();
    assert_eq!(decided.requested_by, "tester");
    assert_eq!(decided.decided_by.as_deref(), Some("tester"));
}

// --- reconcile: a daemon killed at each recorded step ---

#[test]
fn reconcile_undoes_an_interrupted_create_and_finishes_a_destroy() {
    let host = Host::new();
    let d = host.daemon();
    let a = d.create("a", true);
    let b = d.create("b", true);
    // Killed during a create (recorded `creating`, volume and sandbox made) and during a
    // destroy (recorded `destroying`).
    let mut ra = d.engine.record("a").unwrap();
    ra.state = SandboxState::Creating;
    d.engine.store.update_sandbox(&ra).unwrap();
    let mut rb = d.engine.record("b").unwrap();
    rb.state = SandboxState::Destroying;
    d.engine.store.update_sandbox(&rb).unwrap();
    let vol_a = host.volume(&d, "a");
    d.kill();

    let d = host.daemon();
    assert!(d.engine.record("a").is_err());
    assert!(d.engine.record("b").is_err());
    assert!(!host.fake.holds(&a.id) && !host.fake.holds(&b.id));
    assert!(!vol_a.exists());
}

#[test]
fn reconcile_keeps_what_answers_and_stops_what_does_not() {
    let host = Host::new();
    let d = host.daemon();
    let live = d.create("live", true);
    let dead = d.create("dead", true);
    let hung = d.create("hung", true);
    let frozen = d.create("frozen", true);
    d.kill();
    host.fake.crash(&dead.id);
    host.fake.hang(&hung.id);
    host.fake.leave_frozen(&frozen.id);
    host.fake.plant_orphan("nobody");

    let d = host.daemon();
    assert_eq!(d.state("live"), SandboxState::Running);
    assert!(host.fake.is_running(&live.id));
    assert_eq!(d.exec("live", &["echo", "still"]).unwrap().1, "still\n");

    let rec = d.engine.record("dead").unwrap();
    assert_eq!(rec.state, SandboxState::Stopped);
    assert!(
        rec.last_error
            .unwrap()
            .contains("while the daemon was not running")
    );

    let rec = d.engine.record("hung").unwrap();
    assert_eq!(rec.state, SandboxState::Stopped);
    assert!(rec.last_error.unwrap().contains("did not answer"));
    assert!(!host.fake.holds(&hung.id));

    assert_eq!(d.state("frozen"), SandboxState::Running, "thawed and kept");
    assert!(!host.fake.is_frozen(&frozen.id));

    assert!(!host.fake.holds("nobody"), "what no record owns is removed");
}

#[test]
fn reconcile_finishes_a_rollback_at_each_step() {
    // Steps of a rollback as recorded: (1) the new volume built, pending written;
    // (2) the current volume moved aside; (3) the new one in place. And (0): pending
    // written but the new volume never built.
    for step in 0..4 {
        let host = Host::new();
        let d = host.daemon();
        d.create("a", true);
        d.exec("a", &["write", "/f", "old"]).unwrap();
        let snap = d.snapshot("a", "s1");
        d.exec("a", &["write", "/f", "new"]).unwrap();
        let mut rec = d.engine.record("a").unwrap();
        let vol = d.engine.sandbox_volume(&rec.id);
        let new = d
            .engine
            .pool
            .sandboxes_dir()
            .join(format!("{}.rollback-new", rec.id));
        let aside = d
            .engine
            .pool
            .sandboxes_dir()
            .join(format!("{}.pre-rollback", rec.id));
        let target = d.engine.store.snapshot(&snap.id).unwrap().unwrap();
        if step >= 1 {
            d.engine
                .pool
                .snapshot(&d.engine.snapshot_path(&target), &new, false)
                .unwrap();
        }
        if step >= 2 {
            std::fs::rename(&vol, &aside).unwrap();
        }
        if step >= 3 {
            std::fs::rename(&new, &vol).unwrap();
        }
        rec.pending = Some(
            serde_json::to_string(&Pending::Rollback {
                to: snap.id.clone(),
                selective: false,
                resume: true,
            })
            .unwrap(),
        );
        rec.head = None;
        d.engine.store.update_sandbox(&rec).unwrap();
        d.kill();

        let d = host.daemon();
        let rec = d.engine.record("a").unwrap();
        assert_eq!(rec.pending, None, "step {step}");
        assert!(!new.exists() && !aside.exists(), "step {step}");
        let expect = if step == 0 { "new" } else { "old" };
        assert_eq!(read(&vol, "f").as_deref(), Some(expect), "step {step}");
        if step == 0 {
            assert_eq!(rec.head, None, "step {step}: nothing rolled back");
        } else {
            assert_eq!(rec.head.as_deref(), Some(snap.id.as_str()), "step {step}");
            assert_eq!(rec.state, SandboxState::Running, "step {step}: resumed");
        }
        d.kill();
    }
}

#[test]
fn reconcile_drops_an_unfinished_snapshot_of_the_copy_driver() {
    let host = Host::new();
    let d = host.daemon();
    d.create("a", false);
    let snap = d.snapshot("a", "s1");
    let mut rec = d.engine.store.snapshot(&snap.id).unwrap().unwrap();
    rec.state = SnapshotState::Creating;
    d.engine.store.update_snapshot(&rec).unwrap();
    let path = d.engine.snapshot_path(&rec);
    d.kill();
    let d = host.daemon();
    assert!(d.engine.store.snapshot(&snap.id).unwrap().is_none());
    assert!(!path.exists());
    assert!(d.run(d.engine.snapshots("a")).unwrap().is_empty());
}

impl Engine {
    fn state_dir_for_tests(&self) -> &Path {
        &self.cfg.state_dir
    }
}

// --- errors ---

#[test]
fn internal_errors_keep_their_typed_cause_and_their_message() {
    let e = EngineError::internal("export", std::io::Error::from_raw_os_error(libc::ENOSPC));
    assert_eq!(e.code(), "internal");
    assert!(e.to_string().starts_with("export: No space left"), "{e}");
    let cause = std::error::Error::source(&e).expect("a source");
    match cause.downcast_ref::<crate::InternalSource>() {
        Some(crate::InternalSource::Io(io)) => assert_eq!(io.raw_os_error(), Some(libc::ENOSPC)),
        other => panic!("expected an io cause, got {other:?}"),
    }
    let e: EngineError = devbox_backend::BackendError::Other("the host said no".into()).into();
    assert_eq!(e.to_string(), "the host said no");
    assert!(matches!(
        e,
        EngineError::Internal {
            source: crate::InternalSource::Backend(_),
            ..
        }
    ));
}

#[test]
fn limits_change_live_through_the_backend_and_bad_ones_change_nothing() {
    let host = Host::new();
    let d = host.daemon();
    let info = d.create("a", true);
    let update =
        |req: devbox_wire::UpdateLimitsRequest| d.run(d.engine.update_limits(&me(), "a", req));
    let changed = update(devbox_wire::UpdateLimitsRequest {
        memory: Some("2Gi".into()),
        cpu: Some("2".into()),
        pids: Some(2048),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(changed.limits.memory_bytes, 2 << 30);
    assert!(
        host.fake.calls().contains(&format!(
            "update {} memory={} pids=2048 cpu=2000",
            info.id,
            2u64 << 30
        )),
        "{:?}",
        host.fake.calls()
    );
    let spec = |d: &Daemon| d.engine.record("a").unwrap().manifest;
    let before = spec(&d);
    // Invalid, out of range, empty, or refused by the backend: nothing changes.
    for (req, code) in [
        (
            devbox_wire::UpdateLimitsRequest {
                memory: Some("lots".into()),
                ..Default::default()
            },
            "invalid_spec",
        ),
        (
            devbox_wire::UpdateLimitsRequest {
                pids: Some(1),
                cpu: Some("3".into()),
                ..Default::default()
            },
            "invalid_spec",
        ),
        (
            devbox_wire::UpdateLimitsRequest::default(),
            "invalid_request",
        ),
        (
            // The copy-driver pool of these tests cannot hold a quota.
            devbox_wire::UpdateLimitsRequest {
                disk: Some("1Gi".into()),
                cpu: Some("3".into()),
                ..Default::default()
            },
            "invalid_request",
        ),
    ] {
        let e = update(req).unwrap_err();
        assert_eq!(e.code(), code, "{e}");
        assert_eq!(spec(&d), before);
    }
    host.fake.fail_next("update", "the cgroup said no");
    let e = update(devbox_wire::UpdateLimitsRequest {
        pids: Some(100),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("the cgroup said no"), "{e}");
    assert_eq!(spec(&d), before);
    // A stopped sandbox: only the spec changes; the backend is not asked.
    d.run(d.engine.stop(&me(), "a", None)).unwrap();
    let calls = host.fake.calls().len();
    update(devbox_wire::UpdateLimitsRequest {
        exec_timeout: Some("5m".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(host.fake.calls().len(), calls);
    assert!(
        d.engine
            .record("a")
            .unwrap()
            .manifest
            .contains("\"execTimeout\":\"5m\"")
    );
}

#[test]
fn an_exec_past_its_timeout_is_killed_and_says_so() {
    let host = Host::new();
    let d = host.daemon();
    d.create("a", true);
    let run = |timeout: Option<&str>, argv: &[&str]| {
        d.run(async {
            let req = ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                timeout: timeout.map(str::to_string),
                ..Default::default()
            };
            let s = d.engine.exec(&me(), "a", &req, false).await?;
            s.wait().await
        })
    };
    let exit = run(Some("200ms"), &["sleep"]).unwrap();
    assert_eq!(
        (exit.code, exit.timed_out, exit.oom_killed),
        (124, true, false)
    );
    let exit = run(Some("10s"), &["exit", "3"]).unwrap();
    assert_eq!((exit.code, exit.timed_out), (3, false));
    let e = run(Some("soon"), &["true"]).unwrap_err();
    assert_eq!(e.code(), "invalid_request", "{e}");
    // The spec's default applies when the exec names none.
    let m = devbox_spec::SandboxManifest::parse(
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n  limits: {execTimeout: 100ms}\n",
    )
    .unwrap();
    d.create_with("b", true, Some(m));
    let exit = d
        .run(async {
            let req = ExecRequest {
                argv: vec!["sleep".into()],
                ..Default::default()
            };
            d.engine.exec(&me(), "b", &req, false).await?.wait().await
        })
        .unwrap();
    assert!(exit.timed_out && exit.code == 124, "{exit:?}");
}

#[test]
fn network_rules_change_live_persist_and_follow_clones() {
    let host = Host::new();
    let d = host.daemon();
    let manifest = devbox_spec::SandboxManifest::parse(
        "apiVersion: sandbox.io/v1\nkind: Sandbox\nspec:\n  network: {mode: allow, allow: [pypi.org], ports: ['18080:80']}\n",
    )
    .expect("spec");
    // The fake backend's daemon has no networks: a sandbox with one cannot start here (the
    // CLI tests run them), but its rules are kept and changed all the same.
    let e = d.engine.clone();
    let err = d
        .run(e.create(
            &me(),
            CreateSandboxRequest {
                name: Some("net".into()),
                manifest: Some(manifest.clone()),
                start: true,
            },
        ))
        .unwrap_err();
    assert!(err.to_string().contains("has none"), "{err}");
    assert!(e.record("net").is_err(), "a failed create leaves no record");
    d.create_with("net", false, Some(manifest));
    let n = d
        .run(e.network_allow(
            &me(),
            "net",
            vec!["*.npmjs.org".into(), "10.1.2.0/24:443".into()],
        ))
        .expect("allow");
    assert_eq!(n.allow, ["pypi.org", "*.npmjs.org", "10.1.2.0/24:443"]);
    assert!(n.changed);
    // A bad rule changes nothing.
    let err = d
        .run(e.network_deny(&me(), "net", vec!["ok.org".into(), "10.0.0.1/8".into()]))
        .unwrap_err();
    assert!(err.to_string().contains("10.0.0.0/8"), "{err}");
    let n = d
        .run(e.network_deny(&me(), "net", vec!["pypi.org".into()]))
        .expect("deny");
    assert_eq!(
        (n.allow.len(), n.deny.clone()),
        (2, vec!["pypi.org".to_string()])
    );
    // The policies see the rules in force.
    let c = d
        .run(e.check_command(
            &me(),
            Some("net".into()),
            "curl https://pypi.org/".into(),
            None,
        ))
        .expect("check");
    assert!(
        c.findings
            .iter()
            .any(|f| f.rule == "net.egress_not_allowed"),
        "{c:?}"
    );
    let c = d
        .run(e.check_command(
            &me(),
            Some("net".into()),
            "curl https://x.npmjs.org/".into(),
            None,
        ))
        .expect("check");
    assert!(c.findings.is_empty(), "{c:?}");
    // Audited with the rules.
    let audit = e.store.audit(Some("net"), None, 100).expect("audit");
    let actions: Vec<&str> = audit.iter().map(|r| r.action.as_str()).collect();
    assert!(
        actions.contains(&"network.allow") && actions.contains(&"network.deny"),
        "{actions:?}"
    );
    assert!(
        audit
            .iter()
            .any(|r| r.action == "network.deny" && r.detail["outcome"] != "ok")
    );
    // A clone keeps mode and rules (not the host ports).
    d.snapshot("net", "s1");
    d.run(e.clone_sandbox(
        &me(),
        "net",
        crate::model::CloneRequest {
            snapshot: "s1".into(),
            name: "net2".into(),
            start: false,
        },
    ))
    .expect("clone");
    let c2 = d.run(e.network_status("net2")).expect("status");
    assert_eq!(
        (c2.mode.as_str(), c2.allow.clone(), c2.deny.clone()),
        ("allow", n.allow.clone(), n.deny.clone())
    );
    assert!(c2.ports.is_empty());
    // Blocked attempts are audited, counted per target and bounded.
    let id = e.record("net").expect("record").id;
    let mut attempts = vec![
        crate::network::Blocked {
            sandbox_id: id.clone(),
            kind: "dns",
            target: "evil.com".into()
        };
        3
    ];
    for i in 0..50 {
        attempts.push(crate::network::Blocked {
            sandbox_id: id.clone(),
            kind: "connect",
            target: format!("10.9.0.{i}:443"),
        });
    }
    e.record_blocked(attempts);
    let log = d.run(e.network_log("net", None)).expect("log");
    assert_eq!(
        log.len(),
        crate::network::MAX_BLOCKED_RECORDS + 1,
        "{log:?}"
    );
    assert_eq!(
        (log[0].kind.as_str(), log[0].target.as_str(), log[0].count),
        ("dns", "evil.com", 3)
    );
    assert_eq!(log.last().map(|l| l.count), Some(31));
    assert!(d.run(e.network_log("net2", None)).expect("log").is_empty());
    // Round after round of new targets: the sandbox's budget bounds the records in all, the
    // rest is held for one summary later.
    let before = d
        .run(e.network_log("net", Some(100_000)))
        .expect("log")
        .len();
    for round in 0..40 {
        let attempts = (0..crate::network::MAX_BLOCKED_RECORDS)
            .map(|i| crate::network::Blocked {
                sandbox_id: id.clone(),
                kind: "dns",
                target: format!("n{round}-{i}.evil.com"),
            })
            .collect();
        e.record_blocked(attempts);
    }
    let after = d
        .run(e.network_log("net", Some(100_000)))
        .expect("log")
        .len();
    assert!(
        after - before <= crate::network::BLOCKED_BURST as usize,
        "{} records for 800 targets",
        after - before
    );
    // Kept across a daemon restart; reset goes back to the spec.
    d.kill();
    let d = host.daemon();
    let e = d.engine.clone();
    let n = d.run(e.network_status("net")).expect("status");
    assert_eq!(n.deny, ["pypi.org"]);
    let n = d.run(e.network_reset(&me(), "net")).expect("reset");
    assert_eq!(
        (n.allow.clone(), n.deny.is_empty(), n.changed),
        (vec!["pypi.org".to_string()], true, false)
    );
    assert_eq!(n.ports, ["18080:80"]);
    // Mode none has nothing to change.
    d.create("plain", false);
    let err = d
        .run(e.network_allow(&me(), "plain", vec!["pypi.org".into()]))
        .unwrap_err();
    assert!(err.to_string().contains("--network allow"), "{err}");
    for name in ["net2", "net", "plain"] {
        d.run(e.destroy(&me(), name, true)).expect("destroy");
    }
    assert_eq!(e.store.network_rules(&id).expect("rules"), None);
}

#[test]
fn event_streams_fill_gaps_skip_duplicates_and_survive_lag() {
    let host = Host::new();
    let d = host.daemon();
    let e = d.engine.clone();
    let who = me();
    e.audit(&who, "sandbox.create", Some("a"), serde_json::json!({}));
    let first = d.run(e.newest_seq()).unwrap();
    d.run(async {
        // Resumed after `first - 1`: the stored record, then live ones.
        let mut s = e
            .event_stream(crate::EventFilter::default(), Some(first - 1))
            .await
            .unwrap();
        let next_id = |item: Option<crate::StreamItem>| match item {
            Some(crate::StreamItem::Event(ev)) => ev.id,
            other => panic!("{other:?}"),
        };
        assert_eq!(next_id(s.next().await.unwrap()), first);
        // Two records committed, only the later one broadcast (as when two threads append
        // and the second publishes first): the earlier comes from the store, once.
        let a = e
            .store
            .append_audit("x", "exec", Some("a"), &serde_json::json!({}))
            .unwrap();
        let b = e
            .store
            .append_audit("x", "alert.firing", Some("a"), &serde_json::json!({}))
            .unwrap();
        e.events.publish(&b);
        e.events.publish(&a);
        e.events.publish(&b);
        assert_eq!(next_id(s.next().await.unwrap()), a.seq);
        assert_eq!(next_id(s.next().await.unwrap()), b.seq);
        // Far behind: told how many it missed, then every one of them from the store.
        let before = b.seq;
        for i in 0..crate::BUS_CAPACITY + 10 {
            e.audit(&who, "exec", Some("a"), serde_json::json!({"i": i}));
        }
        match s.next().await.unwrap() {
            Some(crate::StreamItem::Lagged(n)) => assert!(n >= 10, "{n}"),
            other => panic!("{other:?}"),
        }
        for want in before + 1..=before + crate::BUS_CAPACITY as i64 + 10 {
            assert_eq!(next_id(s.next().await.unwrap()), want);
        }
        // Filters apply to stored and live events alike; past events by kind.
        let past = e
            .events(crate::EventFilter::new(None, None, Some("alert")), 10)
            .await
            .unwrap();
        assert_eq!(past.len(), 1);
        assert_eq!(past[0].id, b.seq);
        assert_eq!(past[0].kind, "alert");
    });
    d.kill();
}

#[test]
fn unhealthy_alert_follows_health_status_records_by_action_alone() {
    let host = Host::new();
    let d = host.daemon();
    let mut spec = devbox_spec::SandboxSpec::default();
    spec.alerts.unhealthy = Some(true);
    d.create_with(
        "h",
        true,
        Some(devbox_spec::SandboxManifest::new(Some("h".into()), spec)),
    );
    d.create("quiet", true);
    let e = d.engine.clone();
    let checker = Caller::system("health");
    let alerts = |name: &str| {
        d.run(e.events(
            crate::EventFilter::new(Some(name.into()), None, Some("alert")),
            100,
        ))
        .unwrap()
        .into_iter()
        .map(|ev| {
            (
                ev.action,
                ev.details["rule"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect::<Vec<_>>()
    };
    let wait_for = |name: &str, n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alerts(name).len() < n {
            assert!(std::time::Instant::now() < deadline, "{:?}", alerts(name));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for (name, status) in [
        ("h", "starting"),
        ("h", "unhealthy"),
        ("h", "unhealthy"),
        ("quiet", "unhealthy"),
    ] {
        e.audit(
            &checker,
            "health.status",
            Some(name),
            serde_json::json!({"status": status, "previous": null}),
        );
    }
    wait_for("h", 1);
    let active = d.run(e.inspect("h")).unwrap().alerts;
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].rule, "unhealthy");
    e.audit(
        &checker,
        "health.status",
        Some("h"),
        serde_json::json!({"status": "healthy", "previous": "unhealthy"}),
    );
    wait_for("h", 2);
    let firing = ("alert.firing".to_string(), "unhealthy".to_string());
    let resolved = ("alert.resolved".to_string(), "unhealthy".to_string());
    assert_eq!(alerts("h"), [firing, resolved]);
    // Without the rule, nothing fires.
    assert!(alerts("quiet").is_empty());
    assert!(d.run(e.inspect("h")).unwrap().alerts.is_empty());
    d.kill();
}
