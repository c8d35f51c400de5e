//! A run's output on its way to the control plane: secrets masked, the per-run and
//! per-org limits applied, each piece numbered, and held back while the control plane
//! cannot take it.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering::Relaxed;

use stoa_core::plane::{Appended, ControlPlane, OutputPiece, OutputStream, PlaneError, Progress};
use stoa_runtime::{OutputLine, Stream};
use stoa_types::RunId;

use crate::masking::Masker;

/// How long output is held back without trying after a send failed.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Bytes a run writes between two reads of its org's stored output (with
/// `limits.output_bytes_per_org`).
const ORG_RECHECK_BYTES: u64 = 256 * 1024;

/// Sends a run's output to the control plane, enforcing the per-run output limit.
/// Every piece is numbered once, in order, so a batch sent again after an answer was
/// lost is stored once.
///
/// Nothing is lost silently: output the control plane cannot take (its disk is full,
/// it is away) is held back, up to `limits.max_held_output_bytes`, and sent once it
/// can; what did not fit is counted, and a `[stoa]` line says how much was lost, with
/// the run marked truncated, as soon as it can be stored.
pub(crate) struct OutputSink {
    plane: Arc<dyn ControlPlane>,
    id: RunId,
    /// The lease token the run is held under.
    token: String,
    /// The number of the next piece sent (shared with the worker's record of the run).
    next_seq: Arc<AtomicI64>,
    /// The worker no longer holds the run: nothing more is sent.
    lease_lost: bool,
    /// The last send failed (said once in the log until one succeeds); output is held
    /// back without trying until then (the run's end tries regardless).
    retry_at: Option<std::time::Instant>,
    written: u64,
    /// Bytes this run may store: the per-run limit, or less when its org's limit is near.
    max: u64,
    /// The per-run limit (`limits.max_output_bytes`).
    run_max: u64,
    /// The org's limit (`limits.output_bytes_per_org`), when set.
    org_limit: Option<u64>,
    truncated: bool,
    notice_due: bool,
    /// Output accepted but not stored yet (the disk was full), in order.
    pending: Vec<OutputPiece>,
    /// Most bytes held back (`limits.max_held_output_bytes`).
    pub(crate) held_max: u64,
    pending_bytes: u64,
    /// Lines and bytes that could not be stored; told in a notice once space is back.
    lost: (u64, u64),
    /// The run is to be marked `output_truncated` (once that can be stored).
    flag_due: bool,
    /// The run's org (for `limits.output_bytes_per_org`).
    org: stoa_types::OrgId,
    /// What the run had written when the org's stored output was last read.
    org_checked_at: u64,
    /// The first stdout and stderr lines, to tell sandbox set-up failures apart.
    first: (Option<String>, Option<String>),
    /// Where output goes once `held_max` is held in memory (a worker on another
    /// machine); without one, more is counted as lost.
    pub(crate) spool: Option<Spool>,
    /// The last send was refused (a full disk, a limit), not merely unanswered.
    refused: bool,
    /// Output counted lost while sends were refused (else: while unanswered).
    lost_refused: bool,
    /// Secret values replaced by `***` before anything is stored, and the held-back
    /// ends of unfinished lines (a secret may straddle two pieces of one line).
    masker: Masker,
}

impl OutputSink {
    pub(crate) fn new(
        plane: Arc<dyn ControlPlane>,
        id: RunId,
        token: String,
        next_seq: Arc<AtomicI64>,
        org: stoa_types::OrgId,
        max: u64,
    ) -> Self {
        OutputSink {
            plane,
            id,
            token,
            next_seq,
            lease_lost: false,
            retry_at: None,
            written: 0,
            max,
            run_max: max,
            org_limit: None,
            truncated: false,
            notice_due: false,
            pending: Vec::new(),
            held_max: 1 << 20,
            pending_bytes: 0,
            lost: (0, 0),
            flag_due: false,
            org,
            org_checked_at: 0,
            first: (None, None),
            masker: Masker::default(),
            spool: None,
            refused: false,
            lost_refused: false,
        }
    }

    /// Keeps the run within what its org may still store (`limits.output_bytes_per_org`,
    /// of which `used` bytes are stored).
    pub(crate) fn org_limit(&mut self, limit: u64, used: u64) {
        self.org_limit = Some(limit);
        self.max = self.max.min(limit.saturating_sub(used));
    }

