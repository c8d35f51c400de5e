//! Runtimes: how a run's user code is actually executed on a worker.
//!
//! A [`Runtime`] per run type prepares what a run needs (a Python environment, images)
//! and launches it as a supervised [`Execution`] whose output arrives as
//! [`OutputLine`]s on a channel. Nothing here knows about HTTP or SQL: the worker
//! (stoa-worker) drives these types and sends what they produce to the control plane.

pub mod cgroup;
pub mod compose;
pub mod docker;
pub mod egress;
pub mod firewall;
pub mod gpu;
pub mod launch;
pub mod metrics;
pub mod netpool;
pub mod process;
pub mod python;
pub mod python_container;
pub mod sandbox;
pub mod seccomp;
pub mod spawn;
pub mod warm;

use std::sync::Arc;

use async_trait::async_trait;

pub use cgroup::Limits;
pub use launch::{
    LaunchContext, LaunchError, LaunchRequest, Launched, Measure, PortEvent, Runtime,
};
pub use process::{ProcessExecution, group_alive, kill_group};
pub use python::{Interpreter, PythonJob, PythonRuntime, PythonRuntimeConfig};
pub use sandbox::{Confinement, Sandbox};

/// Errors of the runtimes.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The requirements could not be installed: the user's problem, the run fails.
    #[error("{0}")]
    Requirements(String),
    /// The image is missing or access to it was refused: the user's problem, the run fails.
    #[error("{0}")]
    Image(String),
    /// The run failed for a reason of its own (a dependency that never became
    /// healthy, a service that had to complete and did not), with the exit code to
    /// record when there is one.
    #[error("{message}")]
    Failed { message: String, code: Option<i64> },
    /// The platform could not start the run: a system failure.
    #[error("{0}")]
    System(String),
    /// The Docker engine could not be talked to (not listening, the connection cut):
    /// a system failure, told as such wherever it happens.
    #[error("Docker engine unreachable: {0}")]
    EngineUnreachable(String),
    /// IO failed while supervising the run.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl RuntimeError {
    /// Wraps an IO error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
    /// Progress lines written by Stoa itself (`[stoa] …`).
    System,
}

/// A line of output (with its newline, except for a final unterminated piece), or a
/// piece of an over-long line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    pub stream: Stream,
    pub text: String,
    /// The compose service it came from (the text then starts with `name | `).
    pub service: Option<Arc<str>>,
}

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, when the process exited normally.
    pub code: Option<i32>,
    /// Signal that killed it, otherwise.
    pub signal: Option<i32>,
    /// The kernel killed it for exceeding its memory limit.
    pub oom_killed: bool,
}

impl Exit {
    /// The code to record: the exit code, or 128 + signal as shells report it.
    pub fn return_code(&self) -> i64 {
        match (self.code, self.signal) {
            (Some(c), _) => c as i64,
            (None, Some(s)) => 128 + s as i64,
            (None, None) => -1,
        }
    }
}

/// Sends signals to a launched run while another task waits on it.
pub trait Signaller: Send + Sync {
    /// Asks the run to stop (SIGTERM to the whole group).
    fn terminate(&self);
    /// Kills every process of the run (SIGKILL to the whole group); `wait` then returns.
    fn kill(&self);
}

/// A launched run being supervised.
#[async_trait]
pub trait Execution: Send {
    /// The process group (or other handle) to record with the run.
    fn pgid(&self) -> Option<i64>;
    /// A handle to signal the run while `wait` is pending.
    fn signaller(&self) -> Arc<dyn Signaller>;
    /// Waits for the run's main process to end; afterwards every remaining process of
    /// the run has been killed and confirmed gone, so the output channel closes. A run
    /// that reports its own end (a warm sandbox's) returns as soon as its code has ended
    /// and its output closed: what is left of its sandbox goes in [`Execution::finish_off`].
    async fn wait(&mut self) -> Result<Exit, RuntimeError>;
    /// Kills the whole run and returns once no process of it is left.
    async fn kill(&mut self) -> Result<(), RuntimeError>;
    /// After `wait`, once the run's end is recorded: returns once nothing of the run
    /// or its sandbox is left (at once where `wait` already saw to that).
    async fn finish_off(&mut self) -> Result<(), RuntimeError> {
        Ok(())
    }
}
