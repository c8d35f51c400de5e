//! Supervision of a process tree: its own process group, output pumped line by line,
//! the whole group killed at the end and confirmed gone.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};

use crate::cgroup::RunCgroup;
use crate::sandbox::Prepared;
use crate::spawn::RawChild;
use crate::{Execution, Exit, OutputLine, RuntimeError, Signaller, Stream};

/// Longest piece of a line sent at once; longer lines arrive in pieces.
const MAX_LINE: usize = 64 * 1024;

/// A process group started from a command, with its output on a channel.
pub struct ProcessExecution {
    child: RawChild,
    pgid: i32,
    exit: Option<Exit>,
    /// Command name of a sandbox wrapper in the group that must not get SIGTERM.
    wrapper: Option<&'static str>,
    /// The cgroup the process joined before it executed (limits, OOM record).
    cgroup: Option<RunCgroup>,
    /// A directory the run may fill only up to this many bytes.
    disk: Option<(std::path::PathBuf, u64)>,
    /// A directory removed once every process is gone.
    scratch: Option<std::path::PathBuf>,
    /// A fed process's output pumps as it started, until the run gets its own pipes.
    cuts: Vec<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
    /// Where the output of the run's own pipes goes.
    feed_tx: Option<mpsc::Sender<OutputLine>>,
    /// The pumps of the run's own pipes.
    handed: Vec<tokio::task::JoinHandle<()>>,
    /// The socket the run's exit code comes back on.
    report: Option<tokio::net::UnixStream>,
    /// The run reported its end: the rest is taken down in `finish_off`.
    early: bool,
}

