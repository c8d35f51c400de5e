//! Python runs inside a container image (per hardware profile, e.g. a CUDA image on GPU
//! machines) instead of the bubblewrap sandbox. Environments are built inside the
//! image, cached on the worker per image and requirement set, and mounted read-only
//! into each run; the run's working directory is the only writable mount.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use stoa_core::PythonRunSpec;
use stoa_core::requirements::{self, Requirement};

use crate::RuntimeError;
use crate::docker::{DockerRuntime, ImageJob, Resources};
use crate::launch::{
    LaunchContext, LaunchError, LaunchRequest, Launched, Runtime, settle_env, warnings,
};
use crate::python::{PythonJob, make_workdir, python_args, python_job, run_env};

use crate::python::READY_MARKER;

/// Python in containers.
pub struct ContainerPython {
    docker: Arc<DockerRuntime>,
    /// Root of the environment cache (`DATA_DIR/envs-image`).
    env_root: PathBuf,
    /// Variables copied into environment builds (CA bundles, index settings).
    pass_env: Vec<(String, String)>,
    /// Longest an environment build may take, all its steps together.
    build_timeout: std::time::Duration,
    building: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Standard-library names, left out of requirement lists.
    stdlib: BTreeSet<String>,
}

impl ContainerPython {
    /// Python runs in `docker`, environments cached under `env_root`.
    pub fn new(
        docker: Arc<DockerRuntime>,
        env_root: PathBuf,
        pass_env: Vec<(String, String)>,
        build_timeout: std::time::Duration,
    ) -> Self {
        crate::python::sweep_builds(&env_root);
        ContainerPython {
            docker,
            env_root,
            pass_env,
            build_timeout,
            building: Mutex::new(HashMap::new()),
            stdlib: BTreeSet::new(),
        }
    }

    /// Leaves these standard-library names out of requirement lists (the host
    /// interpreter's `sys.stdlib_module_names`).
    pub fn with_stdlib(mut self, stdlib: BTreeSet<String>) -> Self {
        self.stdlib = stdlib;
        self
    }

    /// Where the environment for `image` and `reqs` lives.
    pub fn env_dir(&self, image: &str, reqs: &[Requirement]) -> PathBuf {
        self.env_root.join(requirements::env_key(reqs, image))
    }

    /// True when that environment is built.
    pub fn env_cached(&self, image: &str, reqs: &[Requirement]) -> bool {
        self.env_dir(image, reqs).join(READY_MARKER).exists()
    }

    /// A build step: only the environment being built is mounted (writable, at its
    /// final path), never the rest of the cache, so one org's build cannot touch
    /// another's environment.
    fn tool_job(
        &self,
        run_id: &str,
        image: &str,
        build: &Path,
        dir: &Path,
        cmd: Vec<String>,
    ) -> ImageJob {
        ImageJob {
            run_id: format!("{run_id}-env"),
            image: image.to_string(),
            cmd: Some(cmd),
            env: self.pass_env.clone(),
            auth: None,
            resources: Resources::default(),
            binds: vec![format!("{}:{}", build.display(), dir.display())],
            workdir: Some("/tmp".into()),
        }
    }

