//! The daemon's state, in one SQLite database (WAL mode).
//!
//! [`Store`] holds [`SandboxRecord`]s and [`ImageRecord`]s. Every lifecycle step writes its
//! state here *before* acting on the host (a sandbox is `creating` before its volume exists,
//! `destroying` before anything is removed), so a daemon killed at any instant leaves records
//! that tell a restarted daemon what to finish or undo. Schema changes are numbered
//! migrations applied at open.

use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, params};

mod network;
mod safety;
mod snapshots;
mod tokens;
mod uids;
pub use safety::{
    ApprovalRecord, ApprovalState, AuditRecord, AuditVerification, ExecRecord, GENESIS,
    PRUNE_ACTION, PolicyRecord, RETENTION_ACTOR, audit_hash,
};
use serde::{Deserialize, Serialize};
pub use snapshots::{SnapshotRecord, SnapshotState};
pub use tokens::TokenRecord;
pub use uids::{BLOCK_SLOTS, DEFAULT_REGISTRY, UidRegistry};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value could not be decoded.
    #[error("state database holds an unreadable value: {0}")]
    Decode(String),
    /// A unique name is taken.
    #[error("{0} already exists")]
    Conflict(String),
    /// Every id range is in use.
    #[error("no free user-id range is left for a new sandbox")]
    Exhausted,
    /// The host-wide registry of uid ranges could not be used.
    #[error("host uid registry: {0}")]
    UidRegistry(String),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Being created; not usable yet.
    Creating,
    /// Its processes run.
    Running,
    /// Its files exist; no process runs.
    Stopped,
    /// Being destroyed.
    Destroying,
    /// The daemon could not bring it in line with the host at its start (its `last_error`
    /// says why): nothing is started in it; `destroy` removes it, and the next daemon start
    /// tries again.
    Broken,
}

impl SandboxState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Destroying => "destroying",
            Self::Broken => "broken",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "creating" => Self::Creating,
            "running" => Self::Running,
            "stopped" => Self::Stopped,
            "destroying" => Self::Destroying,
            "broken" => Self::Broken,
            other => return Err(StoreError::Decode(format!("sandbox state {other:?}"))),
        })
    }

    /// Whether the sandbox can be started.
    pub fn can_start(self) -> bool {
        self == Self::Stopped
    }

    /// Whether commands can run in it.
    pub fn can_exec(self) -> bool {
        self == Self::Running
    }
}

/// One sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    /// Internal id (names of its volume, cgroup and runtime dir).
    pub id: String,
    /// User-facing name.
    pub name: String,
    /// The spec, as JSON (a `SandboxManifest`).
    pub manifest: String,
    /// Image id.
    pub image_id: String,
    /// Lifecycle state.
    pub state: SandboxState,
    /// Host uid that the sandbox's root maps to.
    pub uid_base: u32,
    /// Host pid of the init process while running.
    pub init_pid: Option<i32>,
    /// Start time (clock ticks since boot) of that pid, to detect pid reuse.
    pub init_start: Option<u64>,
    /// Created, ms since epoch.
    pub created_at: i64,
    /// Last started.
    pub started_at: Option<i64>,
    /// Last stopped.
    pub stopped_at: Option<i64>,
    /// Why the last start or stop failed.
    pub last_error: Option<String>,
    /// Destroy when its one exec ends (`sandbox run --rm`).
    pub ephemeral: bool,
    /// The kind of backend that runs it (`native`, ...).
    pub backend: String,
    /// What its backend recorded to find what it made (the native backend: the cgroup's
    /// name); opaque to everyone else.
    pub handle: Option<String>,
    /// The snapshot the current state descends from (taken last, or rolled back to).
    pub head: Option<String>,
    /// The snapshot this sandbox was cloned from.
    pub origin: Option<String>,
    /// An operation under way (JSON), finished or undone by a restart if the daemon dies.
    pub pending: Option<String>,
}

/// One image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// Content id.
    pub id: String,
    /// Name (unique).
    pub name: String,
    /// Source format.
    pub format: String,
    /// Run settings as JSON.
    pub config: String,
    /// Bytes.
    pub size_bytes: u64,
    /// Imported, ms since epoch.
    pub created_at: i64,
    /// What was imported.
    pub source: String,
}

