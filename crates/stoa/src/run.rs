//! `stoa python run`: bundles a file with its local imports, starts the run, shows why
//! it waits, streams its output, and exits with the run's exit code.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use futures::StreamExt;
use stoa_client::{Client, SseEvent};
use stoa_types::{PythonStartRequest, RunStatus, StreamEvent};

/// Arguments of `stoa python run`.
#[derive(clap::Args)]
pub struct PythonRunArgs {
    /// A Python file, or a snippet of code.
    pub target: String,
    /// Requirements: a file, or the requirement text itself.
    #[arg(short = 'r', long)]
    pub requirements: Option<String>,
    /// Hardware profile.
    #[arg(short = 'm', long, default_value = "cpu")]
    pub machine: String,
    /// Seconds before the run is killed.
    #[arg(short = 't', long)]
    pub timeout: Option<i64>,
    /// Print the run id and return without streaming.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Modules to import before the code runs.
    #[arg(long = "import")]
    pub imports: Vec<String>,
    /// The name the code runs as (default: the file's name, or script.py).
    #[arg(short = 'f', long)]
    pub file_name: Option<String>,
    #[command(flatten)]
    pub opts: RunOpts,
    /// Arguments for the script.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// Options every run type takes: name, labels, metadata, callbacks.
#[derive(clap::Args, Debug, Default)]
pub struct RunOpts {
    /// A name for the run (also `--run-name`, the official client's spelling).
    #[arg(long, visible_alias = "run-name")]
    pub name: Option<String>,
    /// A label (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Metadata KEY=VALUE (repeatable; also `--metadata`, the official client's
    /// spelling).
    #[arg(long = "meta", visible_alias = "metadata")]
    pub meta: Vec<String>,
    /// URL to POST to when the run ends (repeatable).
    #[arg(long = "callback")]
    pub callbacks: Vec<String>,
}

impl RunOpts {
    /// `--meta` entries as a map (a plain error when one has no `=`).
    pub fn metadata(&self) -> anyhow::Result<Option<std::collections::BTreeMap<String, String>>> {
        if self.meta.is_empty() {
            return Ok(None);
        }
        let mut m = std::collections::BTreeMap::new();
        for kv in &self.meta {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--meta {kv:?}: expected KEY=VALUE"))?;
            m.insert(k.to_string(), v.to_string());
        }
        Ok(Some(m))
    }

    /// Labels, when any were given.
    pub fn labels(&self) -> Option<Vec<String>> {
        (!self.labels.is_empty()).then(|| self.labels.clone())
    }

    /// Callback URLs, when any were given.
    pub fn callbacks(&self) -> Option<Vec<String>> {
        (!self.callbacks.is_empty()).then(|| self.callbacks.clone())
    }
}

/// Exit code of the CLI for a run that timed out.
pub const EXIT_TIMEOUT: i32 = 124;

/// Builds the start request from the arguments.
pub fn request(a: &PythonRunArgs) -> anyhow::Result<PythonStartRequest> {
    let path = Path::new(&a.target);
    let (mut code, mut file_name, import_files, dir) = if path.is_file() {
        let code =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let abs = std::fs::canonicalize(path)?;
        let root = abs
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let files = crate::bundle::local_imports(&abs, &root);
        let name = abs.file_name().map(|n| n.to_string_lossy().into_owned());
        (code, name, files, Some(root))
    } else {
        (a.target.clone(), None, Default::default(), None)
    };
    if a.file_name.is_some() {
        file_name = a.file_name.clone();
    }
    if !a.args.is_empty() {
        let mut argv = vec![file_name.clone().unwrap_or_else(|| "script.py".into())];
        argv.extend(a.args.iter().cloned());
        // JSON string literals are valid Python string literals.
        code = format!(
            "import sys; sys.argv = {}\n{code}",
            serde_json::to_string(&argv)?
        );
    }
    let requirements = match &a.requirements {
        Some(r) if Path::new(r).is_file() => Some(std::fs::read_to_string(r)?),
        Some(r) => Some(r.clone()),
        None => dir
            .map(|d| d.join("requirements.txt"))
            .filter(|p| p.is_file())
            .map(std::fs::read_to_string)
            .transpose()?,
    };
    Ok(PythonStartRequest {
        code,
        timeout: a.timeout,
        execution_type: Some(a.machine.clone()),
        file_name,
        requirements_content: requirements,
        prior_imports: (!a.imports.is_empty()).then(|| a.imports.clone()),
        import_files: (!import_files.is_empty())
            .then(|| serde_json::to_string(&import_files))
            .transpose()?,
        run_name: a.opts.name.clone(),
        labels: a.opts.labels(),
        metadata: a.opts.metadata()?,
        user_callback_urls: a.opts.callbacks(),
        ..Default::default()
    })
}

pub async fn python_run(a: PythonRunArgs) -> anyhow::Result<i32> {
    let client = crate::login::client()?;
    let req = request(&a)?;
    let started = client.start_python(&req).await?;
    follow_started(&client, &started, a.detach).await
}

/// After a start: with `detach`, prints the run's id and returns 0; otherwise streams
/// the run to its end (Ctrl-C aborts it).
pub async fn follow_started(
    client: &Client,
    started: &stoa_types::StartResponse,
    detach: bool,
) -> anyhow::Result<i32> {
    if detach {
        println!("Execution ID: {}", started.execution_id);
        return Ok(0);
    }
    follow(client, &started.execution_id, &started.streaming_url, true).await
}

/// Replays a run's output and follows it until it ends (Ctrl-C leaves it running).
pub async fn replay(client: &Client, id: &str) -> anyhow::Result<i32> {
    follow(client, id, &client.stream_url(id), false).await
}

/// The live status line shown on stderr while a run waits.
struct StatusLine {
    tty: bool,
    shown: bool,
    last: String,
}

impl StatusLine {
    fn show(&mut self, text: String) {
        if text == self.last {
            return;
        }
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{text}");
        } else {
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
        self.shown = true;
        self.last = text;
    }

