//! Host uid ranges shared by every dev-box daemon on one host.
//!
//! Each sandbox maps its ids onto [`ID_RANGE`] host uids, a *slot* counted from
//! [`UID_BASE_START`]. Two daemons with separate state directories each keep their own
//! database, so slots must be handed out host-wide: the registry (a JSON file, by default
//! `/var/lib/dev-box/uid-ranges.json`, `$DEVBOX_UID_REGISTRY` for tests) gives each daemon,
//! keyed by its state directory, whole *blocks* of [`BLOCK_SLOTS`] slots. A daemon allocates
//! slots inside its blocks from its own database (no file access on a sandbox's create) and
//! claims one more block when they are full. Every access holds an exclusive `flock` on a
//! lock file next to the registry and replaces the registry by rename, so concurrent
//! daemons and a crash mid-write leave it whole.
//!
//! Blocks whose owner's state directory no longer exists are free again (a removed test
//! daemon, an uninstalled state dir); a daemon re-claims, at start, the blocks its existing
//! sandboxes use, so a registry lost or pruned by mistake is rebuilt from the databases.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ID_RANGE, StoreError, UID_BASE_START, now_ms};

/// Slots in one block (64 sandboxes, 4,194,304 host uids).
pub const BLOCK_SLOTS: u32 = 64;

/// Default place of the registry.
pub const DEFAULT_REGISTRY: &str = "/var/lib/dev-box/uid-ranges.json";

/// Whole blocks on the host, from [`UID_BASE_START`] up to `u32::MAX`.
pub(crate) const MAX_BLOCKS: u32 = (crate::MAX_SLOTS + 1) / BLOCK_SLOTS;

/// The registry file of host uid blocks, and the daemon (state directory) that uses it.
#[derive(Debug, Clone)]
pub struct UidRegistry {
    path: PathBuf,
    owner: PathBuf,
}

/// Blocks another daemon holds, with their owner.
pub(crate) type Conflicts = Vec<(u32, PathBuf)>;

/// One claimed block, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Claim {
    /// The owning daemon's state directory (canonical path).
    owner: PathBuf,
    /// Claimed, ms since the epoch.
    claimed_at: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryFile {
    /// Slots per block: a registry written with another size is not reinterpreted.
    block_slots: u32,
    /// Block index → its claim.
    blocks: BTreeMap<u32, Claim>,
}

fn reg_err(path: &Path, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::UidRegistry(format!("{what} {}: {e}", path.display()))
}

/// The block a uid base falls into (`None` outside the sandbox uid space).
pub(crate) fn block_of(uid_base: u32) -> Option<u32> {
    uid_base
        .checked_sub(UID_BASE_START)
        .map(|d| d / ID_RANGE / BLOCK_SLOTS)
}

impl UidRegistry {
    /// The registry at `path`, used by the daemon whose state directory is `state_dir`.
    pub fn new(path: impl Into<PathBuf>, state_dir: &Path) -> Result<Self, StoreError> {
        let owner = fs::canonicalize(state_dir)
            .map_err(|e| reg_err(state_dir, "the state directory", e))?;
        Ok(Self {
            path: path.into(),
            owner,
        })
    }

