//! The networks of image and compose runs: one per run, recycled.
//!
//! Every pool network is in the books before the engine is asked to create it, and is
//! in exactly one state: being made, spare, or given to one run. Taking one moves it
//! from spare to taken under one lock, so no network is ever given to two runs. Spares
//! are made ahead while the pool holds fewer than `docker.network_pool` networks in
//! all; a run that finds no spare gets a new one on the spot. When a
//! run ends (whatever way: a [`NetworkLease`] gives it back when dropped), its network
//! returns to the spares once the engine confirms that no container is attached to it,
//! so runs back to back create no network at all. Spares beyond `docker.network_pool`
//! go after `docker.network_idle_s` without use. The reconciler removes only labelled
//! networks that are in none of these states and that are not young, and takes back
//! networks given to runs that are gone (for example when the engine was unreachable
//! as the run ended).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::NetworkCreateRequest;

use crate::RuntimeError;
use crate::docker::{DockerRuntime, INSTANCE_LABEL, POOL_LABEL, engine_error, is_not_found};

/// A pool network the engine knows but the books do not is left alone this long after
/// its creation, when this server made it (a take or refill may be about to register
/// it). Networks made before this server started belong to no one.
const YOUNG: Duration = Duration::from_secs(60);

/// The books of the pool.
#[derive(Debug, Default)]
pub(crate) struct NetPool {
    /// The server is shutting down: no network is made or kept any more.
    closed: bool,
    /// Ready for the next run, oldest first, with when each became spare.
    spare: Vec<(String, Instant)>,
    /// Given to a run: network → run id.
    taken: HashMap<String, String>,
    /// Being made for the spares.
    making: HashSet<String>,
}

impl NetPool {
    /// Whether `name` is given to run `run` (and not, since, to another).
    fn given_to(&self, name: &str, run: &str) -> bool {
        self.taken.get(name).is_some_and(|r| r == run)
    }

    /// Forgets that `name` is given to `run`; true when it was.
    fn give_up(&mut self, name: &str, run: &str) -> bool {
        let was = self.given_to(name, run);
        if was {
            self.taken.remove(name);
        }
        was
    }
}

/// What the pool holds now (for metrics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    pub spare: usize,
    pub taken: usize,
    pub making: usize,
}

/// A run's network. Dropping it gives the network back to the pool (in the
/// background, once no container is attached to it).
pub struct NetworkLease {
    runtime: Arc<DockerRuntime>,
    docker: Docker,
    name: String,
    /// The run it was given to.
    run: String,
}

impl NetworkLease {
    /// The network's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gives the network back now when the pool keeps no idle spares
    /// (`docker.network_idle_s = 0`: a network beyond the pool is removed, and the run's
    /// end waits for that, as before recycling); else in the background, as a drop does.
    pub(crate) async fn give_back(mut self) {
        if self.name.is_empty() || self.runtime.config().network_idle_s > 0 {
            return;
        }
        let name = std::mem::take(&mut self.name);
        let run = std::mem::take(&mut self.run);
        self.runtime.take_back(&self.docker, &name, &run).await;
    }

    /// The engine no longer has this network: it leaves the books, nothing is given back.
    pub(crate) fn lost(mut self) {
        self.runtime.pool().give_up(&self.name, &self.run);
        self.name.clear();
    }
}

impl Drop for NetworkLease {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let name = std::mem::take(&mut self.name);
        let run = std::mem::take(&mut self.run);
        let rt = self.runtime.clone();
        let c = self.docker.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if rt.take_back(&c, &name, &run).await {
                    // More spares than the pool size go once demand has passed.
                    tokio::time::sleep(rt.network_idle() + Duration::from_millis(100)).await;
                    rt.trim_spares().await;
                }
            });
        }
    }
}

impl DockerRuntime {
    pub(crate) fn pool(&self) -> MutexGuard<'_, NetPool> {
        self.nets.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn network_idle(&self) -> Duration {
        Duration::from_secs(self.config().network_idle_s)
    }

    /// What the pool holds now.
    pub fn pool_counts(&self) -> PoolCounts {
        let p = self.pool();
        PoolCounts {
            spare: p.spare.len(),
            taken: p.taken.len(),
            making: p.making.len(),
        }
    }

    /// A new, unique network name of this installation.
    fn network_name(&self) -> String {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let short: String = self.config().instance.chars().take(8).collect();
        format!("stoa-net-{short}-{nanos:x}-{n}")
    }

