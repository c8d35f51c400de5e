//! Resource limits of sandboxed runs and builds through cgroups: one cgroup per run
//! under the server's own (`…/stoa-runs/<name>`), on cgroup v1 (memory, pids and cpu
//! hierarchies, as on these machines) or v2 (one unified hierarchy). The process joins
//! its cgroup before it executes (see [`crate::sandbox`]), so nothing it forks escapes.
//!
//! A process starts measurably slower in a memory cgroup made for it than in one that
//! served before, so cgroups are kept after a run (empty, and never after an OOM kill)
//! and given to the next run with the same limits: [`CgroupPool`].

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::sandbox::{owned_name, owner_gone};

/// Limits of one run, from its hardware profile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Memory in bytes (swap included); beyond it the kernel's OOM killer ends the run.
    pub memory_bytes: Option<u64>,
    /// Processes and threads at once.
    pub pids: Option<u64>,
    /// CPU time per second of wall time, in cores.
    pub cpus: Option<f64>,
    /// Bytes the run may write to its working directory (and to its `/tmp`).
    pub disk_bytes: Option<u64>,
}

const PARENT: &str = "stoa-runs";

/// Where run cgroups are made.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// cgroup v1: one directory per controller (`cpu` may be absent).
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: Option<PathBuf>,
    },
    /// cgroup v2: one directory with the memory, pids and cpu controllers enabled.
    V2 { base: PathBuf },
}

/// The directories of one cgroup (one per hierarchy, the memory one first).
#[derive(Debug)]
pub struct CgroupDirs {
    dirs: Vec<PathBuf>,
    v2: bool,
}

impl Cgroups {
    /// Finds this process's cgroups and makes the parent of run cgroups under them;
    /// `None` (with the reason) when cgroups cannot be used here (not root, read-only,
    /// controllers missing). Run cgroups left by an earlier server are removed.
    pub fn detect() -> Result<Cgroups, String> {
        let mounts = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let v1 = |ctl: &str| -> Option<PathBuf> {
            let (mount, root) = mount_of(&mounts, |fstype, opts| {
                fstype == "cgroup" && opts.split(',').any(|o| o == ctl)
            })?;
            let path = own.lines().find_map(|l| {
                let mut p = l.splitn(3, ':');
                let (_, ctls, path) = (p.next()?, p.next()?, p.next()?);
                ctls.split(',').any(|c| c == ctl).then(|| path.to_string())
            })?;
            Some(join_cgroup(&mount, &root, &path).join(PARENT))
        };
        let found = match (v1("memory"), v1("pids")) {
            (Some(memory), Some(pids)) => Cgroups::V1 {
                memory,
                pids,
                cpu: v1("cpu"),
            },
            _ => {
                let (mount, root) = mount_of(&mounts, |fstype, _| fstype == "cgroup2")
                    .ok_or("no cgroup v1 memory/pids hierarchy and no cgroup v2 mount")?;
                let path = own
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .ok_or("this process has no cgroup v2 path")?;
                let ours = join_cgroup(&mount, &root, path);
                enable_v2(&ours)?;
                Cgroups::V2 {
                    base: ours.join(PARENT),
                }
            }
        };
        for d in found.parents() {
            fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
            // Leftovers of an earlier server: their processes died with their
            // sandboxes, so their cgroups are empty and go now. Those of a live server
            // (its process id is in the name) stay, even empty ones about to be joined.
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.path().is_dir() && owner_gone(&e.file_name().to_string_lossy()) {
                        let _ = fs::remove_dir(e.path());
                    }
                }
            }
        }
        // Run cgroups must be makeable here (an existing parent may belong to root).
        for d in found.parents() {
            let probe = d.join(owned_name("probe"));
            fs::create_dir(&probe)
                .and_then(|_| fs::remove_dir(&probe))
                .map_err(|e| format!("making cgroups under {}: {e}", d.display()))?;
        }
        if let Cgroups::V2 { base } = &found {
            fs::write(base.join("cgroup.subtree_control"), "+memory +pids +cpu")
                .map_err(|e| format!("enabling controllers under {}: {e}", base.display()))?;
        }
        Ok(found)
    }

    fn parents(&self) -> Vec<PathBuf> {
        match self {
            Cgroups::V1 { memory, pids, cpu } => {
                let mut v = vec![memory.clone(), pids.clone()];
                v.extend(cpu.clone());
                v
            }
            Cgroups::V2 { base } => vec![base.clone()],
        }
    }

    /// Makes a new cgroup for `name` with `limits` set (its directory name is made
    /// unique: two servers on one machine may build the same environment at once).
    pub fn create(&self, name: &str, limits: &Limits) -> std::io::Result<CgroupDirs> {
        let unique = owned_name(name);
        let dirs: Vec<PathBuf> = self.parents().iter().map(|p| p.join(&unique)).collect();
        for d in &dirs {
            fs::create_dir(d)?;
        }
        let cg = CgroupDirs {
            v2: matches!(self, Cgroups::V2 { .. }),
            dirs,
        };
        let result = cg.set_limits(self, limits);
        if let Err(e) = result {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }
}