    /// `$DEVBOX_UID_REGISTRY`, or [`DEFAULT_REGISTRY`].
    pub fn default_path() -> PathBuf {
        std::env::var_os("DEVBOX_UID_REGISTRY")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_REGISTRY))
    }

    /// The registry file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the registry's contents with its lock held, writing them back if `f`
    /// says they changed.
    fn locked<T>(
        &self,
        f: impl FnOnce(&mut RegistryFile) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(|e| reg_err(dir, "creating", e))?;
        }
        let lock_path = self.path.with_extension("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| reg_err(&lock_path, "opening", e))?;
        lock.lock().map_err(|e| reg_err(&lock_path, "locking", e))?;
        let mut reg: RegistryFile = match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                reg_err(
                    &self.path,
                    "reading (fix or remove it: every daemon re-claims its blocks at start)",
                    e,
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RegistryFile {
                block_slots: BLOCK_SLOTS,
                blocks: BTreeMap::new(),
            },
            Err(e) => return Err(reg_err(&self.path, "reading", e)),
        };
        if reg.block_slots != BLOCK_SLOTS {
            return Err(reg_err(
                &self.path,
                "using",
                format!(
                    "its blocks have {} slots, this daemon's {BLOCK_SLOTS}",
                    reg.block_slots
                ),
            ));
        }
        // Owners whose state directory is gone hold nothing any more.
        let before = reg.blocks.len();
        reg.blocks
            .retain(|_, c| c.owner == self.owner || fs::symlink_metadata(&c.owner).is_ok());
        let pruned = reg.blocks.len() != before;
        let (out, changed) = f(&mut reg)?;
        if changed || pruned {
            let tmp = self
                .path
                .with_extension(format!("tmp{}", std::process::id()));
            let text = serde_json::to_vec_pretty(&reg).map_err(|e| reg_err(&tmp, "encoding", e))?;
            let written = (|| -> std::io::Result<()> {
                let mut f = File::create(&tmp)?;
                f.write_all(&text)?;
                f.sync_all()?;
                fs::rename(&tmp, &self.path)
            })();
            if let Err(e) = written {
                let _ = fs::remove_file(&tmp);
                return Err(reg_err(&self.path, "writing", e));
            }
        }
        drop(lock);
        Ok(out)
    }

    /// Claims the blocks holding `uid_bases` (the daemon's existing sandboxes) and returns
    /// every block this daemon owns, plus the blocks among those wanted that another daemon
    /// holds (their sandboxes share host uids with that daemon's: the caller warns).
    pub(crate) fn claim_existing(
        &self,
        uid_bases: &[u32],
    ) -> Result<(Vec<u32>, Conflicts), StoreError> {
        let wanted: Vec<u32> = uid_bases.iter().filter_map(|b| block_of(*b)).collect();
        self.locked(|reg| {
            let mut changed = false;
            let mut conflicts = Vec::new();
            for b in wanted {
                match reg.blocks.get(&b) {
                    Some(c) if c.owner == self.owner => {}
                    Some(c) => {
                        if !conflicts.iter().any(|(x, _)| *x == b) {
                            conflicts.push((b, c.owner.clone()));
                        }
                    }
                    None => {
                        reg.blocks.insert(
                            b,
                            Claim {
                                owner: self.owner.clone(),
                                claimed_at: now_ms(),
                            },
                        );
                        changed = true;
                    }
                }
            }
            Ok(((self.owned(reg), conflicts), changed))
        })
    }

    /// Claims the lowest free block for this daemon; returns every block it owns.
    pub(crate) fn claim_block(&self) -> Result<Vec<u32>, StoreError> {
        self.locked(|reg| {
            let free = (0..MAX_BLOCKS).find(|b| !reg.blocks.contains_key(b));
            let Some(b) = free else {
                return Err(StoreError::Exhausted);
            };
            reg.blocks.insert(
                b,
                Claim {
                    owner: self.owner.clone(),
                    claimed_at: now_ms(),
                },
            );
            Ok((self.owned(reg), true))
        })
    }

    /// Gives back every block of this daemon (its state directory is being removed).
    pub fn release_all(&self) -> Result<(), StoreError> {
        self.locked(|reg| {
            let before = reg.blocks.len();
            reg.blocks.retain(|_, c| c.owner != self.owner);
            Ok(((), reg.blocks.len() != before))
        })
    }

    fn owned(&self, reg: &RegistryFile) -> Vec<u32> {
        reg.blocks
            .iter()
            .filter(|(_, c)| c.owner == self.owner)
            .map(|(b, _)| *b)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_disjoint_and_stale_owners_are_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let reg_path = tmp.path().join("reg/uids.json");
        let (a, b, c) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        for d in [&a, &b, &c] {
            fs::create_dir(d).unwrap();
        }
        let ra = UidRegistry::new(&reg_path, &a).unwrap();
        let rb = UidRegistry::new(&reg_path, &b).unwrap();
        let rc = UidRegistry::new(&reg_path, &c).unwrap();
        assert_eq!(ra.claim_block().unwrap(), vec![0]);
        assert_eq!(rb.claim_block().unwrap(), vec![1]);
        assert_eq!(ra.claim_block().unwrap(), vec![0, 2]);
        // A daemon's existing sandboxes keep their block; another's are reported.
        let (owned, conflicts) = ra
            .claim_existing(&[UID_BASE_START, UID_BASE_START + BLOCK_SLOTS * ID_RANGE])
            .unwrap();
        assert_eq!(owned, vec![0, 2]);
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].0, 1);
        // b's state dir goes away: its block is free for c.
        fs::remove_dir(&b).unwrap();
        assert_eq!(rc.claim_block().unwrap(), vec![1]);
        ra.release_all().unwrap();
        assert_eq!(rc.claim_block().unwrap(), vec![0, 1]);
        assert!(UidRegistry::new(&reg_path, &b).is_err());
    }

    #[test]
    fn a_foreign_block_size_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let reg_path = tmp.path().join("uids.json");
        fs::write(&reg_path, r#"{"block_slots": 16, "blocks": {}}"#).unwrap();
        let r = UidRegistry::new(&reg_path, tmp.path()).unwrap();
        let err = r.claim_block().unwrap_err().to_string();
        assert!(err.contains("16 slots"), "{err}");
    }
}