    /// Asks the engine for the network `name`, which is already in the books.
    async fn make_network(&self, c: &Docker, name: &str) -> Result<(), RuntimeError> {
        c.create_network(NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            options: Some(crate::docker::bridge_options(name)),
            labels: Some(HashMap::from([
                (POOL_LABEL.to_string(), "1".to_string()),
                (INSTANCE_LABEL.to_string(), self.config().instance.clone()),
            ])),
            ..Default::default()
        })
        .await
        .map_err(engine_error)?;
        Ok(())
    }

    /// A network for run `run_id`: a spare one when there is one (unless `fresh`),
    /// else a new one.
    pub(crate) async fn take_network(
        self: &Arc<Self>,
        c: &Docker,
        run_id: &str,
        fresh: bool,
    ) -> Result<NetworkLease, RuntimeError> {
        let (name, spare) = {
            let mut p = self.pool();
            let spare = if fresh { None } else { p.spare.pop() };
            let name = match &spare {
                Some((n, _)) => n.clone(),
                None => self.network_name(),
            };
            p.taken.insert(name.clone(), run_id.to_string());
            (name, spare.is_some())
        };
        let lease = NetworkLease {
            runtime: self.clone(),
            docker: c.clone(),
            name,
            run: run_id.to_string(),
        };
        // A spare network exists unless something outside Stoa removed it, which the
        // start reports (and the launch retries with a fresh one).
        if !spare && let Err(e) = self.make_network(c, &lease.name).await {
            lease.lost();
            return Err(e);
        }
        let me = self.clone();
        tokio::spawn(async move { me.refill().await });
        Ok(lease)
    }

    /// Whether the engine knows network `name`.
    pub(crate) async fn network_exists(
        &self,
        c: &Docker,
        name: &str,
    ) -> Result<bool, RuntimeError> {
        match c
            .inspect_network(
                name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(engine_error(e)),
        }
    }

    /// Makes spare networks until the pool holds `docker.network_pool` networks,
    /// counting those given to runs: they come back when their run ends, so runs back
    /// to back make no network (and no engine work beside the run's own).
    pub async fn refill(&self) {
        let Ok(_one) = self.refilling.try_lock() else {
            return;
        };
        let Ok(c) = self.client().await else { return };
        loop {
            let name = {
                let mut p = self.pool();
                if p.closed
                    || p.spare.len() + p.making.len() + p.taken.len() >= self.config().network_pool
                {
                    return;
                }
                let name = self.network_name();
                p.making.insert(name.clone());
                name
            };
            let made = self.make_network(c, &name).await;
            let closed = {
                let mut p = self.pool();
                p.making.remove(&name);
                if made.is_ok() && !p.closed {
                    p.spare.push((name.clone(), Instant::now()));
                }
                p.closed
            };
            match made {
                // Made as the server began to shut down: not kept.
                Ok(()) if closed => {
                    let _ = c.remove_network(&name).await;
                    return;
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "making a spare network failed");
                    return;
                }
            }
        }
    }

    /// Takes back the network `name` given to run `run`, once no container is
    /// attached to it: it becomes spare again. While containers are attached or the
    /// engine does not answer, it stays the run's (the reconciler tries again once the
    /// run is gone). Nothing happens when it is no longer that run's (taken back
    /// meanwhile, maybe given to another run). True when it became spare.
    pub(crate) async fn take_back(&self, c: &Docker, name: &str, run: &str) -> bool {
        if !self.pool().given_to(name, run) {
            return false;
        }
        let attached = match c
            .inspect_network(
                name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            Ok(i) => i.containers.is_some_and(|m| !m.is_empty()),
            Err(e) if is_not_found(&e) => {
                self.pool().give_up(name, run);
                return false;
            }
            Err(_) => return false,
        };
        if attached {
            return false;
        }
        // Not kept when the pool closed, or when it is full and spares are not kept idle.
        let keep = {
            let mut p = self.pool();
            if !p.give_up(name, run) {
                return false;
            }
            let full = p.spare.len() >= self.config().network_pool;
            let drop_now = p.closed || (full && self.config().network_idle_s == 0);
            let keep = !drop_now;
            if keep {
                p.spare.push((name.to_string(), Instant::now()));
            }
            keep
        };
        if !keep {
            let _ = c.remove_network(name).await;
        }
        keep
    }

    /// Removes spare networks beyond the pool size that were not used for
    /// `docker.network_idle_s`, oldest first.
    pub async fn trim_spares(&self) {
        let Ok(c) = self.client().await else { return };
        let idle = self.network_idle();
        let extra: Vec<String> = {
            let mut p = self.pool();
            let over = p.spare.len().saturating_sub(self.config().network_pool);
            let now = Instant::now();
            let mut out = Vec::new();
            p.spare.retain(|(name, since)| {
                let go = out.len() < over && now.duration_since(*since) >= idle;
                if go {
                    out.push(name.clone());
                }
                !go
            });
            out
        };
        futures::future::join_all(extra.iter().map(|n| c.remove_network(n))).await;
    }

    /// At shutdown: from now on no network is made or kept; removes the spares, and
    /// waits (5 s at most) for networks still being given back or made, which are
    /// removed too.
    pub async fn remove_spares(&self) {
        self.pool().closed = true;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (spare, busy) = {
                let mut p = self.pool();
                let busy = !p.taken.is_empty() || !p.making.is_empty();
                (std::mem::take(&mut p.spare), busy)
            };
            if let Ok(c) = self.client().await {
                futures::future::join_all(spare.iter().map(|(n, _)| c.remove_network(n))).await;
            }
            if !busy || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The reconciler's part for pool networks: takes back networks of runs that are
    /// gone, trims idle spares, and removes labelled pool networks that are in no
    /// state of the books, not young and unused. Returns how many were removed.
    pub(crate) async fn reconcile_pool(
        &self,
        c: &Docker,
        live: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Result<usize, RuntimeError> {
        let orphaned: Vec<(String, String)> = self
            .pool()
            .taken
            .iter()
            .filter(|(_, run)| !live(run))
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
        for (n, run) in orphaned {
            if self.take_back(c, &n, &run).await {
                tracing::info!(network = %n, "reconciler took back the network of a run that is gone");
            }
        }
        self.trim_spares().await;
        let filter = HashMap::from([(
            "label",
            vec![
                POOL_LABEL.to_string(),
                format!("{INSTANCE_LABEL}={}", self.config().instance),
            ],
        )]);
        let networks = c
            .list_networks(Some(
                bollard::query_parameters::ListNetworksOptionsBuilder::default()
                    .filters(&filter)
                    .build(),
            ))
            .await
            .map_err(engine_error)?;
        let known = |name: &str| {
            let p = self.pool();
            p.taken.contains_key(name)
                || p.making.contains(name)
                || p.spare.iter().any(|(n, _)| n == name)
        };
        let strays: Vec<String> = networks
            .into_iter()
            .filter(|n| !is_young(n.created.as_deref(), self.started))
            .filter_map(|n| n.name)
            .filter(|name| !known(name))
            .collect();
        let removals = strays.iter().map(|name| async move {
            let in_use = c
                .inspect_network(
                    name,
                    None::<bollard::query_parameters::InspectNetworkOptions>,
                )
                .await
                .map(|i| i.containers.is_some_and(|m| !m.is_empty()))
                .unwrap_or(true);
            // Registered meanwhile (a take or refill that began after the listing).
            if in_use || known(name) {
                return false;
            }
            let ok = c.remove_network(name).await.is_ok();
            if ok {
                tracing::info!(network = %name, "reconciler removed an unused network");
            }
            ok
        });
        Ok(futures::future::join_all(removals)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count())
    }
}

/// True when a network was created (engine's time) after `started` and less than
/// [`YOUNG`] ago.
fn is_young(created: Option<&str>, started: chrono::DateTime<chrono::Utc>) -> bool {
    let Some(at) = created.and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok()) else {
        return false;
    };
    if at < started {
        return false;
    }
    let age = chrono::Utc::now().signed_duration_since(at);
    age.to_std().map(|a| a < YOUNG).unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_is_given_back_only_by_the_run_it_was_given_to() {
        let mut p = NetPool::default();
        p.taken.insert("n1".into(), "run-a".into());
        // A late give-back of an earlier holder never frees the current one's network.
        assert!(!p.give_up("n1", "run-b"));
        assert!(p.given_to("n1", "run-a"));
        assert!(p.give_up("n1", "run-a"));
        assert!(!p.give_up("n1", "run-a"));
        assert!(p.taken.is_empty());
    }

    #[test]
    fn young_networks() {
        let now = chrono::Utc::now();
        let started = now - chrono::Duration::seconds(600);
        let fmt = |t: chrono::DateTime<chrono::Utc>| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        };
        assert!(is_young(Some(&fmt(now)), started));
        assert!(is_young(
            Some(&fmt(now + chrono::Duration::seconds(5))),
            started
        ));
        assert!(!is_young(
            Some(&fmt(now - chrono::Duration::seconds(120))),
            started
        ));
        assert!(!is_young(None, started));
        assert!(!is_young(Some("0001-01-01T00:00:00Z"), started));
        // Made by an earlier server process: nobody is about to register it.
        assert!(!is_young(
            Some(&fmt(now)),
            now + chrono::Duration::seconds(1)
        ));
    }
}