const MIGRATIONS: &[&str] = &[
    // 1: sandboxes and images.
    "CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        manifest TEXT NOT NULL,
        image_id TEXT NOT NULL,
        state TEXT NOT NULL,
        uid_base INTEGER NOT NULL UNIQUE,
        init_pid INTEGER,
        init_start INTEGER,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        stopped_at INTEGER,
        last_error TEXT,
        ephemeral INTEGER NOT NULL DEFAULT 0
     );
     CREATE TABLE images (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        format TEXT NOT NULL,
        config TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        source TEXT NOT NULL
     );",
    // 2: a sandbox's cgroup is named apart from its id (warm launchers bring their own).
    "ALTER TABLE sandboxes ADD COLUMN cgroup TEXT;",
    // 3: snapshots, and where a sandbox stands in its history.
    "ALTER TABLE sandboxes ADD COLUMN head TEXT;
     ALTER TABLE sandboxes ADD COLUMN origin TEXT;
     ALTER TABLE sandboxes ADD COLUMN pending TEXT;
     CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        sandbox_id TEXT NOT NULL,
        name TEXT NOT NULL,
        parent_id TEXT,
        state TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        message TEXT,
        labels TEXT NOT NULL DEFAULT '{}',
        auto INTEGER NOT NULL DEFAULT 0,
        size_bytes INTEGER,
        processes INTEGER NOT NULL DEFAULT 0,
        UNIQUE (sandbox_id, name)
     );
     CREATE INDEX snapshots_by_sandbox ON snapshots (sandbox_id, created_at);",
    // 4: the safety layer: policies, approvals, the audit chain, execs.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE policies (
        name TEXT NOT NULL,
        sandbox TEXT,
        scope TEXT GENERATED ALWAYS AS (COALESCE(sandbox, '')) STORED,
        rego TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (name, scope)
     );
     CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        sandbox TEXT NOT NULL,
        command TEXT NOT NULL,
        request TEXT NOT NULL,
        reasons TEXT NOT NULL,
        risk TEXT NOT NULL,
        state TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        decided_by TEXT,
        reason TEXT,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        decided_at INTEGER
     );
     CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        time INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        sandbox TEXT,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
     );
     CREATE INDEX audit_by_sandbox ON audit (sandbox, seq);
     CREATE TABLE execs (
        id TEXT PRIMARY KEY,
        sandbox TEXT NOT NULL,
        command TEXT NOT NULL,
        decision TEXT NOT NULL,
        actor TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        ended_at INTEGER,
        exit_code INTEGER,
        cpu_usec INTEGER,
        max_rss_kib INTEGER,
        stdout_bytes INTEGER NOT NULL DEFAULT 0,
        stderr_bytes INTEGER NOT NULL DEFAULT 0
     );
     CREATE INDEX execs_by_sandbox ON execs (sandbox, started_at);",
    // 5: retention's records in the audit chain are looked up by action.
    "CREATE INDEX audit_by_action ON audit (action, seq);",
    // 6: sandboxes name their backend; the cgroup's name becomes the backend's opaque handle.
    "ALTER TABLE sandboxes ADD COLUMN backend TEXT NOT NULL DEFAULT 'native';
     ALTER TABLE sandboxes RENAME COLUMN cgroup TO handle;",
    // 7: live network rules (changed since create), apart from the spec's.
    "CREATE TABLE IF NOT EXISTS network_rules (
        sandbox_id TEXT PRIMARY KEY,
        rules TEXT NOT NULL
     );",
    // 8: API tokens for remote callers (a hash of each secret, never the secret).
    "CREATE TABLE IF NOT EXISTS tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        secret_hash TEXT NOT NULL,
        scopes TEXT NOT NULL,
        sandbox TEXT,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        expires_at INTEGER,
        last_used_at INTEGER,
        rate_per_second REAL,
        max_execs INTEGER
     );",
];

/// First host uid handed to sandboxes; each gets [`ID_RANGE`] ids from there.
pub const UID_BASE_START: u32 = 1_000_000;
/// Ids mapped per sandbox.
pub const ID_RANGE: u32 = 65_536;
pub(crate) const MAX_SLOTS: u32 = (u32::MAX - UID_BASE_START) / ID_RANGE - 1;

/// The state database.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    /// The host-wide uid registry and the blocks this daemon owns in it; without one
    /// (tests, a lone daemon), every slot is this store's.
    uids: Mutex<Option<(UidRegistry, Vec<u32>)>>,
}

const SANDBOX_COLS: &str = "id, name, manifest, image_id, state, uid_base, init_pid, init_start, created_at, started_at, stopped_at, last_error, ephemeral, handle, head, origin, pending, backend";

