//! Python runs: a cached virtual environment per requirement set, and the user's code
//! started in a sandbox (bubblewrap when installed) as its own process group.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use stoa_core::PythonRunSpec;
use stoa_core::requirements::{self, Requirement};
use tokio::sync::mpsc;

use crate::cgroup::Limits;
use crate::launch::{
    LaunchContext, LaunchError, LaunchRequest, Launched, Runtime, settle_env, warnings,
};
use crate::sandbox::{Confinement, Jail};
use crate::{Execution, OutputLine, ProcessExecution, RuntimeError};

/// The interpreter runs use, probed once at start.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Interpreter {
    /// Absolute path of the real executable (not a shim).
    pub path: PathBuf,
    /// `major.minor.micro`.
    pub version: String,
    /// `sys.stdlib_module_names`, used to clean requirement lists.
    pub stdlib: BTreeSet<String>,
    /// `sys.base_prefix`: the installation sandboxes must see (read-only).
    pub prefix: PathBuf,
}

impl Interpreter {
    /// Runs `python` once to learn its real path, version and standard-library names.
    pub fn probe(python: &str) -> Result<Self, RuntimeError> {
        let out = std::process::Command::new(python)
            .arg("-c")
            .arg("import sys, json; print(json.dumps({'exe': sys.executable, 'version': '%d.%d.%d' % sys.version_info[:3], 'stdlib': sorted(sys.stdlib_module_names), 'prefix': sys.base_prefix}))")
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
            prefix: PathBuf,
        }
        let p: Probe = serde_json::from_slice(&out.stdout)
            .map_err(|e| RuntimeError::System(format!("unexpected answer from {python:?}: {e}")))?;
        Ok(Interpreter {
            path: p.exe,
            version: p.version,
            stdlib: p.stdlib,
            prefix: p.prefix,
        })
    }
}

