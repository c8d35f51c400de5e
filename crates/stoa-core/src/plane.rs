//! The control plane as a worker sees it: the one interface between a worker, which
//! executes runs, and the control plane, which queues, stores and serves them.
//!
//! A worker claims a run and gets an [`Assignment`] (the run, its lease token and what
//! it needs to execute: the org's secrets decrypted, registry credentials); from then on
//! every write it makes names that token, so a worker that lost its lease writes
//! nothing. Output is numbered by the worker: an append names the number of its first
//! piece, a piece sent twice is stored once, and a gap is refused with the number
//! expected. The embedded worker talks to the control plane in-process; an agent on
//! another machine does so over HTTP. Both go through this trait.

use std::time::Duration;

use async_trait::async_trait;
use stoa_types::{OrgId, RunId, RunStatus};

use crate::RegistryCredentials;

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
    /// Lines written by Stoa itself (warnings, truncation notices).
    System,
}

impl OutputStream {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
            OutputStream::System => "system",
        }
    }

    /// Reads a stored name (anything unknown is stdout).
    pub fn parse(s: &str) -> Self {
        match s {
            "stderr" => OutputStream::Stderr,
            "system" => OutputStream::System,
            _ => OutputStream::Stdout,
        }
    }
}

/// A piece of output to store (normally one line, with its newline).
#[derive(Debug, Clone, PartialEq)]
pub struct OutputPiece {
    pub stream: OutputStream,
    /// The compose service it came from.
    pub service: Option<String>,
    pub content: String,
}

impl From<(OutputStream, String)> for OutputPiece {
    fn from((stream, content): (OutputStream, String)) -> Self {
        OutputPiece {
            stream,
            service: None,
            content,
        }
    }
}

/// One system sample of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub run_id: RunId,
    /// RFC 3339.
    pub ts: crate::time::Time,
    pub cpu_percent: f64,
    pub ram_used: i64,
    pub ram_total: i64,
}

/// One reading of one GPU given to a run (fields the GPU reported).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuSample {
    pub run_id: Option<RunId>,
    pub ts: crate::time::Time,
    pub gpu: i64,
    /// utilisation %, memory utilisation %, memory used (bytes), temperature (°C),
    /// power (W), power limit (W), SM clock (MHz), memory clock (MHz), PCIe rx, tx (B/s).
    pub values: [Option<f64>; 10],
}

/// What the control plane asks of a running run; its worker hears it on its next
/// heartbeat (at once in-process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunControl {
    /// Kill now; the run ends `aborted`.
    Abort,
    /// SIGTERM, then kill after the grace period; the run ends `cancelled`.
    Stop { grace_ms: u64 },
}

impl RunControl {
    /// The stored form: `abort` or `stop:<grace in ms>`.
    pub fn to_stored(self) -> String {
        match self {
            RunControl::Abort => "abort".into(),
            RunControl::Stop { grace_ms } => format!("stop:{grace_ms}"),
        }
    }

    /// Reads the stored form back.
    pub fn parse(s: &str) -> Option<Self> {
        match s.split_once(':') {
            None if s == "abort" => Some(RunControl::Abort),
            Some(("stop", ms)) => ms
                .parse()
                .ok()
                .map(|grace_ms| RunControl::Stop { grace_ms }),
            _ => None,
        }
    }
}

/// A heartbeat's answer for one run the worker holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    /// Keep going: the lease was renewed.
    Continue,
    /// Renewed, and the run is to be aborted or stopped.
    Control(RunControl),
    /// The worker no longer holds the run (its lease expired and it was reaped, or it
    /// ended elsewhere): kill what is left of it and write nothing more.
    Lost,
}

/// The org's limit on stored output, when it has one, and what it holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrgOutput {
    /// `limits.output_bytes_per_org`.
    pub limit: u64,
    /// Bytes the org's runs hold at the claim.
    pub used: u64,
}