fn sandbox_row(r: &Row<'_>) -> rusqlite::Result<(SandboxRecord, String)> {
    let state: String = r.get(4)?;
    Ok((
        SandboxRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            manifest: r.get(2)?,
            image_id: r.get(3)?,
            state: SandboxState::Stopped,
            uid_base: r.get(5)?,
            init_pid: r.get(6)?,
            init_start: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
            created_at: r.get(8)?,
            started_at: r.get(9)?,
            stopped_at: r.get(10)?,
            last_error: r.get(11)?,
            ephemeral: r.get(12)?,
            handle: r.get(13)?,
            head: r.get(14)?,
            origin: r.get(15)?,
            pending: r.get(16)?,
            backend: r.get(17)?,
        },
        state,
    ))
}

/// A record whose state cannot be read is `broken` (and says why), so that one bad row
/// neither hides the others nor stops the daemon.
fn finish(row: (SandboxRecord, String)) -> Result<SandboxRecord, StoreError> {
    let (mut rec, state) = row;
    match SandboxState::parse(&state) {
        Ok(s) => rec.state = s,
        Err(e) => {
            rec.state = SandboxState::Broken;
            let mut why = format!("the daemon cannot use its record ({e})");
            if let Some(before) = rec.last_error.take() {
                why = format!("{why}; before: {before}");
            }
            rec.last_error = Some(why);
        }
    }
    Ok(rec)
}

fn image_row(r: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        format: r.get(2)?,
        config: r.get(3)?,
        size_bytes: r.get::<_, i64>(4)? as u64,
        created_at: r.get(5)?,
        source: r.get(6)?,
    })
}

pub(crate) fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