impl CgroupDirs {
    fn set_limits(&self, at: &Cgroups, l: &Limits) -> std::io::Result<()> {
        match at {
            Cgroups::V1 { cpu, .. } => {
                if let Some(m) = l.memory_bytes {
                    write(&self.dirs[0], "memory.limit_in_bytes", m)?;
                    // Swap counts too, where the kernel accounts it.
                    let sw = self.dirs[0].join("memory.memsw.limit_in_bytes");
                    if sw.exists() {
                        write(&self.dirs[0], "memory.memsw.limit_in_bytes", m)?;
                    }
                }
                if let Some(p) = l.pids {
                    write(&self.dirs[1], "pids.max", p)?;
                }
                if let (Some(c), Some(_)) = (l.cpus, cpu) {
                    write(&self.dirs[2], "cpu.cfs_period_us", 100_000)?;
                    write(&self.dirs[2], "cpu.cfs_quota_us", (c * 100_000.0) as u64)?;
                }
            }
            Cgroups::V2 { .. } => {
                let d = &self.dirs[0];
                if let Some(m) = l.memory_bytes {
                    write(d, "memory.max", m)?;
                    write(d, "memory.swap.max", 0)?;
                }
                if let Some(p) = l.pids {
                    write(d, "pids.max", p)?;
                }
                if let Some(c) = l.cpus {
                    fs::write(
                        d.join("cpu.max"),
                        format!("{} 100000", (c * 100_000.0) as u64),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files, open for writing, for the child to join before it
    /// executes (writing `0` moves the writer).
    pub fn procs_files(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| {
                OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
                    .map(OwnedFd::from)
            })
            .collect()
    }

    /// True when the kernel's OOM killer ended a process of this cgroup.
    pub fn oom_killed(&self) -> bool {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        fs::read_to_string(self.dirs[0].join(file))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .is_some_and(|n| n > 0)
    }

    /// True when no process is left in the cgroup.
    pub fn is_empty(&self) -> bool {
        self.dirs
            .iter()
            .all(|d| fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|s| s.trim().is_empty()))
    }

    /// SIGKILLs every process in the cgroup.
    pub fn kill_all(&self) {
        for d in &self.dirs {
            kill_procs(d);
        }
    }

    /// Kills whatever is left in the cgroup and removes it.
    pub fn remove(&self) {
        for _ in 0..100 {
            self.kill_all();
            if self.dirs.iter().all(|d| match fs::remove_dir(d) {
                Ok(()) => true,
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            }) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        tracing::warn!(cgroup = %self.dirs[0].display(), "a run's cgroup could not be removed");
    }
}

impl Drop for CgroupDirs {
    fn drop(&mut self) {
        self.remove();
    }
}

fn write(dir: &Path, file: &str, v: u64) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(dir.join(file))?;
    f.write_all(v.to_string().as_bytes())
}

/// SIGKILLs every process listed in a cgroup.
fn kill_procs(dir: &Path) {
    if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in s.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The mount point and root of the first mount in `mountinfo` whose file system type
/// and super options satisfy `want`.
fn mount_of(mountinfo: &str, want: impl Fn(&str, &str) -> bool) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        let (fstype, opts) = (post.next()?, post.nth(1).unwrap_or(""));
        let f: Vec<&str> = pre.split_whitespace().collect();
        (want(fstype, opts) && f.len() > 4).then(|| (PathBuf::from(f[4]), f[3].to_string()))
    })
}

/// The directory of cgroup `path` in a hierarchy mounted at `mount` whose root is `root`.
fn join_cgroup(mount: &Path, root: &str, path: &str) -> PathBuf {
    let rel = path.strip_prefix(root).unwrap_or(path);
    mount.join(rel.trim_start_matches('/'))
}

/// Makes the memory, pids and cpu controllers available to children of `ours`. A v2
/// cgroup with processes cannot hand controllers down, so this server moves itself into
/// a leaf `server` first (what a delegated systemd service does).
fn enable_v2(ours: &Path) -> Result<(), String> {
    let want = "+memory +pids +cpu";
    if fs::write(ours.join("cgroup.subtree_control"), want).is_ok() {
        return Ok(());
    }
    let leaf = ours.join("server");
    fs::create_dir_all(&leaf).map_err(|e| format!("creating {}: {e}", leaf.display()))?;
    let procs = fs::read_to_string(ours.join("cgroup.procs")).map_err(|e| e.to_string())?;
    for pid in procs.lines() {
        let _ = fs::write(leaf.join("cgroup.procs"), pid);
    }
    fs::write(ours.join("cgroup.subtree_control"), want).map_err(|e| {
        format!(
            "enabling cgroup v2 controllers under {}: {e}",
            ours.display()
        )
    })
}

/// Cgroups kept for reuse, by limits (see the module doc).
#[derive(Debug)]
pub struct CgroupPool {
    at: Cgroups,
    spare: std::sync::Mutex<Vec<(Limits, CgroupDirs)>>,
}

/// Spare cgroups kept per set of limits.
const SPARES_PER_LIMITS: usize = 8;

impl CgroupPool {
    /// A pool making its cgroups at `at`.
    pub fn new(at: Cgroups) -> std::sync::Arc<Self> {
        std::sync::Arc::new(CgroupPool {
            at,
            spare: Default::default(),
        })
    }

