//! Free space under the data directory.
//!
//! Watched every few seconds: below `limits.min_free_bytes` the server warns (log and
//! `/metrics`) and refuses new runs with 503. A write of the store that fails marks the
//! disk full: runs then hold their output back (bounded) instead of writing it, and the
//! reserve file (`limits.disk_reserve_bytes`, made at start) is given up so that what
//! must be stored (the end of a run, the notice of lost output) has room. Once free
//! space is back above the minimum, the disk is no longer full and the reserve is
//! made again.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// The reserve's file name in the data directory.
const RESERVE: &str = "space-reserve";

/// How often free space is measured.
const INTERVAL: Duration = Duration::from_secs(2);

/// The watch over the data directory's free space.
#[derive(Debug)]
pub struct DiskGuard {
    dir: PathBuf,
    min_free: u64,
    reserve_bytes: u64,
    free: AtomicU64,
    /// Free space is below the minimum.
    low: AtomicBool,
    /// A store write failed and space has not come back since.
    full: AtomicBool,
    /// Held while the reserve is made or given up.
    reserve: Mutex<()>,
}

impl DiskGuard {
    /// A guard over `dir`; measures once and makes the reserve when there is room.
    pub fn new(dir: &Path, min_free: u64, reserve_bytes: u64) -> Self {
        let g = DiskGuard {
            dir: dir.to_path_buf(),
            min_free,
            reserve_bytes,
            free: AtomicU64::new(u64::MAX),
            low: AtomicBool::new(false),
            full: AtomicBool::new(false),
            reserve: Mutex::new(()),
        };
        g.check();
        g
    }

    /// Bytes free under the data directory at the last measure.
    pub fn free_bytes(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// Whether free space was below `limits.min_free_bytes` at the last measure.
    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// Whether a store write failed and space has not come back since.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Whether the reserve file is in place.
    pub fn has_reserve(&self) -> bool {
        self.reserve_path().is_file()
    }

    /// A store write failed: output is held back from now on, and the reserve goes so
    /// that what must be stored has room.
    pub fn mark_full(&self) {
        if !self.full.swap(true, Ordering::Relaxed) {
            tracing::error!(dir = %self.dir.display(), "a write to the store failed (is the disk under the data directory full?): runs' output is held back until space is free again");
        }
        self.release_reserve();
    }

    /// A write of the store failed with `e`: when it says the disk is full, or free
    /// space measured now is below the minimum (SQLite reports some writes that ran out
    /// of space as I/O errors), the disk is marked full. Other failures (a locked
    /// database) leave it as it is.
    pub fn write_failed(&self, e: &stoa_store::StoreError) {
        if e.is_disk_full() || self.measure() < self.min_free {
            self.mark_full();
        }
    }

    /// The 503 message for a new run while space is low.
    pub fn refusal(&self) -> Option<String> {
        (self.is_low() || self.is_full()).then(|| {
            format!(
                "the server is low on disk space ({} bytes free under its data directory, limits.min_free_bytes is {}); new runs are refused until space is freed",
                self.free_bytes(),
                self.min_free
            )
        })
    }

    fn reserve_path(&self) -> PathBuf {
        self.dir.join(RESERVE)
    }

    /// Gives up the reserve; true when there was one.
    fn release_reserve(&self) -> bool {
        let _g = self.reserve.lock().unwrap_or_else(|p| p.into_inner());
        let gone = std::fs::remove_file(self.reserve_path()).is_ok();
        if gone {
            tracing::warn!(
                bytes = self.reserve_bytes,
                "gave up the disk reserve so that runs' ends can be stored"
            );
        }
        gone
    }

    /// Makes the reserve file when it is missing and there is room for it.
    fn make_reserve(&self) {
        if self.reserve_bytes == 0 || self.has_reserve() {
            return;
        }
        let _g = self.reserve.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.reserve_path();
        let tmp = self.dir.join(format!("{RESERVE}.tmp"));
        let made = (|| -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            // Private like every file at the top of the data directory.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            // Written, not a sparse length: the blocks must really be taken.
            let chunk = vec![0u8; 1 << 20];
            let mut left = self.reserve_bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                f.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            // Written blocks count against free space at once; no need to wait for them.
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(error = %e, "the disk reserve could not be made yet");
        }
    }

    /// Measures free space now: warns when it falls below the minimum, and once it is
    /// back, clears the full mark and makes the reserve again. Returns the free bytes.
    pub fn check(&self) -> u64 {
        let free = self.measure();
        let low = free < self.min_free;
        if !low {
            if self.full.swap(false, Ordering::Relaxed) {
                tracing::info!("the store is writable again: runs' held-back output is written");
            }
            self.make_reserve();
        }
        free
    }

    /// Measures free space now (one `statvfs`) and says when it crosses the minimum.
    fn measure(&self) -> u64 {
        let free = match rustix::fs::statvfs(&self.dir) {
            Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
            Err(e) => {
                tracing::debug!(error = %e, "measuring free space failed");
                return self.free_bytes();
            }
        };
        self.free.store(free, Ordering::Relaxed);
        let low = free < self.min_free;
        if low != self.low.swap(low, Ordering::Relaxed) {
            if low {
                tracing::warn!(free_bytes = free, min_free_bytes = self.min_free, dir = %self.dir.display(), "free space under the data directory is below limits.min_free_bytes: new runs are refused");
            } else {
                tracing::info!(
                    free_bytes = free,
                    "free space under the data directory is back above limits.min_free_bytes"
                );
            }
        }
        free
    }

    /// Measures every few seconds until shutdown.
    pub async fn run(self: std::sync::Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.check()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_space_refuses_and_the_reserve_comes_and_goes() {
        let dir = tempfile::tempdir().unwrap();
        let g = DiskGuard::new(dir.path(), 0, 64 * 1024);
        assert!(g.free_bytes() > 0);
        assert!(g.refusal().is_none());
        assert!(g.has_reserve());
        assert_eq!(
            std::fs::metadata(dir.path().join(RESERVE)).unwrap().len(),
            64 * 1024
        );
        g.mark_full();
        assert!(g.is_full() && !g.has_reserve());
        assert!(g.refusal().is_some());
        g.check();
        assert!(!g.is_full() && g.has_reserve());

        let never = DiskGuard::new(dir.path(), u64::MAX, 0);
        assert!(never.is_low());
        let msg = never.refusal().unwrap();
        assert!(msg.contains("limits.min_free_bytes"), "{msg}");
    }
}