    /// Masks these values (those of at least `min_len` bytes) in all output.
    pub(crate) fn mask(&mut self, values: impl Iterator<Item = String>, min_len: usize) {
        self.masker = Masker::new(values, min_len);
    }

    /// Masks the secret values in a text of Stoa's own that is stored elsewhere.
    pub(crate) fn mask_text(&self, text: &mut String) {
        self.masker.mask(text);
    }

    /// The first stdout and stderr lines written.
    pub(crate) fn first_lines(&self) -> (Option<&str>, Option<&str>) {
        (self.first.0.as_deref(), self.first.1.as_deref())
    }

    pub(crate) async fn write_lines(&mut self, lines: Vec<OutputLine>) {
        for l in &lines {
            let slot = match l.stream {
                Stream::Stdout => &mut self.first.0,
                Stream::Stderr => &mut self.first.1,
                Stream::System => continue,
            };
            if slot.is_none() {
                *slot = Some(l.text.clone());
            }
        }
        let pieces = lines
            .into_iter()
            .filter_map(|l| {
                self.masker.hold_back(OutputPiece {
                    stream: match l.stream {
                        Stream::Stdout => OutputStream::Stdout,
                        Stream::Stderr => OutputStream::Stderr,
                        Stream::System => OutputStream::System,
                    },
                    service: l.service.map(|s| s.to_string()),
                    content: l.text,
                })
            })
            .collect();
        self.write_pieces(pieces).await;
    }

    /// Writes what is held back of unfinished lines: their streams have ended.
    pub(crate) async fn flush_held(&mut self) {
        let held = self.masker.take_held();
        if !held.is_empty() {
            self.write_pieces(held).await;
        }
    }

    async fn write(&mut self, chunks: Vec<(OutputStream, String)>) {
        self.write_pieces(chunks.into_iter().map(OutputPiece::from).collect())
            .await;
    }

    async fn write_pieces(&mut self, pieces: Vec<OutputPiece>) {
        if self.truncated {
            return;
        }
        self.recheck_org_limit().await;
        let mut keep = Vec::with_capacity(pieces.len());
        for mut p in pieces {
            self.masker.mask(&mut p.content);
            let n = p.content.len() as u64;
            if self.written + n > self.max {
                self.truncated = true;
                self.notice_due = true;
                break;
            }
            self.written += n;
            keep.push(p);
        }
        if !keep.is_empty() {
            // Behind output not stored yet: held back, in order.
            if !self.pending.is_empty() || self.spooled() || self.waiting() {
                self.hold(keep);
            } else if let Err(e) = self.send(&keep, false).await {
                self.send_failed(&e);
                self.hold(keep);
            }
        }
        self.store_pending(false).await;
        if self.notice_due {
            self.flush_notice().await;
        }
    }

    /// Holds output back until it can be stored, up to `limits.max_held_output_bytes`; beyond, it
    /// is counted as lost (and told).
    fn hold(&mut self, pieces: Vec<OutputPiece>) {
        for p in pieces {
            let n = p.content.len() as u64;
            let spooling = self.spool.as_ref().is_some_and(|s| !s.is_empty());
            if !spooling && self.pending_bytes + n <= self.held_max {
                self.pending_bytes += n;
                self.pending.push(p);
            } else if !self.spool.as_mut().is_some_and(|s| s.push(&p)) {
                self.lost.0 += 1;
                self.lost.1 += n;
                self.lost_refused |= self.refused;
            }
        }
    }

