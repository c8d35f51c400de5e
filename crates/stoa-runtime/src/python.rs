//! Python runs: a cached virtual environment per requirement set, and the user's code
//! started in a sandbox (bubblewrap when installed) as its own process group.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use stoa_core::requirements::{self, Requirement};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::{OutputLine, ProcessExecution, RuntimeError};

/// The interpreter runs use, probed once at start.
#[derive(Debug, Clone)]
pub struct Interpreter {
    /// Absolute path of the real executable (not a shim).
    pub path: PathBuf,
    /// `major.minor.micro`.
    pub version: String,
    /// `sys.stdlib_module_names`, used to clean requirement lists.
    pub stdlib: BTreeSet<String>,
}

impl Interpreter {
    /// Runs `python` once to learn its real path, version and standard-library names.
    pub fn probe(python: &str) -> Result<Self, RuntimeError> {
        let out = std::process::Command::new(python)
            .arg("-c")
            .arg("import sys, json; print(json.dumps({'exe': sys.executable, 'version': '%d.%d.%d' % sys.version_info[:3], 'stdlib': sorted(sys.stdlib_module_names)}))")
            .output()
            .map_err(|e| RuntimeError::io(format!("could not run the Python interpreter {python:?}"), e))?;
        if !out.status.success() {
            return Err(RuntimeError::System(format!(
                "the Python interpreter {python:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        #[derive(serde::Deserialize)]
        struct Probe {
            exe: PathBuf,
            version: String,
            stdlib: BTreeSet<String>,
        }
        let p: Probe = serde_json::from_slice(&out.stdout)
            .map_err(|e| RuntimeError::System(format!("unexpected answer from {python:?}: {e}")))?;
        Ok(Interpreter {
            path: p.exe,
            version: p.version,
            stdlib: p.stdlib,
        })
    }
}

/// How runs are isolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sandbox {
    /// bubblewrap at this path.
    Bubblewrap(PathBuf),
    /// A plain process group with a cleared environment.
    None,
}

impl Sandbox {
    /// Finds a working bubblewrap on PATH (it must be able to create a sandbox here).
    pub fn detect() -> Sandbox {
        let Some(path) = find_on_path("bwrap") else {
            return Sandbox::None;
        };
        let ok = std::process::Command::new(&path)
            .args([
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--unshare-pid",
                "true",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            Sandbox::Bubblewrap(path)
        } else {
            Sandbox::None
        }
    }
}

/// Finds an executable on PATH.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Settings of the Python runtime, from the server config.
#[derive(Debug, Clone)]
pub struct PythonRuntimeConfig {
    pub interpreter: Interpreter,
    /// Where environments are cached (`DATA_DIR/envs`).
    pub env_root: PathBuf,
    /// `uv`, when installed; else `python -m venv` and pip.
    pub uv: Option<PathBuf>,
    /// Cache directory for uv or pip downloads.
    pub download_cache: PathBuf,
    /// Package index to install from (the installer's default when unset).
    pub index_url: Option<String>,
    pub sandbox: Sandbox,
    /// Whether runs may use the network.
    pub network: bool,
    /// Paths the run must not see (the data directory).
    pub hidden_paths: Vec<PathBuf>,
    /// Variables copied from the server's environment into every run (CA bundles…).
    pub pass_env: Vec<(String, String)>,
}

/// What one Python run needs to start.
#[derive(Debug, Clone)]
pub struct PythonJob {
    pub run_id: String,
    /// The run's private working directory (created by the caller).
    pub workdir: PathBuf,
    pub code: String,
    pub file_name: String,
    pub import_files: BTreeMap<String, String>,
    pub prior_imports: Vec<String>,
    pub requirements: Vec<Requirement>,
    /// Extra variables for the run (its id; later secrets).
    pub env: Vec<(String, String)>,
}

/// A ready environment.
#[derive(Debug, Clone)]
pub struct PythonEnv {
    pub dir: PathBuf,
    pub python: PathBuf,
}

/// The Python runtime.
pub struct PythonRuntime {
    cfg: PythonRuntimeConfig,
    /// One build at a time per environment key; other runs wanting it wait.
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

const READY_MARKER: &str = ".stoa-ready";

impl PythonRuntime {
    /// A runtime with these settings.
    pub fn new(cfg: PythonRuntimeConfig) -> Self {
        PythonRuntime {
            cfg,
            building: Mutex::new(HashMap::new()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &PythonRuntimeConfig {
        &self.cfg
    }

    /// Cleans raw requirement text for this interpreter, dropping standard-library names
    /// and the bundled local modules.
    pub fn clean_requirements(
        &self,
        raw: &str,
        local_modules: &BTreeSet<String>,
    ) -> Vec<Requirement> {
        requirements::clean(raw, &self.cfg.interpreter.stdlib, local_modules)
    }

    fn env_dir(&self, reqs: &[Requirement]) -> PathBuf {
        self.cfg
            .env_root
            .join(requirements::env_key(reqs, &self.cfg.interpreter.version))
    }

    /// True when the environment for `reqs` is already built.
    pub fn env_cached(&self, reqs: &[Requirement]) -> bool {
        self.env_dir(reqs).join(READY_MARKER).exists()
    }

    /// Returns the environment for `reqs`, building it when it is not cached. A cached
    /// environment is used as is: nothing is installed and no index is contacted.
    /// Warnings about tolerated requirements are passed to `warn`.
    pub async fn prepare_env(
        &self,
        reqs: &[Requirement],
        warn: &(dyn Fn(String) + Send + Sync),
    ) -> Result<PythonEnv, RuntimeError> {
        let dir = self.env_dir(reqs);
        let env = PythonEnv {
            python: dir.join("bin").join("python"),
            dir: dir.clone(),
        };
        if dir.join(READY_MARKER).exists() {
            return Ok(env);
        }
        let key = dir.to_string_lossy().into_owned();
        let lock = self
            .building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if dir.join(READY_MARKER).exists() {
            return Ok(env);
        }
        // A directory without the marker is a build that was interrupted: start over.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| RuntimeError::io("removing a half-built environment", e))?;
        }
        std::fs::create_dir_all(&self.cfg.env_root)
            .map_err(|e| RuntimeError::io("creating the environment cache", e))?;
        let started = Instant::now();
        self.create_venv(&dir).await?;
        if !reqs.is_empty()
            && let Err(all_err) = self.install(&env, reqs).await
        {
            // Best effort: install one at a time; only strict lines (pins, URLs) may fail the run.
            for r in reqs {
                if let Err(e) = self.install(&env, std::slice::from_ref(r)).await {
                    if r.strict {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(RuntimeError::Requirements(format!(
                            "could not install requirement '{}': {}",
                            r.line,
                            last_lines(&e, 15)
                        )));
                    }
                    warn(format!(
                        "[stoa] skipped requirement '{}': it could not be installed\n",
                        r.line
                    ));
                }
            }
            tracing::debug!(error = %last_lines(&all_err, 5), "installing all requirements at once failed; installed one by one");
        }
        std::fs::write(
            dir.join(READY_MARKER),
            format!("{:?}\n", reqs.iter().map(|r| &r.line).collect::<Vec<_>>()),
        )
        .map_err(|e| RuntimeError::io("marking the environment ready", e))?;
        tracing::info!(env = %dir.display(), requirements = reqs.len(), seconds = started.elapsed().as_secs_f64(), "built Python environment");
        Ok(env)
    }

    async fn create_venv(&self, dir: &Path) -> Result<(), RuntimeError> {
        let mut cmd = match &self.cfg.uv {
            Some(uv) => {
                let mut c = Command::new(uv);
                c.arg("venv")
                    .arg("--quiet")
                    .arg("--python")
                    .arg(&self.cfg.interpreter.path)
                    .arg(dir);
                c
            }
            None => {
                let mut c = Command::new(&self.cfg.interpreter.path);
                c.arg("-m").arg("venv").arg(dir);
                c
            }
        };
        self.installer_env(&mut cmd);
        run_tool(cmd).await.map_err(|e| {
            RuntimeError::System(format!("could not create a virtual environment: {e}"))
        })
    }

    async fn install(&self, env: &PythonEnv, reqs: &[Requirement]) -> Result<(), String> {
        let mut cmd = match &self.cfg.uv {
            Some(uv) => {
                let mut c = Command::new(uv);
                c.arg("pip")
                    .arg("install")
                    .arg("--quiet")
                    .arg("--python")
                    .arg(&env.python);
                c
            }
            None => {
                let mut c = Command::new(&env.python);
                c.args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ]);
                c
            }
        };
        if let Some(url) = &self.cfg.index_url {
            cmd.arg("--index-url").arg(url);
        }
        cmd.arg("--");
        for r in reqs {
            cmd.arg(&r.line);
        }
        self.installer_env(&mut cmd);
        run_tool(cmd).await
    }

    fn installer_env(&self, cmd: &mut Command) {
        cmd.env("UV_CACHE_DIR", &self.cfg.download_cache)
            .env("PIP_CACHE_DIR", &self.cfg.download_cache)
            .env("UV_PYTHON_DOWNLOADS", "never")
            .env_remove("VIRTUAL_ENV");
    }

    /// When a sandboxed run ended because the sandbox itself could not be set up (it
    /// exits 1 after one `bwrap: …` line, before the run printed anything), that line.
    pub fn setup_failure(
        &self,
        exit: crate::Exit,
        first: (Option<&str>, Option<&str>),
    ) -> Option<String> {
        let (stdout, stderr) = first;
        let line = stderr?.trim_end();
        (matches!(self.cfg.sandbox, Sandbox::Bubblewrap(_))
            && exit.code == Some(1)
            && stdout.is_none()
            && line.starts_with("bwrap: "))
        .then(|| line.to_string())
    }

    /// Writes the code and bundled files into the working directory and starts the run.
    pub fn launch(
        &self,
        job: &PythonJob,
        env: &PythonEnv,
        output: mpsc::Sender<OutputLine>,
    ) -> Result<ProcessExecution, RuntimeError> {
        let wd = &job.workdir;
        write_files(job)?;
        let py_args = python_args(job);
        let mut vars = run_env(job, &env.dir);
        vars.extend(self.cfg.pass_env.iter().cloned());
        vars.extend(job.env.iter().cloned());

        let cmd = match &self.cfg.sandbox {
            Sandbox::Bubblewrap(bwrap) => {
                let mut c = Command::new(bwrap);
                c.args([
                    "--ro-bind",
                    "/",
                    "/",
                    "--dev",
                    "/dev",
                    "--proc",
                    "/proc",
                    "--tmpfs",
                    "/tmp",
                ]);
                for h in &self.cfg.hidden_paths {
                    if h.exists() {
                        c.arg("--tmpfs").arg(h);
                    }
                }
                c.arg("--ro-bind").arg(&env.dir).arg(&env.dir);
                c.arg("--bind").arg(wd).arg(wd);
                c.args([
                    "--unshare-pid",
                    "--unshare-ipc",
                    "--unshare-uts",
                    "--die-with-parent",
                ]);
                if !self.cfg.network {
                    c.arg("--unshare-net");
                }
                c.arg("--chdir").arg(wd);
                vars.push(("TMPDIR".into(), "/tmp".into()));
                c.arg("--").arg(&env.python).args(&py_args);
                c
            }
            Sandbox::None => {
                let tmp = wd.join(".tmp");
                std::fs::create_dir_all(&tmp)
                    .map_err(|e| RuntimeError::io("creating the run's temp dir", e))?;
                vars.push(("TMPDIR".into(), tmp.display().to_string()));
                let mut c = Command::new(&env.python);
                c.args(&py_args).current_dir(wd);
                c
            }
        };
        let mut cmd = cmd;
        cmd.env_clear().envs(vars);
        let wrapper = match self.cfg.sandbox {
            Sandbox::Bubblewrap(_) => Some("bwrap"),
            Sandbox::None => None,
        };
        ProcessExecution::spawn(cmd, output, wrapper)
    }
}

/// Writes the run's code as `file_name` and its bundled files into its working directory.
pub fn write_files(job: &PythonJob) -> Result<(), RuntimeError> {
    let wd = &job.workdir;
    for (rel, text) in &job.import_files {
        let p = wd.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| RuntimeError::io("writing bundled files", e))?;
        }
        std::fs::write(&p, text).map_err(|e| RuntimeError::io("writing bundled files", e))?;
    }
    std::fs::write(wd.join(&job.file_name), &job.code)
        .map_err(|e| RuntimeError::io("writing the run's code", e))
}

/// Interpreter arguments that run the job's file, with its prior imports first.
pub fn python_args(job: &PythonJob) -> Vec<String> {
    let mut py_args: Vec<String> = vec!["-u".into()];
    if job.prior_imports.is_empty() {
        py_args.push(job.file_name.clone());
    } else {
        // Prior imports are bound in the script's globals, as if it had imported them.
        let boot = format!(
            "import sys, runpy\nsys.path.insert(0, {wd:?})\ng = {{m.split('.')[0]: __import__(m) for m in {imports:?}}}\nsys.argv = [{file:?}]\nrunpy.run_path({file:?}, init_globals=g, run_name='__main__')\n",
            wd = job.workdir.to_string_lossy(),
            imports = job.prior_imports,
            file = job.file_name,
        );
        py_args.push("-c".into());
        py_args.push(boot);
    }
    py_args
}

/// The environment a run sees (before pass-through and job variables).
pub fn run_env(job: &PythonJob, env_dir: &Path) -> Vec<(String, String)> {
    let wd = job.workdir.display().to_string();
    vec![
        (
            "PATH".into(),
            format!(
                "{}:/usr/local/bin:/usr/bin:/bin",
                env_dir.join("bin").display()
            ),
        ),
        ("HOME".into(), wd.clone()),
        ("LANG".into(), "C.UTF-8".into()),
        ("PYTHONUNBUFFERED".into(), "1".into()),
        ("PYTHONPATH".into(), wd),
        ("VIRTUAL_ENV".into(), env_dir.display().to_string()),
        ("STOA_EXECUTION_ID".into(), job.run_id.clone()),
    ]
}

async fn run_tool(mut cmd: Command) -> Result<(), String> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.trim().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