impl Drop for ProcessExecution {
    fn drop(&mut self) {
        if let Some(dir) = self.scratch.take() {
            // The group is killed with the child (dropping it kills it) or already gone.
            signal_group(self.pgid, Signal::SIGKILL);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl ProcessExecution {
    /// Spawns `cmd` (see [`crate::spawn`]) as the leader of a new process group, stdin
    /// closed, stdout and stderr piped into `output`. `wrapper` names a sandbox
    /// launcher in the group (`bwrap`) that a graceful stop must spare: it dies on
    /// SIGTERM instead of passing it on, which would kill the run before its handler
    /// finished; it exits by itself once the run's processes have.
    pub fn spawn(
        cmd: &Prepared,
        output: mpsc::Sender<OutputLine>,
        wrapper: Option<&'static str>,
    ) -> Result<Self, RuntimeError> {
        let null = std::fs::File::open("/dev/null")
            .map_err(|e| RuntimeError::io("could not start the run's process", e))?;
        Self::spawn_with(cmd, null.into(), output, wrapper, false)
    }

    /// Like [`ProcessExecution::spawn`], with the process's stdin a socket from here
    /// (a warm sandbox reads its run there, and may be given its own output pipes:
    /// [`ProcessExecution::own_output`]).
    pub fn spawn_fed(
        cmd: &Prepared,
        output: mpsc::Sender<OutputLine>,
        wrapper: Option<&'static str>,
    ) -> Result<(Self, tokio::net::UnixStream), RuntimeError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| RuntimeError::io("making a sandbox's socket", e))?;
        ours.set_nonblocking(true)
            .map_err(|e| RuntimeError::io("making a sandbox's socket", e))?;
        let ours = tokio::net::UnixStream::from_std(ours)
            .map_err(|e| RuntimeError::io("making a sandbox's socket", e))?;
        let e = Self::spawn_with(cmd, theirs.into(), output, wrapper, true)?;
        Ok((e, ours))
    }

    fn spawn_with(
        cmd: &Prepared,
        stdin: OwnedFd,
        output: mpsc::Sender<OutputLine>,
        wrapper: Option<&'static str>,
        fed: bool,
    ) -> Result<Self, RuntimeError> {
        let failed = |e| RuntimeError::io("could not start the run's process", e);
        let (stdout, out_w) = output_pipe().map_err(failed)?;
        let (stderr, err_w) = output_pipe().map_err(failed)?;
        let child = crate::spawn::spawn(
            cmd,
            [stdin.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
        )
        .map_err(failed)?;
        // Only the child holds the write ends now: its output ends with it.
        drop((stdin, out_w, err_w));
        let pid = child.id();
        // A fed process's pumps can be cut (see `own_output`).
        let (c1, r1) = oneshot::channel();
        let (c2, r2) = oneshot::channel();
        let p1 = tokio::spawn(pump(
            stdout,
            Stream::Stdout,
            output.clone(),
            fed.then_some(r1),
        ));
        let p2 = tokio::spawn(pump(
            stderr,
            Stream::Stderr,
            output.clone(),
            fed.then_some(r2),
        ));
        let cuts = if fed {
            vec![(c1, p1), (c2, p2)]
        } else {
            vec![]
        };
        Ok(ProcessExecution {
            child,
            pgid: pid as i32,
            exit: None,
            wrapper,
            cgroup: None,
            disk: None,
            scratch: None,
            cuts,
            feed_tx: fed.then_some(output),
            handed: Vec::new(),
            report: None,
            early: false,
        })
    }

    /// Gives a fed process's run its own stdout and stderr: what the process wrote
    /// before is taken (it must be waiting for its run: what is in its pipes now, up to
    /// a bound), then the write ends of two new pipes are returned, to be handed over
    /// with the run, whose output they carry from then on. Their end is the end of the
    /// run's output, before its sandbox is gone (see [`ProcessExecution::expect_report`]).
    pub fn own_output(&mut self) -> Result<[std::os::fd::OwnedFd; 2], RuntimeError> {
        let tx = self
            .feed_tx
            .take()
            .ok_or_else(|| RuntimeError::System("the run's output was already given".into()))?;
        // The new pipes' lines go after the last of the old ones: their pumps wait for
        // the old pumps to end (which may wait for the run's reader, once launched).
        let (done, gate) = tokio::sync::watch::channel(false);
        let old: Vec<_> = self
            .cuts
            .drain(..)
            .map(|(cut, pump)| {
                let _ = cut.send(());
                pump
            })
            .collect();
        tokio::spawn(async move {
            for p in old {
                let _ = p.await;
            }
            let _ = done.send(true);
        });
        let mut ends = Vec::new();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let (r, w) =
                output_pipe().map_err(|e| RuntimeError::io("making the run's output pipes", e))?;
            let (tx, mut gate) = (tx.clone(), gate.clone());
            self.handed.push(tokio::spawn(async move {
                let _ = gate.wait_for(|d| *d).await;
                pump(r, stream, tx, None).await
            }));
            ends.push(w);
        }
        let [o, e]: [std::os::fd::OwnedFd; 2] = ends.try_into().expect("two pipes");
        Ok([o, e])
    }

    /// A fed process whose run keeps the output it started with (it is fed at once).
    pub fn keep_output(&mut self) {
        self.feed_tx = None;
        // Dropped unsent: the pumps go on to the end of the pipes.
        self.cuts.clear();
    }

    /// The run given its own output (`own_output`) reports its exit code on `sock` as
    /// it ends: `wait` returns once that code is in and that output closed.
    pub fn expect_report(&mut self, sock: tokio::net::UnixStream) {
        if !self.handed.is_empty() {
            self.report = Some(sock);
        }
    }

    /// Removes `dir` once the process group is gone (a warm sandbox's directory).
    pub fn with_scratch(mut self, dir: std::path::PathBuf) -> Self {
        self.scratch = Some(dir);
        self
    }

    /// True when the process has already exited (without reaping it for `wait`).
    pub fn exited(&mut self) -> bool {
        self.exit.is_some() || !matches!(self.child.try_wait(), Ok(None))
    }

    /// Watches the run's limits: its cgroup (an OOM kill is reported as such) and the
    /// bytes written under `disk.0` (more than `disk.1` ends the run).
    pub fn with_limits(
        mut self,
        cgroup: Option<RunCgroup>,
        disk: Option<(std::path::PathBuf, u64)>,
    ) -> Self {
        self.cgroup = cgroup;
        self.disk = disk;
        self
    }

    fn signal(&self, sig: Signal) {
        signal_group(self.pgid, sig);
    }

    async fn reap(&mut self) -> Result<Exit, RuntimeError> {
        if let Some(e) = self.exit {
            return Ok(e);
        }
        let st = self
            .child
            .wait()
            .await
            .map_err(|e| RuntimeError::io("waiting for the run's process", e))?;
        use std::os::unix::process::ExitStatusExt;
        let e = Exit {
            code: st.code(),
            signal: st.signal(),
            oom_killed: false,
        };
        self.exit = Some(e);
        Ok(e)
    }

    /// Waits for the leader, meanwhile keeping the run's directory under its disk limit
    /// (true when it went over and the run was killed for it).
    async fn reap_watched(&mut self) -> Result<(Exit, bool), RuntimeError> {
        let Some((dir, max)) = self.disk.clone() else {
            return Ok((self.reap().await?, false));
        };
        let pgid = self.pgid;
        let mut exceeded = false;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let reap = self.reap();
        tokio::pin!(reap);
        loop {
            tokio::select! {
                r = &mut reap => return Ok((r?, exceeded)),
                _ = tick.tick(), if !exceeded => {
                    let d = dir.clone();
                    let used = tokio::task::spawn_blocking(move || crate::sandbox::tree_size(&d))
                        .await
                        .unwrap_or(0);
                    if used > max {
                        exceeded = true;
                        signal_group(pgid, Signal::SIGKILL);
                    }
                }
            }
        }
    }

    async fn kill_group_and_confirm(&mut self) -> Result<(), RuntimeError> {
        self.signal(Signal::SIGKILL);
        self.reap().await?;
        // Processes that left the leader's side (daemonised children) still carry the
        // group id, or are in the run's cgroup (which nothing of the run can leave):
        // wait until none of them is alive. Processes that just exited leave the cgroup
        // a moment after they are reaped: look again soon at first, then every 5 ms.
        let mut pause = Duration::from_micros(100);
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < until {
            let alive = match &self.cgroup {
                Some(cg) => !cg.is_empty(),
                None => group_alive(self.pgid),
            };
            if !alive {
                if let Some(dir) = self.scratch.take() {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Ok(());
            }
            match &self.cgroup {
                Some(cg) => cg.kill_all(),
                // Members of the group keep its id from being reused: safe to signal.
                None => self.signal(Signal::SIGKILL),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        Err(RuntimeError::System(format!(
            "process group {} still has live processes after SIGKILL",
            self.pgid
        )))
    }
}

#[async_trait]
impl Execution for ProcessExecution {
    fn pgid(&self) -> Option<i64> {
        Some(self.pgid as i64)
    }

    async fn wait(&mut self) -> Result<Exit, RuntimeError> {
        let (mut e, exceeded) = match self.report.take() {
            None => self.reap_watched().await?,
            Some(sock) => {
                let handed = std::mem::take(&mut self.handed);
                tokio::select! {
                    r = self.reap_watched() => r?,
                    code = reported_end(sock, handed) => {
                        // The run's code has ended and its output closed; the rest of
                        // its sandbox goes in `finish_off`, after its end is recorded.
                        tracing::debug!(pgid = self.pgid, "the run reported its end");
                        // Nothing of it runs on unwatched: what is left is killed now
                        // and confirmed gone in `finish_off`.
                        self.signal(Signal::SIGKILL);
                        if let Some(cg) = &self.cgroup {
                            cg.kill_all();
                        }
                        self.early = true;
                        return Ok(Exit {
                            code: Some(code),
                            signal: None,
                            oom_killed: self.cgroup.as_ref().is_some_and(|c| c.oom_killed()),
                        });
                    }
                }
            }
        };
        tracing::debug!(pgid = self.pgid, "the run's leader exited");
        // The leader is done; nothing of the run may outlive it.
        self.kill_group_and_confirm().await?;
        tracing::debug!(pgid = self.pgid, "nothing of the run is left");
        if let Some(cg) = self.cgroup.take() {
            e.oom_killed = cg.oom_killed();
            self.exit = Some(e);
            tokio::task::spawn_blocking(move || drop(cg));
        }
        if exceeded && let Some((_, max)) = &self.disk {
            return Err(RuntimeError::Failed {
                message: format!(
                    "disk limit exceeded: the run wrote more than {} MiB",
                    max / (1024 * 1024)
                ),
                code: Some(e.return_code()),
            });
        }
        Ok(e)
    }

    async fn finish_off(&mut self) -> Result<(), RuntimeError> {
        if !std::mem::take(&mut self.early) {
            return Ok(());
        }
        self.kill_group_and_confirm().await?;
        tracing::debug!(pgid = self.pgid, "nothing of the run is left");
        if let Some(cg) = self.cgroup.take() {
            tokio::task::spawn_blocking(move || drop(cg));
        }
        Ok(())
    }

    fn signaller(&self) -> Arc<dyn Signaller> {
        Arc::new(GroupSignaller {
            pgid: self.pgid,
            wrapper: self.wrapper,
        })
    }

    async fn kill(&mut self) -> Result<(), RuntimeError> {
        self.kill_group_and_confirm().await
    }
}

/// Signals a process group; ESRCH just means it is already gone.
fn signal_group(pgid: i32, sig: Signal) {
    let _ = killpg(Pid::from_raw(pgid), sig);
}

/// Kills process group `pgid` outright (used at restart for runs left behind).
pub fn kill_group(pgid: i32) {
    signal_group(pgid, Signal::SIGKILL);
}

/// Signals one process group.
struct GroupSignaller {
    pgid: i32,
    wrapper: Option<&'static str>,
}

impl Signaller for GroupSignaller {
    fn terminate(&self) {
        match self.wrapper {
            None => signal_group(self.pgid, Signal::SIGTERM),
            Some(w) => {
                for p in group_members(self.pgid) {
                    if p.comm != w {
                        let _ = nix::sys::signal::kill(Pid::from_raw(p.pid), Signal::SIGTERM);
                    }
                }
            }
        }
    }
    fn kill(&self) {
        signal_group(self.pgid, Signal::SIGKILL);
    }
}

/// True when a process of group `pgid` (or a descendant) is alive (zombies do not count).
pub fn group_alive(pgid: i32) -> bool {
    !group_members(pgid).is_empty()
}

/// One live process, from procfs.
pub(crate) struct ProcEntry {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub comm: String,
    /// `/proc/PID/stat` fields from the state (field 3) on.
    pub fields: Vec<String>,
}

/// Every live (not zombie) process, from one scan of procfs.
pub(crate) fn scan_processes() -> Vec<ProcEntry> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{name}/stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may contain spaces.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
        let fields: Vec<String> = rest.split_whitespace().map(String::from).collect();
        let state = fields.first().map(String::as_str).unwrap_or("");
        if state == "Z" || state == "X" {
            continue;
        }
        out.push(ProcEntry {
            pid: name.parse().unwrap_or(0),
            ppid: fields.get(1).and_then(|p| p.parse().ok()).unwrap_or(0),
            pgrp: fields.get(2).and_then(|p| p.parse().ok()).unwrap_or(0),
            comm: comm.to_string(),
            fields,
        });
    }
    out
}

/// The process groups each process belongs to as far as a run is concerned: its own
/// and those of its ancestors. A sandboxed run starts a new session (so a new group)
/// inside its sandbox; it still belongs to the group of the sandbox it runs in.
pub(crate) fn groups_of(procs: &[ProcEntry]) -> Vec<Vec<i32>> {
    let by_pid: std::collections::HashMap<i32, usize> =
        procs.iter().enumerate().map(|(i, p)| (p.pid, i)).collect();
    procs
        .iter()
        .map(|p| {
            let mut groups = vec![p.pgrp];
            let mut cur = p.ppid;
            // Bounded: a process tree is far shallower than this.
            for _ in 0..64 {
                let Some(&i) = by_pid.get(&cur) else { break };
                let parent = &procs[i];
                if !groups.contains(&parent.pgrp) {
                    groups.push(parent.pgrp);
                }
                if parent.ppid == 0 || parent.ppid == cur {
                    break;
                }
                cur = parent.ppid;
            }
            groups
        })
        .collect()
}

/// The live processes of group `pgid` and their descendants.
fn group_members(pgid: i32) -> Vec<ProcEntry> {
    let procs = scan_processes();
    let groups = groups_of(&procs);
    procs
        .into_iter()
        .zip(groups)
        .filter_map(|(p, g)| g.contains(&pgid).then_some(p))
        .collect()
}

/// Cuts a byte stream into lines (with their newline), and over-long lines into
/// pieces of at most [`MAX_LINE`] bytes.
#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Adds bytes; returns the lines they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=pos).collect();
            out.push(String::from_utf8_lossy(&line).into_owned());
        }
        if self.pending.len() >= MAX_LINE {
            let piece = std::mem::take(&mut self.pending);
            out.push(String::from_utf8_lossy(&piece).into_owned());
        }
        out
    }

    /// The unterminated rest, at the end of the stream.
    pub fn finish(&mut self) -> Option<String> {
        (!self.pending.is_empty())
            .then(|| String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned())
    }
}

