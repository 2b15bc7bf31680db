//! Measuring snapshot sizes in the background, when the engine is otherwise quiet.
//!
//! A snapshot's size is the bytes of the files in its writable layer: a walk of the layer,
//! O(files). It runs on one thread, one snapshot at a time, and only after half a second
//! without snapshot activity, so it never competes with the operations it describes.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// The background measurer.
pub(crate) struct Measurer {
    tx: Mutex<mpsc::Sender<(String, PathBuf)>>,
    last_activity_ms: Arc<AtomicU64>,
    epoch: Instant,
}

const QUIET: Duration = Duration::from_millis(500);

impl Measurer {
    /// Starts the measuring thread; sizes are written to the database at `db`.
    pub(crate) fn start(db: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel::<(String, PathBuf)>();
        let last = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let last2 = last.clone();
        std::thread::spawn(move || {
            let mut queue: VecDeque<(String, PathBuf)> = VecDeque::new();
            loop {
                if queue.is_empty() {
                    match rx.recv() {
                        Ok(item) => queue.push_back(item),
                        Err(_) => return,
                    }
                }
                while let Ok(item) = rx.try_recv() {
                    queue.push_back(item);
                }
                let since = epoch.elapsed().as_millis() as u64 - last2.load(Ordering::Relaxed);
                if since < QUIET.as_millis() as u64 {
                    std::thread::sleep(QUIET / 5);
                    continue;
                }
                let Some((id, path)) = queue.pop_front() else {
                    continue;
                };
                let size = devbox_storage::disk_usage(&path);
                if let Ok(store) = devbox_store::Store::open(&db)
                    && let Ok(Some(mut s)) = store.snapshot(&id)
                {
                    s.size_bytes = Some(size);
                    let _ = store.update_snapshot(&s);
                }
            }
        });
        Self {
            tx: Mutex::new(tx),
            last_activity_ms: last,
            epoch,
        }
    }

    /// Notes snapshot activity: measuring waits until things are quiet.
    pub(crate) fn busy(&self) {
        self.last_activity_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Queues the layer at `path` of snapshot `id` for measuring.
    pub(crate) fn measure(&self, id: &str, path: PathBuf) {
        self.busy();
        let _ = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((id.to_string(), path));
    }
}