/// A run handed to a worker, with everything it needs to execute it.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub id: RunId,
    pub org_id: OrgId,
    /// `python`, `image` or `compose`.
    pub job_type: crate::record::RunKind,
    /// The hardware profile.
    pub execution_type: String,
    /// The validated spec, as JSON.
    pub spec: String,
    pub run_name: Option<String>,
    /// GPUs the run was given.
    pub gpu_ids: Vec<String>,
    /// The token every later write names.
    pub lease_token: String,
    /// The org's secrets, decrypted: the run's environment. Held in memory only.
    pub secrets: Vec<(String, String)>,
    /// Registry credentials given with the run (memory only), when it has some.
    pub registry: Option<RegistryCredentials>,
    /// The org's output limit, when it has one.
    pub org_output: Option<OrgOutput>,
}

/// Progress of a claimed run.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Why it has not started yet (pulling, building), shown while it is `starting`.
    Reason(String),
    /// A phase of its timeline reached (`environment_ready`).
    Phase(String),
    /// Its processes started, under this process group when it has one.
    Running { pgid: Option<i64> },
    /// Its stored output was cut at a limit.
    Truncated,
    /// A Slurm bridge submitted it as this Slurm job.
    SlurmJob(String),
    /// The ports it serves on are reached at these addresses (`ip:port`), by port.
    Ports(std::collections::BTreeMap<u16, String>),
}

/// How a run ended, as its worker decided.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEnd {
    pub status: RunStatus,
    pub return_code: Option<i64>,
    pub error: Option<String>,
    pub timed_out: bool,
}

/// What became of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored (pieces sent before are stored once); the next piece is number `next`.
    Stored { next: i64 },
    /// Refused: pieces are missing before it; the next one expected is `expected`.
    Gap { expected: i64 },
    /// The worker no longer holds the run: nothing was stored.
    LeaseLost,
    /// Refused: the run's stored output would pass what a run may store (a worker's
    /// own limits keep it below; only a misbehaving one gets this).
    OverLimit,
}

/// Why the control plane did not take a call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlaneError {
    /// Not now (the store is full or unreachable, the server is away): try again;
    /// what was not taken is kept by the worker until then.
    #[error("the control plane is unavailable: {0}")]
    Unavailable(String),
    /// The control plane will not take this (its disk is full, or the output is past
    /// the run's limit): what a worker without a spool still holds at a run's end is
    /// counted lost, so that the end itself can be stored.
    #[error("the control plane refused: {0}")]
    Refused(String),
}

/// The control plane, as a worker calls it.
#[async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    /// The next run this worker is to execute, or `None` when none fits now.
    async fn claim(&self) -> Result<Option<Assignment>, PlaneError>;
    /// Renews the leases of the runs the worker holds (run, token) and says for each
    /// what to do.
    async fn heartbeat(
        &self,
        leases: &[(RunId, String)],
    ) -> Result<Vec<(RunId, Directive)>, PlaneError>;
    /// Stores output of a run, `first` being the number of the first piece. With
    /// `at_end` (the run's processes are gone: this is what is left of its output) the
    /// control plane takes it even while it refuses routine output (its disk is full and
    /// only its reserve is left).
    async fn append_output(
        &self,
        run: RunId,
        token: &str,
        first: i64,
        pieces: &[OutputPiece],
        at_end: bool,
    ) -> Result<Appended, PlaneError>;
    /// Records progress; `false` when the worker no longer holds the run (then it must
    /// not run: it was aborted between the claim and now, or lost).
    async fn progress(&self, run: RunId, token: &str, p: Progress) -> Result<bool, PlaneError>;
    /// Records how the run ended (idempotent); `false` when the worker no longer held it.
    /// The run's slot and GPUs are free from then on.
    async fn finish(&self, run: RunId, token: &str, end: RunEnd) -> Result<bool, PlaneError>;
    /// Stores samples of the worker's running runs.
    async fn samples(&self, system: Vec<Sample>, gpus: Vec<GpuSample>) -> Result<(), PlaneError>;
    /// Bytes an org's runs hold in the store now (for its output limit).
    async fn org_output_used(&self, org: &OrgId) -> Result<u64, PlaneError>;
    /// A run this worker holds, handed over again under its lease token: how `stoa
    /// exec` in a Slurm job gets what the bridge claimed (secrets travel in this reply
    /// only). `None` when the worker no longer holds it.
    async fn assignment(&self, run: RunId, token: &str) -> Result<Option<Assignment>, PlaneError> {
        let _ = (run, token);
        Err(PlaneError::Refused(
            "this control plane hands a run over only at its claim".into(),
        ))
    }
    /// How long a lease lasts without a heartbeat.
    fn lease(&self) -> Duration;
    /// Resolves when there may be a run to claim (in-process: a run was queued or a
    /// slot freed); workers also claim on a timer.
    async fn work_available(&self) {
        std::future::pending::<()>().await
    }
    /// Resolves when a control may wait for one of the worker's runs (in-process: an
    /// abort or stop was asked); workers also heartbeat on a timer.
    async fn control_pending(&self) {
        std::future::pending::<()>().await
    }
}

