//! Snapshot records: the checkpoint tree of each sandbox.

use rusqlite::{OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

use crate::{Store, StoreError, is_unique_violation};

/// Where a snapshot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    /// Being taken; its volume may not exist yet.
    Creating,
    /// Complete.
    Ready,
    /// Being deleted.
    Deleting,
}

impl SnapshotState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Ready => "ready",
            Self::Deleting => "deleting",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "creating" => Self::Creating,
            "ready" => Self::Ready,
            "deleting" => Self::Deleting,
            other => return Err(StoreError::Decode(format!("snapshot state {other:?}"))),
        })
    }
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Internal id (its volume's name).
    pub id: String,
    /// The sandbox it belongs to.
    pub sandbox_id: String,
    /// Name, unique within the sandbox.
    pub name: String,
    /// The snapshot it descends from.
    pub parent_id: Option<String>,
    /// Lifecycle state.
    pub state: SnapshotState,
    /// Taken, ms since epoch.
    pub created_at: i64,
    /// Free-form message.
    pub message: Option<String>,
    /// Labels as a JSON object.
    pub labels: String,
    /// Taken automatically (before an exec).
    pub auto: bool,
    /// Bytes of files in the snapshot's writable layer, once measured.
    pub size_bytes: Option<u64>,
    /// Also holds the sandbox's processes (a CRIU image).
    pub processes: bool,
}

const COLS: &str = "id, sandbox_id, name, parent_id, state, created_at, message, labels, auto, size_bytes, processes";

fn row(r: &Row<'_>) -> rusqlite::Result<(SnapshotRecord, String)> {
    Ok((
        SnapshotRecord {
            id: r.get(0)?,
            sandbox_id: r.get(1)?,
            name: r.get(2)?,
            parent_id: r.get(3)?,
            state: SnapshotState::Creating,
            created_at: r.get(5)?,
            message: r.get(6)?,
            labels: r.get(7)?,
            auto: r.get(8)?,
            size_bytes: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
            processes: r.get(10)?,
        },
        r.get(4)?,
    ))
}

fn finish(row: (SnapshotRecord, String)) -> Result<SnapshotRecord, StoreError> {
    let (mut rec, state) = row;
    rec.state = SnapshotState::parse(&state)?;
    Ok(rec)
}

impl Store {
    /// Records a new snapshot; fails with [`StoreError::Conflict`] if the name is taken.
    pub fn insert_snapshot(&self, rec: &SnapshotRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                &format!("INSERT INTO snapshots ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
                params![
                    rec.id,
                    rec.sandbox_id,
                    rec.name,
                    rec.parent_id,
                    rec.state.as_str(),
                    rec.created_at,
                    rec.message,
                    rec.labels,
                    rec.auto,
                    rec.size_bytes.map(|v| v as i64),
                    rec.processes
                ],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("a snapshot named {:?}", rec.name))
                } else {
                    e.into()
                }
            })?;
            Ok(())
        })
    }

    /// Writes a snapshot's mutable fields (state, parent, size).
    pub fn update_snapshot(&self, rec: &SnapshotRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE snapshots SET state = ?2, parent_id = ?3, size_bytes = ?4, processes = ?5 WHERE id = ?1",
                params![rec.id, rec.state.as_str(), rec.parent_id, rec.size_bytes.map(|v| v as i64), rec.processes],
            )?;
            Ok(())
        })
    }

    /// A sandbox's snapshots, oldest first.
    pub fn snapshots_of(&self, sandbox_id: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {COLS} FROM snapshots WHERE sandbox_id = ?1 ORDER BY created_at, rowid"
            ))?;
            let rows: Vec<_> = st.query_map([sandbox_id], row)?.collect::<Result<_, _>>()?;
            rows.into_iter().map(finish).collect()
        })
    }

    /// Every snapshot (for reconciliation).
    pub fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {COLS} FROM snapshots ORDER BY created_at, rowid"
            ))?;
            let rows: Vec<_> = st.query_map([], row)?.collect::<Result<_, _>>()?;
            rows.into_iter().map(finish).collect()
        })
    }

    /// One snapshot by id.
    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        self.with(|c| {
            let r = c
                .query_row(
                    &format!("SELECT {COLS} FROM snapshots WHERE id = ?1"),
                    [id],
                    row,
                )
                .optional()?;
            r.map(finish).transpose()
        })
    }

    /// Removes a snapshot's record; its children get its parent.
    pub fn delete_snapshot(&self, rec: &SnapshotRecord) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE snapshots SET parent_id = ?2 WHERE parent_id = ?1",
                params![rec.id, rec.parent_id],
            )?;
            tx.execute(
                "UPDATE sandboxes SET head = ?2 WHERE head = ?1",
                params![rec.id, rec.parent_id],
            )?;
            tx.execute("DELETE FROM snapshots WHERE id = ?1", [&rec.id])?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Names of sandboxes cloned from snapshot `id`.
    pub fn clones_of(&self, id: &str) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name FROM sandboxes WHERE origin = ?1 ORDER BY name")?;
            let rows = st
                .query_map([id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// Forgets that sandboxes were cloned from snapshot `id`.
    pub fn clear_origin(&self, id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("UPDATE sandboxes SET origin = NULL WHERE origin = ?1", [id])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::now_ms;

    fn snap(id: &str, parent: Option<&str>) -> SnapshotRecord {
        SnapshotRecord {
            id: id.into(),
            sandbox_id: "sb".into(),
            name: format!("n-{id}"),
            parent_id: parent.map(str::to_string),
            state: SnapshotState::Ready,
            created_at: now_ms(),
            message: None,
            labels: "{}".into(),
            auto: false,
            size_bytes: None,
            processes: false,
        }
    }

    #[test]
    fn tree_links_survive_deletion() {
        let s = Store::open_in_memory().unwrap();
        s.insert_snapshot(&snap("a", None)).unwrap();
        s.insert_snapshot(&snap("b", Some("a"))).unwrap();
        s.insert_snapshot(&snap("c", Some("b"))).unwrap();
        s.insert_snapshot(&snap("d", Some("b"))).unwrap();
        let b = s.snapshot("b").unwrap().unwrap();
        s.delete_snapshot(&b).unwrap();
        let all = s.snapshots_of("sb").unwrap();
        assert_eq!(all.len(), 3);
        assert!(
            all.iter()
                .filter(|x| x.id != "a")
                .all(|x| x.parent_id.as_deref() == Some("a"))
        );
        assert!(matches!(
            s.insert_snapshot(&snap("a", None)),
            Err(StoreError::Conflict(_))
        ));
    }
}