impl Interpreter {
    /// Like [`Interpreter::probe`], with the answer kept in `cache` (a JSON file) for
    /// the next process that starts here (`stoa exec` starts once per Slurm job). The
    /// kept answer is used only for the same name resolving to the same executable file
    /// (path, size, modification time), and only when that file is a real binary: a
    /// version manager's shim may pick another interpreter each time it runs.
    pub fn probe_cached(python: &str, cache: &Path) -> Result<Self, RuntimeError> {
        let key = Self::cache_key(python);
        if let Some(k) = &key
            && let Ok(text) = std::fs::read(cache)
            && let Ok((kept_key, kept)) = serde_json::from_slice::<(String, Interpreter)>(&text)
            && &kept_key == k
        {
            return Ok(kept);
        }
        let probed = Self::probe(python)?;
        if let Some(k) = key {
            // Best effort, written whole (rename) so a reader never sees half of it.
            let tmp = cache.with_extension(format!("tmp.{}", std::process::id()));
            if let Ok(text) = serde_json::to_vec(&(k, &probed))
                && std::fs::write(&tmp, text).is_ok()
                && std::fs::rename(&tmp, cache).is_err()
            {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        Ok(probed)
    }

    /// What identifies the executable `python` names: its resolved path, size and
    /// modification time; `None` when it is not an ELF binary (a shim, a script).
    fn cache_key(python: &str) -> Option<String> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let found = if python.contains('/') {
            PathBuf::from(python)
        } else {
            find_on_path(python)?
        };
        let real = std::fs::canonicalize(&found).ok()?;
        let mut magic = [0u8; 4];
        std::fs::File::open(&real)
            .ok()?
            .read_exact(&mut magic)
            .ok()?;
        if &magic != b"\x7fELF" {
            return None;
        }
        let m = std::fs::metadata(&real).ok()?;
        Some(format!(
            "{python}\0{}\0{}\0{}.{}",
            real.display(),
            m.size(),
            m.mtime(),
            m.mtime_nsec()
        ))
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
    /// Install wheels only: no package's build code runs (`python.only_binary`).
    pub only_binary: bool,
    /// Why Python runs cannot execute on this worker (a root server without a sandbox);
    /// every run fails with it.
    pub unavailable: Option<String>,
    /// The sandbox of runs and builds.
    pub confinement: Confinement,
    /// Limits of an environment build.
    pub build_limits: Limits,
    /// Longest an environment build may take, all its steps together.
    pub build_timeout: std::time::Duration,
    /// Variables copied from the server's environment into every run (CA bundles…).
    pub pass_env: Vec<(String, String)>,
    /// Whether runs reach the network when their profile does not say
    /// (`python.network`).
    pub network: bool,
    /// Warm sandboxes (`python.warm`); used only with bubblewrap.
    pub warm: crate::warm::WarmConfig,
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
    /// Memory, pids, CPU and disk limits from the run's hardware profile.
    pub limits: Limits,
    /// Whether the run may use the network (its profile's choice).
    pub network: bool,
    /// Device files the run is given (its GPUs).
    pub devices: Vec<PathBuf>,
    /// The org's storage directory and where the run sees it (sandboxed runs; others
    /// see it where it is). `STOA_STORAGE` names the path the run sees.
    pub storage: Option<(PathBuf, PathBuf)>,
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
    /// Sandboxes started ahead of runs.
    warm: crate::warm::WarmPools,
}

/// The file that marks a complete environment.
pub(crate) const READY_MARKER: &str = ".stoa-ready";

impl PythonRuntime {
    /// A runtime with these settings.
    pub fn new(cfg: PythonRuntimeConfig) -> Self {
        sweep_builds(&cfg.env_root);
        let mut warm = cfg.warm.clone();
        // Only when runs drop to the sandbox uid: without root, a warm sandbox's
        // processes have the server's uid outside, and could change its directory while
        // the server writes the run's files into it.
        warm.enabled &= cfg.confinement.sandbox.isolates()
            && cfg.confinement.drop_to.is_some()
            && cfg.unavailable.is_none();
        PythonRuntime {
            cfg,
            building: Mutex::new(HashMap::new()),
            warm: crate::warm::WarmPools::new(warm),
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
    ///
    /// A build is untrusted code (a package's build backend runs): it runs in the same
    /// sandbox as runs, with network, in a directory of its own that is mounted at the
    /// environment's final path, and is published by one rename once complete; it never
    /// sees another environment. Published environments belong to the server and are
    /// read-only to runs.
    pub async fn prepare_env(
        &self,
        reqs: &[Requirement],
        warn: &(dyn Fn(String) + Send + Sync),
    ) -> Result<PythonEnv, RuntimeError> {
        if let Some(why) = &self.cfg.unavailable {
            return Err(RuntimeError::System(why.clone()));
        }
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
        // And across processes: `stoa exec` of several Slurm jobs on one node share
        // the node's environment cache.
        let _across = lock_across_processes(&self.cfg.env_root, &dir).await?;
        if dir.join(READY_MARKER).exists() {
            return Ok(env);
        }
        // A directory without the marker is a build that was interrupted: start over.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| RuntimeError::io("removing a half-built environment", e))?;
        }
        let started = Instant::now();
        let sandboxed = self.cfg.confinement.sandbox.isolates();
        // Without bubblewrap nothing can be mounted at the final path: build in place.
        let build = if sandboxed {
            build_dir(&self.cfg.env_root, &dir)?
        } else {
            std::fs::create_dir_all(&dir)
                .map_err(|e| RuntimeError::io("creating the environment", e))?;
            dir.clone()
        };
        // Without wheels-only installs, build code runs: it gets a download cache of its
        // own, so it cannot plant files that another org's build would install.
        let cache = if self.cfg.only_binary {
            self.cfg.download_cache.clone()
        } else {
            build.with_extension("cache")
        };
        // Removed however the build ends: failed, or dropped because the run was
        // aborted or stopped while it built.
        let mut leftovers = Leftovers(vec![cache.clone()]);
        if build != dir {
            leftovers.0.push(build.clone());
        }
        if self.cfg.only_binary {
            leftovers.0.retain(|p| *p != cache);
        }
        let result = async {
            std::fs::create_dir_all(&cache)
                .map_err(|e| RuntimeError::io("creating the download cache", e))?;
            let c = &self.cfg.confinement;
            c.give(&build)
                .and_then(|_| c.give(&cache))
                .map_err(|e| RuntimeError::io("preparing the build directory", e))?;
            self.build(
                &env,
                reqs,
                warn,
                &Build {
                    dir: &build,
                    cache: &cache,
                    deadline: Instant::now() + self.cfg.build_timeout,
                },
            )
            .await
        }
        .await;
        if let Err(e) = result {
            if build == dir {
                let _ = std::fs::remove_dir_all(&build);
            }
            return Err(e);
        }
        // Once published, the build directory is gone (renamed into place); when
        // publishing fails, the guard removes it.
        publish(
            &build,
            (build != dir).then_some(&dir),
            Some(format!(
                "{:?}\n",
                reqs.iter().map(|r| &r.line).collect::<Vec<_>>()
            )),
        )?;
        tracing::info!(env = %dir.display(), requirements = reqs.len(), seconds = started.elapsed().as_secs_f64(), "built Python environment");
        Ok(env)
    }

    async fn build(
        &self,
        env: &PythonEnv,
        reqs: &[Requirement],
        warn: &(dyn Fn(String) + Send + Sync),
        at: &Build<'_>,
    ) -> Result<(), RuntimeError> {
        self.create_venv(&env.dir, at).await?;
        if !reqs.is_empty()
            && let Err(all_err) = self.install(env, reqs, at).await
        {
            if Instant::now() >= at.deadline {
                return Err(RuntimeError::Requirements(format!(
                    "the environment build did not finish within {} s",
                    self.cfg.build_timeout.as_secs()
                )));
            }
            // Best effort: install one at a time; only strict lines (pins, URLs) may fail the run.
            for r in reqs {
                if let Err(e) = self.install(env, std::slice::from_ref(r), at).await {
                    if r.strict {
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
        Ok(())
    }

    async fn create_venv(&self, dir: &Path, at: &Build<'_>) -> Result<(), RuntimeError> {
        let interp = self.cfg.interpreter.path.clone().into_os_string();
        let argv: Vec<std::ffi::OsString> = match &self.cfg.uv {
            Some(uv) => vec![
                uv.clone().into(),
                "venv".into(),
                "--quiet".into(),
                "--python".into(),
                interp,
                dir.into(),
            ],
            None => vec![interp, "-m".into(), "venv".into(), dir.into()],
        };
        self.run_tool(argv, dir, at).await.map_err(|e| {
            RuntimeError::System(format!("could not create a virtual environment: {e}"))
        })
    }

    async fn install(
        &self,
        env: &PythonEnv,
        reqs: &[Requirement],
        at: &Build<'_>,
    ) -> Result<(), String> {
        let mut argv: Vec<std::ffi::OsString> = match &self.cfg.uv {
            Some(uv) => vec![
                uv.clone().into(),
                "pip".into(),
                "install".into(),
                "--quiet".into(),
                "--python".into(),
                env.python.clone().into(),
            ],
            None => vec![
                env.python.clone().into(),
                "-m".into(),
                "pip".into(),
                "install".into(),
                "--quiet".into(),
                "--disable-pip-version-check".into(),
            ],
        };
        if let Some(url) = &self.cfg.index_url {
            argv.push("--index-url".into());
            argv.push(url.into());
        }
        if self.cfg.only_binary {
            argv.push("--only-binary".into());
            argv.push(":all:".into());
        }
        argv.push("--".into());
        argv.extend(reqs.iter().map(|r| r.line.clone().into()));
        self.run_tool(argv, &env.dir, at).await
    }

    /// Runs an installer step in the build sandbox, with `dir` (the environment's final
    /// path) backed by the build directory.
    async fn run_tool(
        &self,
        argv: Vec<std::ffi::OsString>,
        dir: &Path,
        at: &Build<'_>,
    ) -> Result<(), String> {
        let c = &self.cfg.confinement;
        let cache = at.cache.display().to_string();
        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/bin:/usr/bin:/bin".to_string(),
            ),
            ("HOME".into(), "/tmp".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("UV_CACHE_DIR".into(), cache.clone()),
            ("PIP_CACHE_DIR".into(), cache),
            ("UV_PYTHON_DOWNLOADS".into(), "never".into()),
            ("UV_NO_PROGRESS".into(), "1".into()),
        ];
        env.extend(self.cfg.pass_env.iter().cloned());
        let sandboxed = c.sandbox.isolates();
        let jail = Jail {
            name: format!(
                "build-{}",
                dir.file_name().unwrap_or_default().to_string_lossy()
            ),
            argv,
            env,
            cwd: PathBuf::from("/tmp"),
            rw: vec![at.cache.to_path_buf()],
            // Without bubblewrap nothing can be mounted: the build writes in place.
            rw_at: if sandboxed {
                vec![(at.dir.to_path_buf(), dir.to_path_buf())]
            } else {
                vec![]
            },
            ro: self.cfg.uv.iter().cloned().collect(),
            network: true,
            limits: self.cfg.build_limits.clone(),
            ..Default::default()
        };
        let mut prepared = c.prepare(&jail).map_err(|e| e.to_string())?;
        let mut cmd = prepared.forking();
        let run = cmd
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        // Past the deadline the step is dropped, which kills its sandbox.
        let out = tokio::time::timeout_at(at.deadline.into(), run)
            .await
            .map_err(|_| "the build step did not finish in time".to_string())?
            .map_err(|e| e.to_string())?;
        drop(prepared.cgroup);
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

    /// The whole environment of a run, as it starts (later entries win).
    fn run_vars(&self, job: &PythonJob, env: &PythonEnv) -> Vec<(String, String)> {
        let sandboxed = self.cfg.confinement.sandbox.isolates();
        let mut vars = run_env(job, &env.dir);
        vars.extend(self.cfg.pass_env.iter().cloned());
        vars.extend(job.env.iter().cloned());
        vars.push(if sandboxed {
            ("TMPDIR".into(), "/tmp".into())
        } else {
            (
                "TMPDIR".into(),
                job.workdir.join(".tmp").display().to_string(),
            )
        });
        if let Some((host, inside)) = &job.storage {
            // Without bubblewrap nothing can be mounted: the run sees the directory itself.
            let seen = if sandboxed { inside } else { host };
            vars.push(("STOA_STORAGE".into(), seen.display().to_string()));
        }
        vars
    }

    /// What a warm sandbox for `job` starts with, when a warm sandbox can run it exactly
    /// as a cold start would: its variables hold no NUL, `PYTHONPATH` is its working
    /// directory (which is handed over, with `HOME` and its id), it has no GPUs (a
    /// sandbox waiting with a GPU's devices would hold them unreserved), and it has no
    /// bundled modules when it has prior imports (what those import before the run
    /// would shadow its own files).
    fn warm_recipe(
        &self,
        job: &PythonJob,
        env: &PythonEnv,
        vars: &std::collections::BTreeMap<String, String>,
        local_modules: &BTreeSet<String>,
    ) -> Option<crate::warm::Recipe> {
        if !self.warm.enabled() {
            return None;
        }
        let wd = job.workdir.display().to_string();
        let runs_dir = job.workdir.parent()?.to_path_buf();
        let plain = |s: &str| !s.contains('\0');
        let prior = !job.prior_imports.is_empty();
        if vars.get("PYTHONPATH") != Some(&wd)
            || !vars.iter().all(|(k, v)| plain(k) && plain(v))
            || !plain(&job.file_name)
            || !job.devices.is_empty()
            || vars
                .get("CUDA_VISIBLE_DEVICES")
                .is_some_and(|g| !g.is_empty())
            || (prior && (!local_modules.is_empty() || !job.import_files.is_empty()))
            || job.prior_imports.iter().any(|m| {
                !m.split('.')
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'))
            })
        {
            return None;
        }
        let env_vars = vars
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "PYTHONPATH" | "STOA_EXECUTION_ID"))
            .map(|(k, v)| {
                if k == "HOME" && *v == wd {
                    (k.clone(), "/tmp".to_string())
                } else {
                    (k.clone(), v.clone())
                }
            })
            .collect();
        Some(crate::warm::Recipe {
            python: env.python.clone(),
            env_dir: env.dir.clone(),
            runs_dir,
            env: env_vars,
            prior: job.prior_imports.clone(),
            limits: job.limits.clone(),
            network: job.network,
            devices: job.devices.clone(),
            storage: job.storage.clone(),
        })
    }

    /// Starts `job` in the warm sandbox `ready`: its files in the sandbox's runs
    /// directory, then its directory, file name and environment handed over.
    async fn start_warm(
        &self,
        ready: crate::warm::Ready,
        job: &PythonJob,
        vars: &std::collections::BTreeMap<String, String>,
    ) -> Result<(ProcessExecution, mpsc::Receiver<OutputLine>, f64), RuntimeError> {
        let crate::warm::Ready {
            mut exec,
            mut stdin,
            output,
            dir,
            ..
        } = ready;
        // As for any process with network: never started without its filter in place.
        if let (true, Some(p)) = (job.network, &self.cfg.confinement.egress) {
            crate::egress::install(p).map_err(|e| {
                RuntimeError::System(format!("the network filter of runs is not in place: {e}"))
            })?;
        }
        let host = dir.join(job.workdir.file_name().unwrap_or_default());
        std::fs::create_dir(&host)
            .map_err(|e| RuntimeError::io("making the run's working directory", e))?;
        write_files(job, &host)?;
        self.cfg
            .confinement
            .give(&host)
            .map_err(|e| RuntimeError::io("handing the working directory to the run", e))?;
        let pgid = exec.pgid().unwrap_or(0) as i32;
        if self.cfg.confinement.drop_to.is_some() {
            crate::sandbox::normal_priority(pgid);
        }
        let before = crate::metrics::tree_cpu_s(pgid);
        let [out, err] = exec.own_output()?;
        self.feed(
            &mut stdin,
            job,
            vars,
            Some([
                std::os::fd::AsFd::as_fd(&out),
                std::os::fd::AsFd::as_fd(&err),
            ]),
        )
        .await
        .map_err(|e| RuntimeError::io("handing the run to its warm sandbox", e))?;
        exec.expect_report(stdin);
        Ok((exec, output, before))
    }

    /// Writes the code and bundled files into the working directory and starts the run
    /// in its sandbox.
    ///
    /// A run with prior imports starts as a warm sandbox would, fed at once: the same
    /// program imports them, then runs the file through the interpreter's own script
    /// path, so warm and cold runs of it are alike.
    pub async fn start(
        &self,
        job: &PythonJob,
        env: &PythonEnv,
        output: mpsc::Sender<OutputLine>,
    ) -> Result<ProcessExecution, RuntimeError> {
        if let Some(why) = &self.cfg.unavailable {
            return Err(RuntimeError::System(why.clone()));
        }
        let wd = &job.workdir;
        write_files(job, wd)?;
        let c = &self.cfg.confinement;
        let sandboxed = c.sandbox.isolates();
        let vars = self.run_vars(job, env);
        if !sandboxed {
            std::fs::create_dir_all(wd.join(".tmp"))
                .map_err(|e| RuntimeError::io("creating the run's temp dir", e))?;
        }
        c.give(wd)
            .map_err(|e| RuntimeError::io("handing the working directory to the run", e))?;
        let fed = !job.prior_imports.is_empty();
        let mut argv: Vec<std::ffi::OsString> = vec![env.python.clone().into()];
        if fed {
            argv.extend([
                "-u".into(),
                "-c".into(),
                crate::warm::program(&job.prior_imports).into(),
            ]);
        } else {
            argv.extend(python_args(job).into_iter().map(Into::into));
        }
        let message: Option<BTreeMap<String, String>> = fed.then(|| vars.iter().cloned().collect());
        let mut rw_at = vec![];
        if let (Some((host, inside)), true) = (&job.storage, sandboxed) {
            rw_at.push((host.clone(), inside.clone()));
        }
        let jail = Jail {
            name: job.run_id.clone(),
            argv,
            env: vars,
            cwd: wd.clone(),
            rw_at,
            ro: vec![env.dir.clone()],
            devices: job.devices.clone(),
            network: job.network,
            limits: job.limits.clone(),
            ..Default::default()
        };
        let prepared = c.prepare(&jail)?;
        let disk = job.limits.disk_bytes.map(|d| (wd.clone(), d));
        let wrapper = sandboxed.then_some("bwrap");
        let Some(vars) = message else {
            return Ok(ProcessExecution::spawn(&prepared, output, wrapper)?
                .with_limits(prepared.cgroup, disk));
        };
        let (mut exec, mut stdin) = ProcessExecution::spawn_fed(&prepared, output, wrapper)?;
        exec.keep_output();
        let exec = exec.with_limits(prepared.cgroup, disk);
        self.feed(&mut stdin, job, &vars, None)
            .await
            .map_err(|e| RuntimeError::io("handing the run to its interpreter", e))?;
        Ok(exec)
    }

    /// Hands a run to the program of [`crate::warm`] waiting on `stdin`: its directory,
    /// file and whole environment (with `PWD` last, as bubblewrap sets it).
    async fn feed(
        &self,
        stdin: &mut tokio::net::UnixStream,
        job: &PythonJob,
        vars: &BTreeMap<String, String>,
        pipes: Option<[std::os::fd::BorrowedFd<'_>; 2]>,
    ) -> std::io::Result<()> {
        let wd = job.workdir.display().to_string();
        let pwd = self
            .cfg
            .confinement
            .sandbox
            .isolates()
            .then_some(("PWD", wd.as_str()));
        let env = vars
            .iter()
            .filter(|(k, _)| pwd.is_none() || *k != "PWD")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(pwd);
        crate::warm::hand_over(stdin, &job.workdir, &job.file_name, env, pipes).await
    }
}

/// Where an environment is built before it is published.
struct Build<'a> {
    /// The build's own directory (mounted at the environment's final path).
    dir: &'a Path,
    /// The installer's download cache.
    cache: &'a Path,
    /// When the whole build must have finished (`python.build_timeout_s`).
    deadline: Instant,
}

/// Directories removed when dropped (a build's, unless it was published).
pub(crate) struct Leftovers(pub(crate) Vec<PathBuf>);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for p in &self.0 {
            if p.exists() {
                let _ = std::fs::remove_dir_all(p);
            }
        }
    }
}

/// Removes the build directories under `root` that a server process no longer alive
/// left behind (crashed mid-build); those of live servers are theirs.
pub(crate) fn sweep_builds(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".build-") else {
            continue;
        };
        // `.build-{key}-{pid}-{seq}` and its `.cache`.
        if crate::sandbox::owner_gone(rest.strip_suffix(".cache").unwrap_or(rest)) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// An exclusive lock on the build of environment `dir`, held by this process until
/// dropped (a file lock next to the cache, so processes sharing the cache build each
/// environment once).
async fn lock_across_processes(
    root: &Path,
    dir: &Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, RuntimeError> {
    std::fs::create_dir_all(root)
        .map_err(|e| RuntimeError::io("creating the environment cache", e))?;
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let path = root.join(format!(".lock-{name}"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| RuntimeError::io("opening the environment's lock", e))?;
    tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| RuntimeError::io("locking the environment", e.into()))
    })
    .await
    .map_err(|e| RuntimeError::System(format!("locking the environment: {e}")))?
}

/// A fresh directory beside `dir` in `root` to build it in.
pub(crate) fn build_dir(root: &Path, dir: &Path) -> Result<PathBuf, RuntimeError> {
    std::fs::create_dir_all(root)
        .map_err(|e| RuntimeError::io("creating the environment cache", e))?;
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let build = root.join(crate::sandbox::owned_name(&format!(".build-{name}")));
    if build.exists() {
        let _ = std::fs::remove_dir_all(&build);
    }
    std::fs::create_dir(&build).map_err(|e| RuntimeError::io("creating the build directory", e))?;
    Ok(build)
}

/// Publishes a complete build as `dir`: marks it ready, hands it to this server's uid
/// (runs cannot change it), and renames it into place in one step.
pub(crate) fn publish(
    build: &Path,
    dir: Option<&Path>,
    marker: Option<String>,
) -> Result<(), RuntimeError> {
    let me = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    // First out of the build's hands: from here on nothing of it can change the tree.
    crate::sandbox::chown_tree(build, me, gid)
        .map_err(|e| RuntimeError::io("taking ownership of the built environment", e))?;
    // The build may have left anything at the marker's name (a link to a host file, so
    // that this server would write through it): remove it without following it, then
    // create the marker new (O_EXCL never follows a link).
    let path = build.join(READY_MARKER);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
        Ok(_) => std::fs::remove_file(&path),
        Err(_) => Ok(()),
    }
    .map_err(|e| RuntimeError::io("clearing the environment's marker", e))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| RuntimeError::io("marking the environment ready", e))?;
    std::io::Write::write_all(
        &mut f,
        marker.unwrap_or_else(|| "ready\n".into()).as_bytes(),
    )
    .map_err(|e| RuntimeError::io("marking the environment ready", e))?;
    match dir {
        Some(dir) => std::fs::rename(build, dir)
            .map_err(|e| RuntimeError::io("publishing the environment", e)),
        None => Ok(()),
    }
}