    /// A cgroup with `limits` for `name`: a spare one, else a new one.
    pub fn take(
        self: &std::sync::Arc<Self>,
        name: &str,
        limits: &Limits,
    ) -> std::io::Result<RunCgroup> {
        let spare = {
            let mut s = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            s.iter()
                .position(|(l, _)| l == limits)
                .map(|i| s.swap_remove(i).1)
        };
        let dirs = match spare {
            Some(d) => d,
            None => self.at.create(name, limits)?,
        };
        Ok(RunCgroup {
            dirs: Some(dirs),
            limits: limits.clone(),
            pool: self.clone(),
        })
    }
}

/// One run's cgroup. Dropping it hands it back to its pool when it is empty and saw no
/// OOM kill (the counter cannot be reset), else kills what is left and removes it.
#[derive(Debug)]
pub struct RunCgroup {
    dirs: Option<CgroupDirs>,
    limits: Limits,
    pool: std::sync::Arc<CgroupPool>,
}

impl RunCgroup {
    fn dirs(&self) -> &CgroupDirs {
        self.dirs.as_ref().expect("present until dropped")
    }

    /// See [`CgroupDirs::procs_files`].
    pub fn procs_files(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.dirs().procs_files()
    }

    /// See [`CgroupDirs::oom_killed`].
    pub fn oom_killed(&self) -> bool {
        self.dirs().oom_killed()
    }

    /// See [`CgroupDirs::is_empty`].
    pub fn is_empty(&self) -> bool {
        self.dirs().is_empty()
    }

    /// See [`CgroupDirs::kill_all`].
    pub fn kill_all(&self) {
        self.dirs().kill_all()
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        let Some(dirs) = self.dirs.take() else { return };
        if dirs.is_empty() && !dirs.oom_killed() {
            let mut spare = self.pool.spare.lock().unwrap_or_else(|p| p.into_inner());
            if spare.iter().filter(|(l, _)| *l == self.limits).count() < SPARES_PER_LIMITS {
                spare.push((self.limits.clone(), dirs));
                return;
            }
        }
        drop(dirs);
    }
}