    /// Whether output waits in the spool.
    fn spooled(&self) -> bool {
        self.spool.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// Sends pieces numbered from `next_seq`; an error leaves them unsent (to be sent
    /// again with the same numbers).
    async fn send(&mut self, pieces: &[OutputPiece], at_end: bool) -> Result<(), PlaneError> {
        if self.lease_lost {
            return Ok(());
        }
        match self
            .plane
            .append_output(
                self.id,
                &self.token,
                self.next_seq.load(Relaxed),
                pieces,
                at_end,
            )
            .await?
        {
            Appended::Stored { next } => {
                self.next_seq.store(next, Relaxed);
                self.retry_at = None;
                self.refused = false;
            }
            Appended::LeaseLost => self.lease_lost = true,
            Appended::OverLimit => {
                return Err(PlaneError::Refused(
                    "the control plane refused output past the run's limit".into(),
                ));
            }
            Appended::Gap { expected } => {
                // The control plane lost pieces it had taken: they cannot be sent
                // again; what comes next is numbered on from what it has.
                tracing::error!(run = %self.id, sent = self.next_seq.load(Relaxed), expected, "the control plane is missing output it took");
                self.next_seq.store(expected, Relaxed);
                return Box::pin(self.send(pieces, at_end)).await;
            }
        }
        Ok(())
    }

    /// The control plane did not take output: said in the log, once until it does;
    /// nothing is tried for a while.
    fn send_failed(&mut self, e: &PlaneError) {
        self.refused = matches!(e, PlaneError::Refused(_));
        if self.retry_at.is_none() {
            tracing::warn!(run = %self.id, error = %e, "storing output failed: it is held back");
        }
        self.retry_at = Some(std::time::Instant::now() + RETRY_AFTER);
    }

    /// Whether output is held back without trying now (a send failed just before).
    fn waiting(&self) -> bool {
        self.retry_at
            .is_some_and(|at| std::time::Instant::now() < at)
    }

    /// With `limits.output_bytes_per_org`, reads the org's stored output again every
    /// [`ORG_RECHECK_BYTES`] this run writes, so that runs of one org running at once
    /// share its limit (each may pass it by at most that much).
    async fn recheck_org_limit(&mut self) {
        let Some(limit) = self.org_limit else { return };
        if self.written < self.org_checked_at + ORG_RECHECK_BYTES {
            return;
        }
        self.org_checked_at = self.written;
        if let Ok(used) = self.plane.org_output_used(&self.org).await {
            let left = limit.saturating_sub(used);
            self.max = self.run_max.min(self.written + left);
        }
    }

    /// Stores the output held back, then the notice of what was lost and the
    /// truncation mark. Unless `force`, nothing is tried shortly after a send failed.
    /// True when nothing is left to store.
    async fn store_pending(&mut self, force: bool) -> bool {
        if !force && self.waiting() {
            return false;
        }
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            if let Err(e) = self.send(&pending, force).await {
                self.send_failed(&e);
                self.pending = pending;
                return false;
            }
            self.pending_bytes = 0;
        }
        while self.spooled() {
            let spool = self.spool.as_ref().expect("spooled");
            let (batch, used) = match spool.front(256 * 1024) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(run = %self.id, error = %e, "reading the output spool failed: what is left in it is lost");
                    self.spool = None;
                    break;
                }
            };
            if let Err(e) = self.send(&batch, force).await {
                self.send_failed(&e);
                return false;
            }
            if let Some(s) = self.spool.as_mut() {
                s.sent += used;
            }
        }
        if self.lost.0 > 0 {
            let why = if self.spool.is_some() {
                "the server could not be reached and the worker's spool was full"
            } else if self.lost_refused {
                "the disk under the server's data directory was full"
            } else {
                "the store could not be reached and the output held meanwhile passed limits.max_held_output_bytes"
            };
            let line = format!(
                "[stoa] {} lines ({} bytes) of output could not be stored: {why}\n",
                self.lost.0, self.lost.1
            );
            if let Err(e) = self
                .send(&[(OutputStream::System, line).into()], force)
                .await
            {
                self.send_failed(&e);
                return false;
            }
            self.lost = (0, 0);
            self.lost_refused = false;
            self.flag_due = true;
        }
        if self.flag_due && !self.lease_lost {
            if let Err(e) = self
                .plane
                .progress(self.id, &self.token, Progress::Truncated)
                .await
            {
                self.send_failed(&e);
                return false;
            }
            self.flag_due = false;
        }
        true
    }

    /// At the run's end: stores what is held back; when the control plane refuses it
    /// (its disk is full) and there is no spool, it counts as lost, so that only the
    /// short notice is left to store. True when everything is stored; false while the
    /// control plane is only away (the caller tries again).
    pub(crate) async fn settle(&mut self) -> bool {
        if self.store_pending(true).await {
            return true;
        }
        if self.spool.is_some() || !self.refused {
            // The control plane is away, not full: everything waits for it.
            return false;
        }
        for p in self.pending.drain(..) {
            self.lost.0 += 1;
            self.lost.1 += p.content.len() as u64;
        }
        self.lost_refused = true;
        self.pending_bytes = 0;
        self.store_pending(true).await
    }

    /// Adds a line of Stoa's own to the output held back (stored with the rest by
    /// [`OutputSink::settle`]).
    pub(crate) fn pending_note(&mut self, msg: &str) {
        let line = format!("[stoa] {msg}\n");
        self.pending_bytes += line.len() as u64;
        self.pending.push((OutputStream::System, line).into());
    }

    /// Writes a line of Stoa's own: `[stoa] MSG`.
    pub(crate) async fn note(&mut self, msg: &str) {
        self.write(vec![(OutputStream::System, format!("[stoa] {msg}\n"))])
            .await;
    }

    /// Writes lines of Stoa's own (each with its newline), when there are any.
    pub(crate) async fn notes(&mut self, lines: Vec<String>) {
        if !lines.is_empty() {
            self.write(
                lines
                    .into_iter()
                    .map(|l| (OutputStream::System, l))
                    .collect(),
            )
            .await;
        }
    }

    /// Writes the truncation notice once, when the limit was hit.
    pub(crate) async fn flush_notice(&mut self) {
        if !self.notice_due {
            return;
        }
        self.notice_due = false;
        let line = match self.org_limit {
            Some(limit) if self.max < self.run_max => format!(
                "[stoa] output truncated: the org's stored output reached its limit of {limit} bytes (limits.output_bytes_per_org)\n"
            ),
            _ => format!(
                "[stoa] output truncated: the limit of {} bytes per run was reached\n",
                self.max
            ),
        };
        self.pending_bytes += line.len() as u64;
        self.pending.push((OutputStream::System, line).into());
        self.flag_due = true;
        self.store_pending(false).await;
    }
}