/// Writes the run's code as `file_name` and its bundled files into `wd` (its working
/// directory as the host sees it).
pub fn write_files(job: &PythonJob, wd: &Path) -> Result<(), RuntimeError> {
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

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.trim().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Where Python runs see their org's storage (`STOA_STORAGE` names it too).
const STORAGE_MOUNT: &str = "/mnt/s3";

/// The job of a Python run, wherever it executes: its code and files, its org's
/// variables, GPUs and storage.
pub(crate) fn python_job(
    run: &LaunchRequest<'_>,
    spec: PythonRunSpec,
    requirements: Vec<Requirement>,
    storage: PathBuf,
) -> PythonJob {
    let mut env = run.secrets.to_vec();
    env.push(("CUDA_VISIBLE_DEVICES".into(), run.gpu_ids.join(",")));
    env.push(("STOA_HARDWARE_PROFILE".into(), run.profile.to_string()));
    PythonJob {
        storage: Some((storage, PathBuf::from(STORAGE_MOUNT))),
        run_id: run.run_id.to_string(),
        workdir: run.workdir.to_path_buf(),
        code: spec.code,
        file_name: spec.file_name,
        import_files: spec.import_files,
        prior_imports: spec.prior_imports,
        requirements,
        env,
        limits: Default::default(),
        network: false,
        devices: vec![],
    }
}

/// Makes a Python run's working directory.
pub(crate) fn make_workdir(run: &LaunchRequest<'_>) -> Result<(), LaunchError> {
    std::fs::create_dir_all(run.workdir)
        .map_err(|e| LaunchError::Worker(format!("making the run's working directory: {e}")))
}

/// The NVIDIA device files of this machine (`CUDA_VISIBLE_DEVICES` picks a run's GPUs
/// among them).
fn nvidia_devices() -> Vec<PathBuf> {
    std::fs::read_dir("/dev")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("nvidia"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Sandboxed Python runs on this machine: the environment built (or reused) from the
/// run's requirements, the run in its sandbox with its profile's limits.
#[async_trait::async_trait]
impl Runtime for PythonRuntime {
    async fn launch(
        &self,
        run: &LaunchRequest<'_>,
        ctx: &dyn LaunchContext,
    ) -> Result<Launched, LaunchError> {
        let spec: PythonRunSpec = run.spec()?;
        let _launching = self.warm.launching();
        let reqs = self.clean_requirements(
            spec.requirements.as_deref().unwrap_or(""),
            &spec.local_module_names(),
        );
        if !self.env_cached(&reqs) {
            ctx.waiting("building Python environment".into());
        }
        let warnings = warnings();
        let warn = |w: String| warnings.lock().unwrap_or_else(|p| p.into_inner()).push(w);
        let env = settle_env(ctx, &warnings, self.prepare_env(&reqs, &warn)).await?;
        ctx.environment_ready().await?;
        let timeout_s = spec.run.timeout;
        let local_modules = spec.local_module_names();
        let mut job = python_job(run, spec, reqs, ctx.org_storage()?);
        // The limits containers get, and the disk a sandbox also limits.
        let r = &run.resources;
        job.limits = Limits {
            memory_bytes: r.memory_mb.map(|m| m * 1024 * 1024),
            pids: r.pids_limit.map(|n| n.max(1) as u64),
            cpus: r.cpus,
            disk_bytes: run.disk_mb.map(|m| m * 1024 * 1024),
        };
        job.network = r.network.unwrap_or(self.cfg.network);
        if !run.gpu_ids.is_empty() {
            job.devices = nvidia_devices();
        }
        let vars: std::collections::BTreeMap<String, String> =
            self.run_vars(&job, &env).into_iter().collect();
        if let Some(recipe) = self.warm_recipe(&job, &env, &vars, &local_modules) {
            let key = recipe.key();
            if let Some(ready) = self.warm.take(&key) {
                match self.start_warm(ready, &job, &vars).await {
                    Ok((exec, output, cpu_before_s)) => {
                        ctx.phase("warm").await?;
                        return Ok(Launched {
                            exec: Box::new(exec),
                            output,
                            timeout_s,
                            measure: None,
                            cpu_before_s,
                            ports: None,
                        });
                    }
                    // Its sandbox is gone with it; the run starts cold.
                    Err(e) => tracing::warn!(error = %e, "a warm sandbox could not take its run"),
                }
            }
            self.warm.learn(key, recipe);
        }
        // Only a cold run uses it: a warm one's is made in its sandbox's own directory.
        make_workdir(run)?;
        let (tx, rx) = mpsc::channel::<OutputLine>(1024);
        match self.start(&job, &env, tx).await {
            Ok(e) => {
                if self.warm.enabled() {
                    ctx.phase("cold").await?;
                }
                Ok(Launched {
                    exec: Box::new(e),
                    output: rx,
                    timeout_s,
                    measure: None,
                    cpu_before_s: 0.0,
                    ports: None,
                })
            }
            Err(e) => Err(LaunchError::System(format!("could not start the run: {e}"))),
        }
    }

    async fn tend(&self, free_slots: usize) {
        self.warm.tend(&self.cfg.confinement, free_slots).await;
    }

    fn ready(&self) -> usize {
        self.warm.ready()
    }

    async fn release_ready(&self) {
        self.warm.release().await;
    }

    /// When a sandboxed run ended because the sandbox itself could not be set up (it
    /// exits 1 after one `bwrap: …` or `setpriv: …` line, before the run printed
    /// anything), that line.
    fn setup_failure(
        &self,
        exit: crate::Exit,
        first: (Option<&str>, Option<&str>),
    ) -> Option<String> {
        let (stdout, stderr) = first;
        let line = stderr?.trim_end();
        (self.cfg.confinement.sandbox.isolates()
            && exit.code == Some(1)
            && stdout.is_none()
            && (line.starts_with("bwrap: ") || line.starts_with("setpriv: ")))
        .then(|| line.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real interpreter is probed once and then read from the cache; a cache made
    /// for another executable is not used.
    #[test]
    fn the_probe_is_kept_for_the_same_executable() {
        let Some(real) = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|p| !p.is_empty())
        else {
            eprintln!("SKIPPED: no python3");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("interpreter.json");
        let first = Interpreter::probe_cached(&real, &cache).unwrap();
        assert!(cache.exists(), "a real binary's probe is kept");
        // A kept answer is what the next start reads (marked here to tell them apart).
        let (key, mut kept): (String, Interpreter) =
            serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
        kept.version = "9.9.9".into();
        std::fs::write(&cache, serde_json::to_vec(&(&key, &kept)).unwrap()).unwrap();
        assert_eq!(
            Interpreter::probe_cached(&real, &cache).unwrap().version,
            "9.9.9"
        );
        // Kept for another executable (or an older file): probed again.
        std::fs::write(&cache, serde_json::to_vec(&("other", &kept)).unwrap()).unwrap();
        assert_eq!(
            Interpreter::probe_cached(&real, &cache).unwrap().version,
            first.version
        );
        // A script (a version manager's shim) is never kept.
        let shim = dir.path().join("python-shim");
        std::fs::write(&shim, format!("#!/bin/sh\nexec {real} \"$@\"\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        let shim_cache = dir.path().join("shim.json");
        Interpreter::probe_cached(shim.to_str().unwrap(), &shim_cache).unwrap();
        assert!(!shim_cache.exists());
    }
}