/// The worker protocol's wire forms of these types ([`stoa_types::worker`]).
pub mod wire {
    use stoa_types::worker as w;

    use super::*;

    fn run_id(s: &str) -> Result<RunId, String> {
        s.parse().map_err(|_| format!("not a run id: {s:?}"))
    }

    impl From<&Assignment> for w::ClaimedRun {
        fn from(a: &Assignment) -> Self {
            w::ClaimedRun {
                run_id: a.id.to_string(),
                org_id: a.org_id.0.clone(),
                job_type: a.job_type.as_str().into(),
                execution_type: a.execution_type.clone(),
                spec: a.spec.clone(),
                run_name: a.run_name.clone(),
                gpu_ids: a.gpu_ids.clone(),
                lease_token: a.lease_token.clone(),
                secrets: a
                    .secrets
                    .iter()
                    .map(|(name, value)| w::EnvVar {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                registry: a.registry.as_ref().map(|r| w::RegistryLogin {
                    username: r.username.clone(),
                    password: r.password.clone(),
                }),
                org_output: a.org_output.map(|o| w::OrgOutputLimit {
                    limit: o.limit,
                    used: o.used,
                }),
            }
        }
    }

    impl TryFrom<w::ClaimedRun> for Assignment {
        type Error = String;
        fn try_from(c: w::ClaimedRun) -> Result<Self, String> {
            Ok(Assignment {
                id: run_id(&c.run_id)?,
                org_id: OrgId(c.org_id),
                job_type: crate::record::RunKind::parse(&c.job_type)
                    .ok_or_else(|| format!("not a run kind: {:?}", c.job_type))?,
                execution_type: c.execution_type,
                spec: c.spec,
                run_name: c.run_name,
                gpu_ids: c.gpu_ids,
                lease_token: c.lease_token,
                secrets: c.secrets.into_iter().map(|e| (e.name, e.value)).collect(),
                registry: c.registry.map(|r| RegistryCredentials {
                    username: r.username,
                    password: r.password,
                }),
                org_output: c.org_output.map(|o| OrgOutput {
                    limit: o.limit,
                    used: o.used,
                }),
            })
        }
    }

    /// A heartbeat answer on the wire.
    pub fn directive_to_wire(id: RunId, d: Directive) -> w::RunDirective {
        let (directive, grace_ms) = match d {
            Directive::Continue => ("continue", None),
            Directive::Lost => ("lost", None),
            Directive::Control(RunControl::Abort) => ("abort", None),
            Directive::Control(RunControl::Stop { grace_ms }) => ("stop", Some(grace_ms)),
        };
        w::RunDirective {
            run_id: id.to_string(),
            directive: directive.into(),
            grace_ms,
        }
    }

    /// A heartbeat answer read back (an unknown directive is `continue`).
    pub fn directive_from_wire(d: &w::RunDirective) -> Result<(RunId, Directive), String> {
        let directive = match d.directive.as_str() {
            "lost" => Directive::Lost,
            "abort" => Directive::Control(RunControl::Abort),
            "stop" => Directive::Control(RunControl::Stop {
                grace_ms: d.grace_ms.unwrap_or(0),
            }),
            _ => Directive::Continue,
        };
        Ok((run_id(&d.run_id)?, directive))
    }

    impl From<&OutputPiece> for w::OutputPieceWire {
        fn from(p: &OutputPiece) -> Self {
            w::OutputPieceWire {
                stream: p.stream.as_str().into(),
                service: p.service.clone(),
                content: p.content.clone(),
            }
        }
    }

    impl From<w::OutputPieceWire> for OutputPiece {
        fn from(p: w::OutputPieceWire) -> Self {
            OutputPiece {
                stream: OutputStream::parse(&p.stream),
                service: p.service,
                content: p.content,
            }
        }
    }

    /// Progress on the wire.
    pub fn progress_to_wire(token: &str, p: &Progress) -> w::ProgressRequest {
        let (kind, text, pgid) = match p {
            Progress::Reason(r) => ("reason", Some(r.clone()), None),
            Progress::Phase(ph) => ("phase", Some(ph.clone()), None),
            Progress::Running { pgid } => ("running", None, *pgid),
            Progress::Truncated => ("truncated", None, None),
            Progress::SlurmJob(j) => ("slurm_job", Some(j.clone()), None),
            Progress::Ports(p) => (
                "ports",
                Some(serde_json::to_string(p).expect("a map of strings serialises")),
                None,
            ),
        };
        w::ProgressRequest {
            lease_token: token.into(),
            kind: kind.into(),
            text,
            pgid,
        }
    }

    /// Progress read back; the field at fault when it does not read.
    pub fn progress_from_wire(p: w::ProgressRequest) -> Result<Progress, &'static str> {
        Ok(match p.kind.as_str() {
            "reason" => Progress::Reason(p.text.ok_or("text")?),
            "phase" => Progress::Phase(p.text.ok_or("text")?),
            "running" => Progress::Running { pgid: p.pgid },
            "truncated" => Progress::Truncated,
            "slurm_job" => Progress::SlurmJob(p.text.ok_or("text")?),
            "ports" => {
                Progress::Ports(serde_json::from_str(&p.text.ok_or("text")?).map_err(|_| "text")?)
            }
            _ => return Err("kind"),
        })
    }