/// Output of a run waiting on the worker's disk while the control plane cannot take it
/// (a worker on another machine whose server is away): appended in order as JSON
/// lines, sent from the front, removed with the sink.
pub(crate) struct Spool {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
    /// Bytes written to the file, and read back and sent.
    written: u64,
    sent: u64,
    max: u64,
}

impl Spool {
    /// A spool at `path` (made when first needed) holding at most `max` bytes.
    pub(crate) fn new(path: std::path::PathBuf, max: u64) -> Self {
        Spool {
            path,
            file: None,
            written: 0,
            sent: 0,
            max,
        }
    }

    fn is_empty(&self) -> bool {
        self.sent == self.written
    }

    /// Appends a piece; `false` when the spool is full (or cannot be written).
    fn push(&mut self, p: &OutputPiece) -> bool {
        use std::io::Write;
        let mut line = serde_json::to_vec(&stoa_types::worker::OutputPieceWire::from(p))
            .expect("output serialises");
        line.push(b'\n');
        if self.written - self.sent + line.len() as u64 > self.max {
            return false;
        }
        if self.file.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            // The run's output (masked) is its org's: no one else reads it.
            let opened = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(&self.path);
            match opened {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "the output spool cannot be made");
                    return false;
                }
            }
        }
        let f = self.file.as_mut().expect("opened above");
        match f.write_all(&line) {
            Ok(()) => {
                self.written += line.len() as u64;
                true
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "writing the output spool failed");
                false
            }
        }
    }

    /// The next pieces to send, up to about `budget` bytes, and their size in the file.
    fn front(&self, budget: u64) -> std::io::Result<(Vec<OutputPiece>, u64)> {
        use std::io::{BufRead, Seek};
        let Some(f) = &self.file else {
            return Ok((vec![], 0));
        };
        let mut r = std::io::BufReader::new(f.try_clone()?);
        r.seek(std::io::SeekFrom::Start(self.sent))?;
        let (mut out, mut used) = (Vec::new(), 0u64);
        let mut line = Vec::new();
        while used < budget && self.sent + used < self.written {
            line.clear();
            let n = r.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            let w: stoa_types::worker::OutputPieceWire = serde_json::from_slice(&line)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            out.push(OutputPiece::from(w));
            used += n as u64;
        }
        Ok((out, used))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