impl Store {
    /// Opens (creating and migrating as needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory database (tests).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            conn.execute_batch(&format!(
                "BEGIN; {sql}; PRAGMA user_version = {}; COMMIT;",
                i + 1
            ))?;
        }
        let store = Self {
            conn: Mutex::new(conn),
            uids: Mutex::new(None),
        };
        if (1..5).contains(&version) {
            store.record_legacy_prune()?;
        }
        Ok(store)
    }

    /// Uses the host-wide uid registry: claims the blocks that this store's sandboxes use
    /// already, and takes new sandboxes' ranges only from blocks it owns there. Returns a
    /// warning per sandbox whose range another daemon's registry entry holds (it was made
    /// before the registry existed, or the registry was edited).
    pub fn use_uid_registry(&self, registry: UidRegistry) -> Result<Vec<String>, StoreError> {
        let recs = self.sandboxes()?;
        let bases: Vec<u32> = recs.iter().map(|r| r.uid_base).collect();
        let (owned, conflicts) = registry.claim_existing(&bases)?;
        let warnings = recs
            .iter()
            .filter_map(|r| {
                let b = uids::block_of(r.uid_base)?;
                let (_, other) = conflicts.iter().find(|(x, _)| *x == b)?;
                Some(format!(
                    "sandbox {} maps host uids {}..{}, which {} says belong to the daemon of {}",
                    r.name,
                    r.uid_base,
                    r.uid_base as u64 + ID_RANGE as u64,
                    registry.path().display(),
                    other.display()
                ))
            })
            .collect();
        *self.uids.lock().unwrap_or_else(|p| p.into_inner()) = Some((registry, owned));
        Ok(warnings)
    }

    /// The lowest free slot, given the used uid bases: inside this daemon's blocks when a
    /// registry is in use (claiming another block when they are full).
    fn free_slot(&self, used: &[u32]) -> Result<u32, StoreError> {
        let free_in = |slots: &mut dyn Iterator<Item = u32>| {
            slots.filter(|s| *s <= MAX_SLOTS).find(|s| {
                used.binary_search(&(UID_BASE_START + s * ID_RANGE))
                    .is_err()
            })
        };
        let mut uids = self.uids.lock().unwrap_or_else(|p| p.into_inner());
        let Some((registry, owned)) = uids.as_mut() else {
            return free_in(&mut (0..=MAX_SLOTS)).ok_or(StoreError::Exhausted);
        };
        let in_blocks = |owned: &[u32]| {
            let mut slots = owned
                .iter()
                .flat_map(|b| b * BLOCK_SLOTS..(b + 1) * BLOCK_SLOTS);
            free_in(&mut slots)
        };
        if let Some(s) = in_blocks(owned) {
            return Ok(s);
        }
        *owned = registry.claim_block()?;
        in_blocks(owned).ok_or(StoreError::Exhausted)
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    /// Inserts a new sandbox in state `creating`, giving it the lowest free uid range.
    /// Fails with [`StoreError::Conflict`] if the name is taken.
    pub fn insert_sandbox(&self, rec: &SandboxRecord) -> Result<SandboxRecord, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let taken: Option<String> = tx.query_row("SELECT id FROM sandboxes WHERE name = ?1", [&rec.name], |r| r.get(0)).optional()?;
            if taken.is_some() {
                return Err(StoreError::Conflict(format!("a sandbox named {:?}", rec.name)));
            }
            let mut used: Vec<u32> = {
                let mut st = tx.prepare("SELECT uid_base FROM sandboxes ORDER BY uid_base")?;
                st.query_map([], |r| r.get::<_, u32>(0))?.collect::<Result<_, _>>()?
            };
            used.dedup();
            let slot = self.free_slot(&used)?;
            let mut out = rec.clone();
            out.uid_base = UID_BASE_START + slot * ID_RANGE;
            out.state = SandboxState::Creating;
            tx.execute(
                &format!("INSERT INTO sandboxes ({SANDBOX_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"),
                params![
                    out.id,
                    out.name,
                    out.manifest,
                    out.image_id,
                    out.state.as_str(),
                    out.uid_base,
                    out.init_pid,
                    out.init_start.map(|v| v as i64),
                    out.created_at,
                    out.started_at,
                    out.stopped_at,
                    out.last_error,
                    out.ephemeral,
                    out.handle,
                    out.head,
                    out.origin,
                    out.pending,
                    out.backend
                ],
            )
            .map_err(|e| if is_unique_violation(&e) { StoreError::Conflict(format!("a sandbox named {:?}", rec.name)) } else { e.into() })?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Writes a sandbox's mutable fields (state, pid, times, error, manifest).
    pub fn update_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE sandboxes SET state = ?2, init_pid = ?3, init_start = ?4, started_at = ?5, stopped_at = ?6, last_error = ?7, manifest = ?8, handle = ?9, head = ?10, origin = ?11, pending = ?12 WHERE id = ?1",
                params![
                    rec.id,
                    rec.state.as_str(),
                    rec.init_pid,
                    rec.init_start.map(|v| v as i64),
                    rec.started_at,
                    rec.stopped_at,
                    rec.last_error,
                    rec.manifest,
                    rec.handle,
                    rec.head,
                    rec.origin,
                    rec.pending
                ],
            )?;
            Ok(())
        })
    }

    /// The sandbox named `name`.
    pub fn sandbox_by_name(&self, name: &str) -> Result<Option<SandboxRecord>, StoreError> {
        self.with(|c| {
            let row = c
                .query_row(
                    &format!("SELECT {SANDBOX_COLS} FROM sandboxes WHERE name = ?1"),
                    [name],
                    sandbox_row,
                )
                .optional()?;
            row.map(finish).transpose()
        })
    }

    /// Every sandbox, by name.
    pub fn sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {SANDBOX_COLS} FROM sandboxes ORDER BY name"
            ))?;
            let rows: Vec<_> = st.query_map([], sandbox_row)?.collect::<Result<_, _>>()?;
            rows.into_iter().map(finish).collect()
        })
    }

    /// Removes a sandbox's record.
    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM network_rules WHERE sandbox_id = ?1", [id])?;
            tx.execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Names of sandboxes using image `id`.
    pub fn sandboxes_using_image(&self, id: &str) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT name FROM sandboxes WHERE image_id = ?1 ORDER BY name")?;
            let rows = st
                .query_map([id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// Records an image (the name must be free).
    pub fn insert_image(&self, rec: &ImageRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO images (id, name, format, config, size_bytes, created_at, source) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![rec.id, rec.name, rec.format, rec.config, rec.size_bytes as i64, rec.created_at, rec.source],
            )
            .map_err(|e| if is_unique_violation(&e) { StoreError::Conflict(format!("an image named {:?} or with id {}", rec.name, rec.id)) } else { e.into() })?;
            Ok(())
        })
    }

    /// Every image, by name.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT id, name, format, config, size_bytes, created_at, source FROM images ORDER BY name")?;
            let rows = st.query_map([], image_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// The image named `reference`, or whose id is or starts with it (at least 6 characters).
    pub fn find_image(&self, reference: &str) -> Result<Option<ImageRecord>, StoreError> {
        let all = self.images()?;
        if let Some(img) = all
            .iter()
            .find(|i| i.name == reference || i.id == reference)
        {
            return Ok(Some(img.clone()));
        }
        let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
        if prefix.len() >= 6 {
            let matches: Vec<_> = all.iter().filter(|i| i.id.starts_with(prefix)).collect();
            if matches.len() == 1 {
                return Ok(Some(matches[0].clone()));
            }
        }
        Ok(None)
    }

    /// Removes an image's record.
    pub fn delete_image(&self, id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("DELETE FROM images WHERE id = ?1", [id])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> SandboxRecord {
        SandboxRecord {
            id: format!("id-{name}"),
            name: name.into(),
            manifest: "{}".into(),
            image_id: "host".into(),
            state: SandboxState::Creating,
            uid_base: 0,
            init_pid: None,
            init_start: None,
            created_at: now_ms(),
            started_at: None,
            stopped_at: None,
            last_error: None,
            ephemeral: false,
            backend: "native".into(),
            handle: None,
            head: None,
            origin: None,
            pending: None,
        }
    }

    #[test]
    fn sandboxes_of_older_databases_are_native_with_their_cgroup_as_handle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let c = Connection::open(&path).unwrap();
            for (i, sql) in MIGRATIONS[..5].iter().enumerate() {
                c.execute_batch(&format!(
                    "BEGIN; {sql}; PRAGMA user_version = {}; COMMIT;",
                    i + 1
                ))
                .unwrap();
            }
            c.execute_batch(
                "INSERT INTO sandboxes (id, name, manifest, image_id, state, uid_base, created_at, cgroup)
                 VALUES ('i1', 'old', '{}', 'host', 'running', 1000000, 0, 'warm-abc'),
                        ('i2', 'older', '{}', 'host', 'stopped', 1065536, 0, NULL);",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let old = s.sandbox_by_name("old").unwrap().unwrap();
        assert_eq!(old.backend, "native");
        assert_eq!(old.handle.as_deref(), Some("warm-abc"));
        let older = s.sandbox_by_name("older").unwrap().unwrap();
        assert_eq!(older.backend, "native");
        assert_eq!(older.handle, None);
        let mut r = rec("new");
        r.backend = "fake".into();
        r.handle = Some("h".into());
        let new = s.insert_sandbox(&r).unwrap();
        let back = s.sandbox_by_name("new").unwrap().unwrap();
        assert_eq!(
            (back.backend.as_str(), back.handle.as_deref()),
            ("fake", Some("h"))
        );
        assert_eq!(back.id, new.id);
    }

    #[test]
    fn uid_ranges_are_unique_and_reused() {
        let s = Store::open_in_memory().unwrap();
        let a = s.insert_sandbox(&rec("a")).unwrap();
        let b = s.insert_sandbox(&rec("b")).unwrap();
        assert_eq!(a.uid_base, UID_BASE_START);
        assert_eq!(b.uid_base, UID_BASE_START + ID_RANGE);
        s.delete_sandbox(&a.id).unwrap();
        let c = s.insert_sandbox(&rec("c")).unwrap();
        assert_eq!(c.uid_base, UID_BASE_START);
    }

    #[test]
    fn names_are_unique() {
        let s = Store::open_in_memory().unwrap();
        s.insert_sandbox(&rec("a")).unwrap();
        let mut dup = rec("a");
        dup.id = "other".into();
        assert!(matches!(
            s.insert_sandbox(&dup),
            Err(StoreError::Conflict(_))
        ));
    }

    #[test]
    fn state_round_trip_and_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state.db");
        {
            let s = Store::open(&path).unwrap();
            let mut r = s.insert_sandbox(&rec("a")).unwrap();
            r.state = SandboxState::Running;
            r.init_pid = Some(42);
            s.update_sandbox(&r).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let r = s.sandbox_by_name("a").unwrap().unwrap();
        assert_eq!((r.state, r.init_pid), (SandboxState::Running, Some(42)));
        assert!(s.sandbox_by_name("zz").unwrap().is_none());
    }

    #[test]
    fn images_by_name_and_prefix() {
        let s = Store::open_in_memory().unwrap();
        let img = ImageRecord {
            id: "abcdef0123456789".into(),
            name: "busybox".into(),
            format: "rootfs_tar".into(),
            config: "{}".into(),
            size_bytes: 1,
            created_at: 0,
            source: "/x.tar".into(),
        };
        s.insert_image(&img).unwrap();
        assert!(s.find_image("busybox").unwrap().is_some());
        assert!(s.find_image("abcdef").unwrap().is_some());
        assert!(s.find_image("abc").unwrap().is_none());
        assert!(matches!(s.insert_image(&img), Err(StoreError::Conflict(_))));
    }
}
