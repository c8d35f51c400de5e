//! The composition of Stoa's parts: a server (the control plane) with its embedded
//! worker (the runtimes), as `stoa server` starts them.

use std::sync::Arc;

use stoa_config::Config;
use stoa_core::loops::WorkerStats;
use stoa_core::plane::ControlPlane;
use stoa_server::{EmbeddedWorker, ServerHandle};
use stoa_types::RunId;
use stoa_worker::{Runtimes, Worker};
use tokio::sync::watch;

/// The worker inside the server process: the same [`Worker`] a `stoa worker` agent
/// runs, over the in-process control plane.
#[derive(Default)]
struct Embedded {
    runtimes: Option<Runtimes>,
    worker: Option<Arc<Worker>>,
}

impl Embedded {
    fn worker(&self) -> &Arc<Worker> {
        self.worker
            .as_ref()
            .expect("the server attaches its worker before using it")
    }
}

#[async_trait::async_trait]
impl EmbeddedWorker for Embedded {
    fn prepare(&mut self, cfg: &mut Config) -> anyhow::Result<()> {
        self.runtimes = Some(stoa_worker::runtimes(cfg)?);
        Ok(())
    }

    fn attach(
        &mut self,
        plane: Arc<dyn ControlPlane>,
        config: Arc<Config>,
        stats: Arc<WorkerStats>,
    ) {
        let runtimes = self
            .runtimes
            .take()
            .expect("the server prepares its worker before attaching it");
        self.worker = Some(Arc::new(Worker::new(plane, config, runtimes, stats)));
    }

    fn kill_leftovers(&self, runs: &[(RunId, i64)]) -> std::io::Result<()> {
        self.worker().kill_leftovers(runs)
    }

    async fn run(&self, stopping: watch::Receiver<bool>, shutdown: watch::Receiver<bool>) {
        self.worker().clone().serve(stopping, shutdown).await
    }
}

/// Starts a server with its configuration; with `worker.enabled` (the default), its
/// embedded worker executes runs on this machine.
pub async fn start(cfg: Config) -> anyhow::Result<ServerHandle> {
    stoa_server::start(cfg, Some(Box::new(Embedded::default()))).await
}