    async fn tool(
        &self,
        run_id: &str,
        image: &str,
        (build, dir, deadline): (&Path, &Path, tokio::time::Instant),
        cmd: Vec<String>,
    ) -> Result<(), String> {
        match self
            .docker
            .run_to_end(&self.tool_job(run_id, image, build, dir, cmd), deadline)
            .await
        {
            Ok((exit, _)) if exit.code == Some(0) => Ok(()),
            Ok((_, out)) => Err(out),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Builds the environment inside `image` when it is not cached: a venv, then the
    /// requirements together, else one by one (unpinned failures are warned about,
    /// pinned ones fail the run).
    pub async fn prepare_env(
        &self,
        run_id: &str,
        image: &str,
        reqs: &[Requirement],
        warn: &(dyn Fn(String) + Send + Sync),
    ) -> Result<PathBuf, RuntimeError> {
        let dir = self.env_dir(image, reqs);
        if dir.join(READY_MARKER).exists() {
            return Ok(dir);
        }
        let lock = self
            .building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(dir.clone())
            .or_default()
            .clone();
        let _g = lock.lock().await;
        if dir.join(READY_MARKER).exists() {
            return Ok(dir);
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| RuntimeError::io("removing a half-built environment", e))?;
        }
        // Built in a directory of its own, published by one rename once complete.
        let build = crate::python::build_dir(&self.env_root, &dir)?;
        // Removed however the build ends (failed, or dropped by an abort), unless published.
        let mut leftovers = crate::python::Leftovers(vec![build.clone()]);
        let deadline = tokio::time::Instant::now() + self.build_timeout;
        self.build(run_id, image, reqs, warn, (&build, &dir, deadline))
            .await?;
        crate::python::publish(&build, Some(&dir), None)?;
        leftovers.0.clear();
        Ok(dir)
    }

    async fn build(
        &self,
        run_id: &str,
        image: &str,
        reqs: &[Requirement],
        warn: &(dyn Fn(String) + Send + Sync),
        at: (&Path, &Path, tokio::time::Instant),
    ) -> Result<(), RuntimeError> {
        let d = at.1.display().to_string();
        self.tool(
            run_id,
            image,
            at,
            vec!["python3".into(), "-m".into(), "venv".into(), d.clone()],
        )
        .await
        .map_err(|e| {
            RuntimeError::System(format!(
                "could not create a virtual environment in {image}: {}",
                e.trim()
            ))
        })?;
        let pip = |lines: &[&Requirement]| {
            let mut c = vec![
                format!("{d}/bin/python"),
                "-m".into(),
                "pip".into(),
                "install".into(),
                "-q".into(),
                "--disable-pip-version-check".into(),
                "--".into(),
            ];
            c.extend(lines.iter().map(|r| r.line.clone()));
            c
        };
        if !reqs.is_empty()
            && self
                .tool(run_id, image, at, pip(&reqs.iter().collect::<Vec<_>>()))
                .await
                .is_err()
        {
            if tokio::time::Instant::now() >= at.2 {
                return Err(RuntimeError::Requirements(format!(
                    "the environment build did not finish within {} s",
                    self.build_timeout.as_secs()
                )));
            }
            for r in reqs {
                if let Err(e) = self.tool(run_id, image, at, pip(&[r])).await {
                    if r.strict {
                        return Err(RuntimeError::Requirements(format!(
                            "could not install requirement '{}': {}",
                            r.line,
                            e.trim()
                        )));
                    }
                    warn(format!(
                        "[stoa] skipped requirement '{}': it could not be installed\n",
                        r.line
                    ));
                }
            }
        }
        Ok(())
    }

    /// The container job of a run: the working directory and environment mounted at
    /// their own paths, the code run by the environment's interpreter.
    pub fn run_job(
        &self,
        job: &PythonJob,
        image: &str,
        env_dir: &Path,
        resources: Resources,
    ) -> ImageJob {
        let wd = job.workdir.display().to_string();
        let env = env_dir.display().to_string();
        let mut cmd = vec![format!("{env}/bin/python")];
        cmd.extend(python_args(job));
        let mut vars = run_env(job, env_dir);
        vars.extend(job.env.iter().cloned());
        let mut binds = vec![format!("{wd}:{wd}"), format!("{env}:{env}:ro")];
        if let Some((host, inside)) = &job.storage {
            binds.push(format!("{}:{}", host.display(), inside.display()));
            vars.push(("STOA_STORAGE".into(), inside.display().to_string()));
        }
        ImageJob {
            run_id: job.run_id.clone(),
            image: image.to_string(),
            cmd: Some(cmd),
            env: vars,
            auth: None,
            resources,
            binds,
            workdir: Some(wd),
        }
    }
}

/// Python runs of a profile with a `python_image`: the environment built in the image,
/// the run in a container of it.
#[async_trait::async_trait]
impl Runtime for ContainerPython {
    async fn launch(
        &self,
        run: &LaunchRequest<'_>,
        ctx: &dyn LaunchContext,
    ) -> Result<Launched, LaunchError> {
        let spec: PythonRunSpec = run.spec()?;
        let Some(image) = run.python_image else {
            return Err(LaunchError::System(
                "the run's profile has no python_image".into(),
            ));
        };
        make_workdir(run)?;
        let reqs = requirements::clean(
            spec.requirements.as_deref().unwrap_or(""),
            &self.stdlib,
            &spec.local_module_names(),
        );
        let progress = |r: String| ctx.waiting(r);
        let pulled = tokio::select! {
            r = self.docker.pull(image, None, &progress) => r,
            _ = ctx.interrupted() => return Err(LaunchError::Interrupted),
        };
        match pulled {
            Ok(()) => {}
            Err(RuntimeError::Image(msg)) => {
                return Err(LaunchError::System(format!(
                    "the profile's Python image is not available: {msg}"
                )));
            }
            Err(e) => return Err(LaunchError::System(e.to_string())),
        }
        if !self.env_cached(image, &reqs) {
            ctx.waiting("building Python environment".into());
        }
        let warnings = warnings();
        let warn = |w: String| warnings.lock().unwrap_or_else(|p| p.into_inner()).push(w);
        let build = self.prepare_env(run.run_id, image, &reqs, &warn);
        let env_dir = settle_env(ctx, &warnings, build).await?;
        ctx.environment_ready().await?;
        let timeout_s = spec.run.timeout;
        let job = python_job(run, spec, reqs, ctx.org_storage()?);
        crate::python::write_files(&job, &job.workdir)
            .map_err(|e| LaunchError::System(e.to_string()))?;
        let container = self.run_job(&job, image, &env_dir, run.resources.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        match self.docker.launch(&container, tx).await {
            Ok(e) => Ok(Launched {
                exec: Box::new(e),
                output: rx,
                timeout_s,
                measure: None,
                cpu_before_s: 0.0,
                ports: None,
            }),
            Err(e) => Err(LaunchError::System(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::DockerConfig;

    /// One org's build must not see another's environment: a build step mounts only the
    /// directory being built (at its final path), never the cache around it.
    #[test]
    fn a_build_step_mounts_only_its_own_environment() {
        let docker = Arc::new(DockerRuntime::new(DockerConfig {
            host: None,
            network: true,
            default_pids_limit: 64,
            instance: "test".into(),
            network_pool: 0,
            network_idle_s: 10,
            allowed_registries: vec![],
            allowed_destinations: vec![],
        }));
        let root = PathBuf::from("/data/envs-image");
        let cp = ContainerPython::new(
            docker,
            root.clone(),
            vec![],
            std::time::Duration::from_secs(60),
        );
        let dir = cp.env_dir("local/hostpython:3.11", &[]);
        let build = root.join(".build-x");
        let job = cp.tool_job(
            "r1",
            "local/hostpython:3.11",
            &build,
            &dir,
            vec!["true".into()],
        );
        assert_eq!(
            job.binds,
            vec![format!("{}:{}", build.display(), dir.display())]
        );
        assert!(
            job.binds
                .iter()
                .all(|b| !b.starts_with(&format!("{}:", root.display())))
        );
        assert_eq!(job.workdir.as_deref(), Some("/tmp"));
    }
}
