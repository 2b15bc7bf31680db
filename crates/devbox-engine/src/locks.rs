//! Per-sandbox locks: one operation at a time on a sandbox, any number across sandboxes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A lock per sandbox name, made on first use.
#[derive(Debug, Default)]
pub(crate) struct LockTable {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl LockTable {
    /// The lock of sandbox `name`.
    pub(crate) fn get(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Forget locks nobody holds or waits for, so the table does not grow without bound.
        if map.len() > 1024 {
            map.retain(|_, l| Arc::strong_count(l) > 1);
        }
        map.entry(name.to_string()).or_default().clone()
    }
}