/// A pipe for a process's output: its reading end here, its writing end.
fn output_pipe() -> std::io::Result<(tokio::net::unix::pipe::Receiver, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    Ok((tokio::net::unix::pipe::Receiver::from_owned_fd(r)?, w))
}

/// The exit code a run reports on `sock` (see `warm_boot.py`), once the pumps of its
/// own output have ended too; never, when it reports none (it was killed, say).
async fn reported_end(
    mut sock: tokio::net::UnixStream,
    pumps: Vec<tokio::task::JoinHandle<()>>,
) -> i32 {
    // Until its newline: the socket stays open in the sandbox's bubblewrap processes.
    let mut got = Vec::new();
    let mut buf = [0u8; 16];
    while !got.ends_with(b"\n") {
        match sock.read(&mut buf).await {
            Ok(n) if n > 0 && got.len() + n <= 16 => got.extend_from_slice(&buf[..n]),
            // Gone without a code, or not a code: the run wrote there itself.
            _ => return std::future::pending().await,
        }
    }
    let Some(code) = std::str::from_utf8(&got[..got.len() - 1])
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .filter(|c| (0..=255).contains(c))
    else {
        return std::future::pending().await;
    };
    for p in pumps {
        let _ = p.await;
    }
    code
}

/// Reads `r` to its end, sending complete lines (and over-long pieces) as they come;
/// or until `cut`: then what can be read at once is the last of it.
async fn pump(
    mut r: impl AsyncRead + std::os::fd::AsFd + Unpin,
    stream: Stream,
    tx: mpsc::Sender<OutputLine>,
    mut cut: Option<oneshot::Receiver<()>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut lines = LineSplitter::default();
    let mut last = false;
    // After a cut: at most a full pipe (its largest size), however fast it is written.
    let mut budget: usize = 1 << 20;
    loop {
        let n = if last {
            // The fd is non-blocking: what is in the pipe now, and no more.
            match rustix::io::read(r.as_fd(), &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) if budget == 0 => break,
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    n
                }
            }
        } else {
            let read = r.read(&mut buf);
            let cutting = async {
                match cut.as_mut() {
                    Some(c) => c.await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = read => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                sent = cutting => {
                    // Only a cut sent: one dropped unsent (the run ended first) is none.
                    last = sent;
                    cut = None;
                    continue;
                }
            }
        };
        for text in lines.push(&buf[..n]) {
            if tx
                .send(OutputLine {
                    stream,
                    text,
                    service: None,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
    if let Some(text) = lines.finish() {
        let _ = tx
            .send(OutputLine {
                stream,
                text,
                service: None,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Prepared {
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c").arg(script).env("PATH", "/usr/bin:/bin");
        Prepared::plain(cmd)
    }

    #[tokio::test]
    async fn kill_takes_the_whole_group() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut ex =
            ProcessExecution::spawn(&sh("sleep 30 & echo started; wait"), tx, None).unwrap();
        let line = rx.recv().await.unwrap();
        assert_eq!(line.text, "started\n");
        let pgid = ex.pgid().unwrap() as i32;
        assert!(group_alive(pgid));
        ex.kill().await.unwrap();
        assert!(!group_alive(pgid));
        assert!(
            rx.recv().await.is_none(),
            "output closes once the group is gone"
        );
    }

    #[tokio::test]
    async fn exit_code_and_partial_line() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut ex = ProcessExecution::spawn(&sh("printf 'a\\nb'; exit 3"), tx, None).unwrap();
        let e = ex.wait().await.unwrap();
        assert_eq!(e.return_code(), 3);
        let mut got = Vec::new();
        while let Some(l) = rx.recv().await {
            got.push(l.text);
        }
        assert_eq!(got, vec!["a\n", "b"]);
    }
}
