//! Change notifications per run, for live stream readers.
//!
//! The hub carries no data: the store is the only source of output. A notification
//! says "look again"; readers then read the store from their last position. So a slow
//! or late reader can never miss output, and nothing is buffered per reader.
//!
//! The hub also holds the output stream slots: at most `limits.max_streams_per_run`
//! streams per run and `limits.max_streams_per_key` per holder (an API key, or the
//! run's org for streams opened without a key). A slot is taken before a stream starts
//! and given back when its [`StreamSlot`] drops, which is when the stream ends or its
//! reader disconnects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use stoa_types::RunId;
use tokio::sync::watch;

/// Longest a queue move waits to reach the readers of waiting runs: moves within it
/// are told once (each tells every reader, and a burst of claims would otherwise wake
/// every reader for every claim).
const QUEUE_GAP: std::time::Duration = std::time::Duration::from_millis(200);

/// Per-run change counters that stream readers wait on.
#[derive(Default)]
pub struct Hub {
    runs: Mutex<HashMap<RunId, watch::Sender<u64>>>,
    /// When the queue's move was last told, and whether one is due.
    queue: Mutex<(Option<std::time::Instant>, bool)>,
    readers: std::sync::atomic::AtomicUsize,
    /// Open streams per run and per holder.
    streams: Mutex<StreamCounts>,
}

#[derive(Default)]
struct StreamCounts {
    per_run: HashMap<RunId, usize>,
    per_holder: HashMap<String, usize>,
}

/// Why a stream could not be opened: a cap is reached (`open` of `max`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRefused {
    /// `limits.max_streams_per_run`.
    Run { open: usize, max: usize },
    /// `limits.max_streams_per_key`.
    Holder { open: usize, max: usize },
}

/// An output stream's slot; dropping it frees the slot.
pub struct StreamSlot {
    hub: Arc<Hub>,
    run: RunId,
    holder: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut s = self.hub.streams.lock().unwrap_or_else(|p| p.into_inner());
        // Entries at zero go, so the maps hold only runs and holders with streams.
        if let Some(n) = s.per_run.get_mut(&self.run) {
            *n -= 1;
            if *n == 0 {
                s.per_run.remove(&self.run);
            }
        }
        if let Some(n) = s.per_holder.get_mut(&self.holder) {
            *n -= 1;
            if *n == 0 {
                s.per_holder.remove(&self.holder);
            }
        }
        drop(s);
        self.hub
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

    /// Tells every reader that the queue moved (a run was claimed, a slot freed),
    /// at most once per [`QUEUE_GAP`]; the last move is always told.
    pub fn queue_moved(self: &Arc<Self>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.1 {
            return; // told soon
        }
        let wait = q.0.map(|t| QUEUE_GAP.saturating_sub(t.elapsed()));
        match wait {
            Some(w) if !w.is_zero() => {
                q.1 = true;
                drop(q);
                let hub = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(w).await;
                    *hub.queue.lock().unwrap_or_else(|p| p.into_inner()) =
                        (Some(std::time::Instant::now()), false);
                    hub.notify_all();
                });
            }
            _ => {
                q.0 = Some(std::time::Instant::now());
                drop(q);
                self.notify_all();
            }
        }
    }

    /// Takes a stream slot of `run` for `holder` (`key:<id>` or `org:<id>`), or says
    /// which cap is reached. Counts the stream as a reader while the slot lives.
    pub fn open_stream(
        self: &Arc<Self>,
        run: RunId,
        holder: String,
        max_per_run: usize,
        max_per_holder: usize,
    ) -> Result<StreamSlot, StreamRefused> {
        let mut s = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let on_run = s.per_run.get(&run).copied().unwrap_or(0);
        if on_run >= max_per_run {
            return Err(StreamRefused::Run {
                open: on_run,
                max: max_per_run,
            });
        }
        let of_holder = s.per_holder.get(&holder).copied().unwrap_or(0);
        if of_holder >= max_per_holder {
            return Err(StreamRefused::Holder {
                open: of_holder,
                max: max_per_holder,
            });
        }
        *s.per_run.entry(run).or_default() += 1;
        *s.per_holder.entry(holder.clone()).or_default() += 1;
        drop(s);
        self.readers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(StreamSlot {
            hub: self.clone(),
            run,
            holder,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_slots_are_capped_and_freed() {
        let hub = Arc::new(Hub::default());
        let (a, b) = (RunId::new(), RunId::new());
        let s1 = hub.open_stream(a, "org:x".into(), 2, 3).unwrap();
        let _s2 = hub.open_stream(a, "org:x".into(), 2, 3).unwrap();
        assert_eq!(
            hub.open_stream(a, "org:x".into(), 2, 3).err(),
            Some(StreamRefused::Run { open: 2, max: 2 })
        );
        let _s3 = hub.open_stream(b, "org:x".into(), 2, 3).unwrap();
        assert_eq!(
            hub.open_stream(b, "org:x".into(), 2, 3).err(),
            Some(StreamRefused::Holder { open: 3, max: 3 })
        );
        // Another holder has its own count.
        let _s4 = hub.open_stream(b, "key:k".into(), 2, 3).unwrap();
        assert_eq!(hub.readers(), 4);
        drop(s1);
        assert_eq!(hub.readers(), 3);
        assert!(hub.open_stream(a, "org:x".into(), 2, 3).is_ok());
    }
}
