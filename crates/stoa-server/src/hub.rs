//! Change notifications per run, for live stream readers.
//!
//! The hub carries no data: the store is the only source of output. A notification
//! says "look again"; readers then read the store from their last position. So a slow
//! or late reader can never miss output, and nothing is buffered per reader.

use std::collections::HashMap;
use std::sync::Mutex;

use stoa_types::RunId;
use tokio::sync::watch;

/// Per-run change counters that stream readers wait on.
#[derive(Default)]
pub struct Hub {
    runs: Mutex<HashMap<RunId, watch::Sender<u64>>>,
    readers: std::sync::atomic::AtomicUsize,
}

/// Counts a stream reader while it lives.
pub struct ReaderGuard<'a>(&'a Hub);

impl Drop for ReaderGuard<'_> {
    fn drop(&mut self) {
        self.0
            .readers
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Hub {
    /// Subscribes to changes of `id` (new output, state or pending reason).
    pub fn subscribe(&self, id: RunId) -> watch::Receiver<u64> {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.entry(id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Tells the readers of `id` that something changed.
    pub fn notify(&self, id: RunId) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = runs.get(&id) {
            if tx.receiver_count() == 0 {
                runs.remove(&id);
            } else {
                tx.send_modify(|v| *v += 1);
            }
        }
    }

    /// Tells every reader that something changed (queue positions move for all).
    pub fn notify_all(&self) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.retain(|_, tx| tx.receiver_count() > 0);
        for tx in runs.values() {
            tx.send_modify(|v| *v += 1);
        }
    }

    /// Counts a stream reader until the guard drops.
    pub fn reader(&self) -> ReaderGuard<'_> {
        self.readers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ReaderGuard(self)
    }

    /// Output streams being read now.
    pub fn readers(&self) -> usize {
        self.readers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Number of runs with live readers.
    pub fn watched_runs(&self) -> usize {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