    impl From<&Sample> for w::SampleWire {
        fn from(s: &Sample) -> Self {
            w::SampleWire {
                run_id: s.run_id.to_string(),
                ts: crate::time::stamp(&s.ts),
                cpu_percent: s.cpu_percent,
                ram_used: s.ram_used,
                ram_total: s.ram_total,
            }
        }
    }

    impl TryFrom<w::SampleWire> for Sample {
        type Error = String;
        fn try_from(s: w::SampleWire) -> Result<Self, String> {
            Ok(Sample {
                run_id: run_id(&s.run_id)?,
                ts: crate::time::parse(&s.ts).ok_or("ts: not an RFC 3339 time")?,
                cpu_percent: s.cpu_percent,
                ram_used: s.ram_used,
                ram_total: s.ram_total,
            })
        }
    }

    impl From<&GpuSample> for w::GpuSampleWire {
        fn from(g: &GpuSample) -> Self {
            w::GpuSampleWire {
                run_id: g.run_id.map(|r| r.to_string()).unwrap_or_default(),
                ts: crate::time::stamp(&g.ts),
                gpu: g.gpu,
                values: g.values.to_vec(),
            }
        }
    }

    impl TryFrom<w::GpuSampleWire> for GpuSample {
        type Error = String;
        fn try_from(g: w::GpuSampleWire) -> Result<Self, String> {
            let mut values = [None; 10];
            for (slot, v) in values.iter_mut().zip(g.values) {
                *slot = v;
            }
            Ok(GpuSample {
                run_id: Some(run_id(&g.run_id)?),
                ts: crate::time::parse(&g.ts).ok_or("ts: not an RFC 3339 time")?,
                gpu: g.gpu,
                values,
            })
        }
    }
}

/// Now, as the store writes times (RFC 3339, UTC, microseconds).
pub fn now() -> String {
    crate::time::stamp(&crate::time::now())
}