    fn clear(&mut self) {
        if self.shown && self.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
        self.shown = false;
    }
}

/// The CLI's exit code for an ended run.
pub fn exit_code(status: RunStatus, return_code: Option<i64>, error: Option<&str>) -> i32 {
    match status {
        RunStatus::Completed => 0,
        RunStatus::Failed if error.is_some_and(|e| e.starts_with("timeout")) => EXIT_TIMEOUT,
        RunStatus::Failed => return_code.map(|c| c.clamp(1, 255) as i32).unwrap_or(1),
        _ => 1,
    }
}

/// Streams a run to its end. With `abort_on_interrupt`, the first Ctrl-C aborts the
/// run and the second exits at once (130).
pub async fn follow(
    client: &Client,
    id: &str,
    url: &str,
    abort_on_interrupt: bool,
) -> anyhow::Result<i32> {
    let mut status = StatusLine {
        tty: std::io::stderr().is_terminal(),
        shown: false,
        last: String::new(),
    };
    let mut last_id: Option<String> = None;
    let mut interrupts = 0;
    let mut reconnects = 0;
    loop {
        let mut stream = match client.stream(url, last_id.as_deref()).await {
            Ok(s) => s,
            Err(e) if reconnects < 5 && e.status().is_none() => {
                reconnects += 1;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e).context("opening the output stream"),
        };
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                _ = tokio::signal::ctrl_c(), if abort_on_interrupt => {
                    interrupts += 1;
                    if interrupts > 1 {
                        return Ok(130);
                    }
                    status.clear();
                    eprintln!("Aborting execution {id}… (Ctrl-C again to quit now)");
                    if let Err(e) = client.abort(id).await {
                        eprintln!("abort failed: {e}");
                    }
                    continue;
                }
            };
            match next {
                Some(Ok(SseEvent { id: eid, event })) => {
                    if let Some(i) = eid {
                        last_id = Some(i);
                    }
                    match event {
                        StreamEvent::Status(s) => {
                            let reason = s
                                .pending_reason
                                .map(|r| format!(": {r}"))
                                .unwrap_or_default();
                            status.show(format!(
                                "[{}] {}{reason}",
                                id.get(..8).unwrap_or(id),
                                s.status
                            ));
                        }
                        StreamEvent::Output(o) => {
                            status.clear();
                            if o.stream.as_deref() == Some("stderr") {
                                eprint!("{}", o.content);
                            } else {
                                print!("{}", o.content);
                                let _ = std::io::stdout().flush();
                            }
                        }
                        StreamEvent::JobFinished(f) => {
                            status.clear();
                            let st = f.job.status.unwrap_or(if f.job.result.error.is_some() {
                                RunStatus::Failed
                            } else {
                                RunStatus::Completed
                            });
                            let code = exit_code(
                                st,
                                f.job.result.return_code,
                                f.job.result.error.as_deref(),
                            );
                            if st != RunStatus::Completed {
                                let why = f.job.result.error.clone().unwrap_or_else(|| {
                                    format!("exit code {}", f.job.result.return_code.unwrap_or(-1))
                                });
                                eprintln!("Run {st}: {why}");
                            }
                            eprintln!("Execution ID: {id}");
                            return Ok(code);
                        }
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
        // The stream closed without its end event (server restart, network): resume.
        reconnects += 1;
        if reconnects > 20 {
            anyhow::bail!("the output stream kept closing before the run ended");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
