//! The sandbox of Python runs and of environment builds (both untrusted code).
//!
//! With bubblewrap each sandboxed process gets: a minimal read-only view of the host
//! (`/usr` and its links, the interpreter, the environment, a few files of `/etc`, a
//! synthetic `/etc/passwd`), its working directory writable, a private size-limited
//! `/tmp`, private PID/IPC/UTS/cgroup namespaces and `/proc`, a minimal `/dev`, no
//! network unless asked, a new session (no terminal to inject into), and the seccomp
//! filters of [`crate::seccomp`]. When the server runs as root the process then drops
//! to the unprivileged sandbox uid with `setpriv` (no capabilities, bounding set empty,
//! no new privileges); when it does not, bubblewrap's unprivileged user namespace maps
//! the run to the server's own uid without capabilities. Either way it joins its
//! cgroup (memory, pids, CPU) and gets rlimits (file size, core dumps) before it
//! executes, so nothing it forks escapes them.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::process::Command;

use crate::RuntimeError;
use crate::cgroup::{CgroupPool, Limits, RunCgroup};

/// How processes are isolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sandbox {
    /// bubblewrap at this path.
    Bubblewrap(PathBuf),
    /// A plain process group with a cleared environment.
    None,
}

impl Sandbox {
    /// True with bubblewrap: processes get their own mounts and namespaces.
    pub fn isolates(&self) -> bool {
        matches!(self, Sandbox::Bubblewrap(_))
    }

    /// Finds a working bubblewrap on PATH (it must be able to create a sandbox here).
    pub fn detect() -> Sandbox {
        let Some(path) = crate::python::find_on_path("bwrap") else {
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

/// The unprivileged identity sandboxed processes take when the server is root.
#[derive(Debug, Clone)]
pub struct DropTo {
    pub uid: u32,
    pub gid: u32,
    /// util-linux `setpriv`, which makes the switch inside the sandbox.
    pub setpriv: PathBuf,
}

/// Everything that is the same for every sandboxed process of this worker.
#[derive(Debug, Clone)]
pub struct Confinement {
    pub sandbox: Sandbox,
    /// Set when the server runs as root: runs drop to this uid.
    pub drop_to: Option<DropTo>,
    /// Raw BPF programs, installed in order.
    pub seccomp: Arc<Vec<Vec<u8>>>,
    /// Where run cgroups come from; `None` when cgroups cannot be used here.
    pub cgroups: Option<Arc<CgroupPool>>,
    /// Read-only paths every sandbox sees besides `/usr` (the interpreter's prefix…).
    pub ro_paths: Vec<PathBuf>,
    /// The sandbox's `/etc` (see [`write_etc`]).
    pub etc_dir: PathBuf,
    /// The outbound filter of sandboxed processes with network, kept installed;
    /// `None` when it could not be installed at start (the server warned).
    pub egress: Option<crate::egress::EgressPolicy>,
}

/// What of the host's `/etc` a sandbox sees: name resolution, TLS roots, the dynamic
/// linker's cache, time zone, MIME types; never `shadow`, never the host's users. The
/// files are copied (links kept as links) into the sandbox's own `/etc` at start, which
/// is one mount; see [`ETC_LIVE`] for what is mounted from the host instead.
const ETC_COPIED: &[&str] = &[
    "host.conf",
    "nsswitch.conf",
    "gai.conf",
    "localtime",
    "timezone",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "mime.types",
    "protocols",
    "services",
    "os-release",
    "debian_version",
];

/// Parts of `/etc` mounted from the host (read-only), because they are large or change
/// while the server runs.
const ETC_LIVE: &[&str] = &["ssl", "ca-certificates", "pki", "resolv.conf", "hosts"];

/// One sandboxed process.
#[derive(Debug, Clone, Default)]
pub struct Jail {
    /// Name of its cgroup (unique among live sandboxes).
    pub name: String,
    /// Executable and arguments, as seen inside.
    pub argv: Vec<OsString>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory (also bound writable, unless it is the private `/tmp`).
    pub cwd: PathBuf,
    /// Further writable directories, at the same path inside.
    pub rw: Vec<PathBuf>,
    /// Host directory bound writable at another path inside: (host, inside).
    pub rw_at: Vec<(PathBuf, PathBuf)>,
    /// Further read-only paths.
    pub ro: Vec<PathBuf>,
    /// Devices passed through (GPUs).
    pub devices: Vec<PathBuf>,
    pub network: bool,
    pub limits: Limits,
}

impl Jail {
    /// The working directory when it is a host directory to bind.
    fn own_cwd(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.cwd).filter(|c| c.as_path() != Path::new("/tmp"))
    }
}

/// A sandboxed command ready to spawn ([`crate::spawn::spawn`], or as a command that
/// forks: [`Prepared::forking`]), with what the child sets up before it executes: the
/// cgroup it joins, the seccomp programs at fds 3, 4, … (for bubblewrap), its rlimits
/// and scheduling policy.
pub struct Prepared {
    /// The program, its arguments, its whole environment and working directory.
    pub command: Command,
    pub cgroup: Option<RunCgroup>,
    pub(crate) seccomp: Vec<OwnedFd>,
    /// `cgroup.procs` of the cgroup (opened for writing).
    pub(crate) procs: Vec<OwnedFd>,
    pub(crate) rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// Runs only when the CPU is otherwise idle (`SCHED_IDLE`), from before it executes.
    pub idle: bool,
}

impl Prepared {
    /// `command` as it is, with nothing to set up but its process group.
    pub fn plain(command: Command) -> Prepared {
        Prepared {
            command,
            cgroup: None,
            seccomp: Vec::new(),
            procs: Vec::new(),
            rlimits: Vec::new(),
            idle: false,
        }
    }

    /// As a command that forks and sets its child up before executing it (for a step
    /// run once, whose output is read at the end). The cgroup is left here.
    pub fn forking(&mut self) -> Command {
        let mut cmd = std::mem::replace(&mut self.command, Command::new("/"));
        child::setup(
            &mut cmd,
            std::mem::take(&mut self.seccomp),
            std::mem::take(&mut self.procs),
            std::mem::take(&mut self.rlimits),
        );
        if self.idle {
            child::sched_idle(&mut cmd);
        }
        cmd
    }
}

impl Confinement {
    /// True when a run's files must belong to the sandbox uid.
    pub fn owner(&self) -> Option<(u32, u32)> {
        self.drop_to.as_ref().map(|d| (d.uid, d.gid))
    }

    /// Hands `dir` (recursively) to the sandbox uid, so the run can write there.
    pub fn give(&self, dir: &Path) -> std::io::Result<()> {
        match self.owner() {
            Some((u, g)) => chown_tree(dir, u, g),
            None => Ok(()),
        }
    }

    /// Builds the command for `jail`: bubblewrap (when available) around `setpriv`
    /// (when root) around the program.
    pub fn prepare(&self, jail: &Jail) -> Result<Prepared, RuntimeError> {
        // Fail closed: a process with network never starts without its filter.
        if let (true, Some(p)) = (jail.network, &self.egress) {
            crate::egress::install(p).map_err(|e| {
                RuntimeError::System(format!("the network filter of runs is not in place: {e}"))
            })?;
        }
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(d) = &self.drop_to {
            argv.push(d.setpriv.clone().into());
            for a in [
                format!("--reuid={}", d.uid),
                format!("--regid={}", d.gid),
                "--clear-groups".into(),
                "--inh-caps=-all".into(),
                "--bounding-set=-all".into(),
                "--no-new-privs".into(),
                "--".into(),
            ] {
                argv.push(a.into());
            }
        }
        argv.extend(jail.argv.iter().cloned());
        let mut seccomp_fds: Vec<OwnedFd> = Vec::new();
        let mut cmd = match &self.sandbox {
            Sandbox::Bubblewrap(bwrap) => {
                let mut c = Command::new(bwrap);
                self.view(&mut c, jail);
                for (i, prog) in self.seccomp.iter().enumerate() {
                    let (reader, mut writer) = std::io::pipe()
                        .map_err(|e| RuntimeError::io("passing the seccomp filter", e))?;
                    // Filters are a few hundred bytes: far below a pipe's buffer.
                    std::io::Write::write_all(&mut writer, prog)
                        .map_err(|e| RuntimeError::io("passing the seccomp filter", e))?;
                    drop(writer);
                    c.arg("--add-seccomp-fd")
                        .arg((FIRST_FD + i as i32).to_string());
                    seccomp_fds.push(reader.into());
                }
                c.arg("--").args(&argv);
                c
            }
            Sandbox::None => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]).current_dir(&jail.cwd);
                c
            }
        };
        cmd.env_clear().envs(jail.env.iter().cloned());
        let cgroup = match (&self.cgroups, jail.limits != Limits::default()) {
            (Some(cg), true) => Some(
                cg.take(&jail.name, &jail.limits)
                    .map_err(|e| RuntimeError::io("creating the run's cgroup", e))?,
            ),
            _ => None,
        };
        let procs = match &cgroup {
            Some(c) => c
                .procs_files()
                .map_err(|e| RuntimeError::io("opening the run's cgroup", e))?,
            None => Vec::new(),
        };
        let mut rlimits = vec![(libc::RLIMIT_CORE, 0)];
        if let Some(d) = jail.limits.disk_bytes {
            rlimits.push((libc::RLIMIT_FSIZE, d));
        }
        if let (None, Some(m)) = (&cgroup, jail.limits.memory_bytes) {
            // No cgroup here: the address-space limit is the floor.
            rlimits.push((libc::RLIMIT_AS, m));
        }
        Ok(Prepared {
            command: cmd,
            cgroup,
            seccomp: seccomp_fds,
            procs,
            rlimits,
            idle: false,
        })
    }

    /// bubblewrap's arguments for the filesystem, namespaces and session.
    fn view(&self, c: &mut Command, jail: &Jail) {
        c.args(["--ro-bind", "/usr", "/usr"]);
        for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            match std::fs::read_link(top) {
                Ok(target) => {
                    c.arg("--symlink").arg(target).arg(top);
                }
                Err(_) if Path::new(top).is_dir() => {
                    c.arg("--ro-bind").arg(top).arg(top);
                }
                Err(_) => {}
            }
        }
        c.args(["--dev", "/dev", "--proc", "/proc"]);
        c.args(["--perms", "1777"]);
        if let Some(d) = jail.limits.disk_bytes {
            c.arg("--size").arg(d.to_string());
        }
        c.args(["--tmpfs", "/tmp"]);
        // bubblewrap makes the directories above a mount point 0700 or copies the
        // host's modes (a 0700 `/root` or data directory): unreachable for the sandbox
        // uid. Make them 0755 first.
        let inside = self
            .ro_paths
            .iter()
            .chain(&jail.ro)
            .chain(jail.own_cwd())
            .chain(&jail.rw)
            .chain(jail.rw_at.iter().map(|(_, i)| i));
        let mut above: Vec<&Path> = inside.flat_map(|p| p.ancestors().skip(1)).collect();
        above.sort_by_key(|p| (p.components().count(), p.to_path_buf()));
        above.dedup();
        for a in above {
            let mounted = ["/", "/tmp"].iter().any(|m| a == Path::new(m))
                || ["/usr", "/dev", "/proc", "/etc"]
                    .iter()
                    .any(|m| a.starts_with(m));
            if !mounted {
                c.args(["--perms", "0755", "--dir"]).arg(a);
            }
        }
        c.arg("--ro-bind").arg(&self.etc_dir).arg("/etc");
        for f in ETC_LIVE {
            let host = Path::new("/etc").join(f);
            // Its mount point exists in the sandbox's /etc exactly when the host has it.
            if self.etc_dir.join(f).exists() {
                c.arg("--ro-bind-try").arg(&host).arg(&host);
            }
        }
        for d in &jail.devices {
            c.arg("--dev-bind-try").arg(d).arg(d);
        }
        for p in self.ro_paths.iter().chain(&jail.ro) {
            c.arg("--ro-bind").arg(p).arg(p);
        }
        for p in jail.own_cwd().chain(&jail.rw) {
            c.arg("--bind").arg(p).arg(p);
        }
        for (host, inside) in &jail.rw_at {
            c.arg("--bind").arg(host).arg(inside);
        }
        c.args([
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "stoa-run",
            "--new-session",
            "--die-with-parent",
        ]);
        if !jail.network {
            c.arg("--unshare-net");
        }
        if self.drop_to.is_none() {
            // Not root: an unprivileged user namespace, uid 65534 inside, no capabilities.
            c.args([
                "--unshare-user",
                "--uid",
                "65534",
                "--gid",
                "65534",
                "--cap-drop",
                "ALL",
            ]);
        }
        c.arg("--chdir").arg(&jail.cwd);
    }
}

/// A name for something this process makes on the host for a sandbox (a cgroup, a
/// build directory), that no other live one has, even of another server on the same
/// machine: `{prefix}-{pid}-{seq}`. [`owner_gone`] reads the owner back.
pub(crate) fn owned_name(prefix: &str) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// True when the process that made `name` with [`owned_name`] is no longer alive, so
/// what it left behind can go; names not made that way count as gone.
pub(crate) fn owner_gone(name: &str) -> bool {
    let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
    !pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
}

/// Makes this process's memory and `/proc/<pid>/environ` unreadable by other
/// processes of its uid (`PR_SET_DUMPABLE` 0): `stoa exec` holds tokens in its
/// environment.
pub fn not_dumpable() -> std::io::Result<()> {
    nix::sys::prctl::set_dumpable(false).map_err(std::io::Error::from)
}

/// The directory of this process's sandbox `/etc` below `root`
/// (`sandbox-etc-<pid>-<n>`); those of processes that are gone are removed first.
pub fn process_etc_dir(root: &Path) -> PathBuf {
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale =
                name == "sandbox-etc" || (name.starts_with("sandbox-etc-") && owner_gone(&name));
            if stale {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    root.join(owned_name("sandbox-etc"))
}

/// A sandbox `/etc` shared by the processes on data directory `root` that each start
/// for one run (`stoa exec`, once per Slurm job): named by a fingerprint of what it is
/// made from (the host's files, their sizes and times, and the uid), made once (in a
/// directory of this process, then renamed into place) and never changed after, so a
/// process may mount it while another starts. Making it anew for each run cost tens
/// of milliseconds (`/etc/alternatives` alone holds hundreds of links).
pub fn shared_etc_dir(root: &Path, uid: u32, gid: u32) -> std::io::Result<PathBuf> {
    let dir = root.join(format!("shared-etc-{:016x}", etc_fingerprint(uid, gid)));
    if dir.is_dir() {
        return Ok(dir);
    }
    // A name the stale-directory sweep of `process_etc_dir` removes if this dies.
    let tmp = root.join(owned_name("sandbox-etc"));
    write_etc(&tmp, uid, gid)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.is_dir() => {
            // Another process made it meanwhile: the same content.
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}

/// What the sandbox `/etc` is made from: each host file's (and each entry's of a
/// copied directory) type, size and modification time, and the ids.
fn etc_fingerprint(uid: u32, gid: u32) -> u64 {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (uid, gid).hash(&mut h);
    let mut add = |p: &Path| {
        p.hash(&mut h);
        if let Ok(m) = std::fs::symlink_metadata(p) {
            (m.mode(), m.size(), m.mtime(), m.mtime_nsec(), m.ino()).hash(&mut h);
        }
    };
    for f in ETC_COPIED.iter().chain(ETC_LIVE) {
        let p = Path::new("/etc").join(f);
        add(&p);
        if ETC_COPIED.contains(f)
            && let Ok(rd) = std::fs::read_dir(&p)
        {
            let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            entries.sort();
            for e in entries {
                add(&e);
            }
        }
    }
    h.finish()
}

/// File descriptor number of the first seccomp program in the child.
pub(crate) const FIRST_FD: i32 = 3;

/// Makes the sandbox's `/etc` in `dir`: a synthetic `passwd` and `group`, copies of
/// [`ETC_COPIED`], and mount points for [`ETC_LIVE`]. Made anew at each start, so it
/// follows the host's changes from one start to the next.
pub fn write_etc(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("passwd"),
        format!(
            "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\nstoa-run:x:{uid}:{gid}:Stoa run:/tmp:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
    )?;
    std::fs::write(
        dir.join("group"),
        format!("root:x:0:\nstoa-run:x:{gid}:\nnogroup:x:65534:\n"),
    )?;
    for f in ETC_COPIED {
        copy_tree(&Path::new("/etc").join(f), &dir.join(f))?;
    }
    for f in ETC_LIVE {
        let host = Path::new("/etc").join(f);
        match std::fs::metadata(&host) {
            Ok(m) if m.is_dir() => std::fs::create_dir(dir.join(f))?,
            Ok(_) => drop(std::fs::File::create(dir.join(f))?),
            Err(_) => {}
        }
    }
    // Readable by the sandbox uid whatever the umask.
    chmod_tree(dir)
}

/// Copies `from` to `to`: files, directories, and links as links. Missing is fine.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(from) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)
    } else if meta.is_dir() {
        std::fs::create_dir(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else if meta.is_file() {
        std::fs::copy(from, to).map(drop)
    } else {
        Ok(())
    }
}

/// Makes directories 0755 and files 0644 under `dir` (links untouched).
fn chmod_tree(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for_each_in_tree(dir, &mut |path, meta| {
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        let mode = if meta.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    })
}

/// Changes the owner of `dir` and everything under it (links themselves, never their
/// targets).
pub fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    for_each_in_tree(dir, &mut |path, _| {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    })
}

/// Calls `f` on `dir` and on everything under it, a directory before its entries;
/// links are handed to `f`, never followed.
fn for_each_in_tree(
    dir: &Path,
    f: &mut dyn FnMut(&Path, &std::fs::Metadata) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    f(dir, &meta)?;
    if meta.is_dir() {
        for e in std::fs::read_dir(dir)? {
            for_each_in_tree(&e?.path(), f)?;
        }
    }
    Ok(())
}

/// Bytes used by the files under `dir` (links not followed); `u64::MAX` when the tree
/// cannot be measured (deeper than [`MAX_DEPTH`], unreadable), so a run cannot hide
/// its files from the disk limit. Walked relative to directory descriptors, so no path
/// length limits it.
pub fn tree_size(dir: &Path) -> u64 {
    use rustix::fs::{Mode, openat};
    match openat(rustix::fs::CWD, dir, DIR_NOFOLLOW, Mode::empty()) {
        Ok(fd) => walk_size(fd, 0).unwrap_or(u64::MAX),
        // Gone (the run ended) or never made: nothing is used.
        Err(_) => 0,
    }
}

/// How [`tree_size`] opens directories: never through a link.
const DIR_NOFOLLOW: rustix::fs::OFlags = rustix::fs::OFlags::RDONLY
    .union(rustix::fs::OFlags::DIRECTORY)
    .union(rustix::fs::OFlags::NOFOLLOW)
    .union(rustix::fs::OFlags::CLOEXEC);

/// Deepest directory nesting [`tree_size`] measures.
const MAX_DEPTH: usize = 128;

fn walk_size(dir: OwnedFd, depth: usize) -> rustix::io::Result<u64> {
    use rustix::fs::{AtFlags, Dir, FileType, Mode, openat, statat};
    use rustix::io::Errno;
    if depth > MAX_DEPTH {
        return Err(Errno::LOOP);
    }
    let mut total = 0u64;
    for entry in Dir::read_from(&dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let st = match statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Removed while we looked.
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e),
        };
        total = total.saturating_add(st.st_blocks as u64 * 512);
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            match openat(&dir, name, DIR_NOFOLLOW, Mode::empty()) {
                Ok(sub) => total = total.saturating_add(walk_size(sub, depth + 1)?),
                Err(Errno::NOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(total)
}

/// Gives every thread of process `pid` and of its descendants the normal scheduling
/// policy (needs root for processes of another uid).
pub(crate) fn normal_priority(pid: i32) {
    let mut todo = vec![pid];
    let mut seen = std::collections::HashSet::new();
    while let Some(p) = todo.pop() {
        if !seen.insert(p) {
            continue;
        }
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| t.file_name().to_string_lossy().parse::<i32>().ok());
        for t in tasks {
            child::sched_other(t);
            if let Ok(c) = std::fs::read_to_string(format!("/proc/{p}/task/{t}/children")) {
                todo.extend(c.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
            }
        }
    }
}

#[allow(unsafe_code)]
mod child {
    /// Makes the command's process (and all it starts) run only when the CPU is
    /// otherwise idle (`SCHED_IDLE`), from before it executes.
    pub fn sched_idle(cmd: &mut tokio::process::Command) {
        // SAFETY: one async-signal-safe system call on the child itself, before exec.
        unsafe {
            cmd.pre_exec(|| {
                let p = libc::sched_param { sched_priority: 0 };
                if libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// `SCHED_OTHER` for `pid` (best effort: it may be gone).
    pub fn sched_other(pid: i32) {
        let p = libc::sched_param { sched_priority: 0 };
        // SAFETY: a plain system call with a valid parameter block.
        unsafe { libc::sched_setscheduler(pid, libc::SCHED_OTHER, &p) };
    }

    use super::*;

    /// Arranges for the child, before it executes: joining its cgroups, the seccomp
    /// programs at fds 3, 4, … (for bubblewrap), and its rlimits.
    pub fn setup(
        cmd: &mut Command,
        seccomp: Vec<OwnedFd>,
        procs: Vec<OwnedFd>,
        rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    ) {
        // SAFETY: the closure only makes async-signal-safe system calls (dup2, fcntl,
        // write, setrlimit) on values prepared before the fork; it allocates nothing.
        // The fds are owned by the closure, so they stay open until the command is
        // dropped; dup2 onto 3, 4, … clears close-on-exec on the copies only. Source fds
        // are first moved above the targets so that no mapping overwrites another's source.
        unsafe {
            cmd.pre_exec(move || {
                // The cgroups first: a `cgroup.procs` fd may have a low number (3, 4, …)
                // that the seccomp copies below take over.
                for p in &procs {
                    if libc::write(p.as_raw_fd(), b"0".as_ptr().cast(), 1) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                let mut high = [0i32; 8];
                for (i, fd) in seccomp.iter().enumerate().take(high.len()) {
                    let h = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 16);
                    if h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high[i] = h;
                }
                for (i, h) in high.iter().take(seccomp.len()).enumerate() {
                    if libc::dup2(*h, FIRST_FD + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (res, v) in &rlimits {
                    let lim = libc::rlimit {
                        rlim_cur: *v,
                        rlim_max: *v,
                    };
                    if libc::setrlimit(*res, &lim) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared `/etc` is made once and found again; a per-process one of a process
    /// that is gone is swept, the shared one is not.
    #[test]
    fn the_shared_etc_is_made_once_and_kept() {
        let root = tempfile::tempdir().unwrap();
        let a = shared_etc_dir(root.path(), 64_500, 64_500).unwrap();
        let passwd = std::fs::read_to_string(a.join("passwd")).unwrap();
        assert!(passwd.contains("stoa-run:x:64500:64500:"), "{passwd}");
        let made = std::fs::metadata(&a).unwrap().modified().unwrap();
        let b = shared_etc_dir(root.path(), 64_500, 64_500).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::metadata(&b).unwrap().modified().unwrap(), made);
        // Another uid is another content.
        assert_ne!(shared_etc_dir(root.path(), 64_501, 64_501).unwrap(), a);
        // Nothing of this process's making is left besides them.
        let names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| n.starts_with("shared-etc-")),
            "{names:?}"
        );
        std::fs::create_dir(root.path().join("sandbox-etc-999999999-0")).unwrap();
        let _ = process_etc_dir(root.path());
        assert!(!root.path().join("sandbox-etc-999999999-0").exists());
        assert!(a.is_dir());
    }

    /// Files deeper than PATH_MAX still count, and nesting beyond measure is "full".
    #[test]
    fn tree_size_sees_past_path_max_and_refuses_endless_nesting() {
        use rustix::fs::{Mode, OFlags, mkdirat, openat};
        let dir = tempfile::tempdir().unwrap();
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let mut fd = openat(rustix::fs::CWD, dir.path(), flags, Mode::empty()).unwrap();
        let name = "d".repeat(200);
        for _ in 0..25 {
            mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
            fd = openat(&fd, name.as_str(), flags, Mode::empty()).unwrap();
        }
        let file = openat(
            &fd,
            "big",
            OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        rustix::io::write(&file, &vec![1u8; 4 << 20]).unwrap();
        assert!(tree_size(dir.path()) >= 4 << 20);
        for _ in 0..MAX_DEPTH + 2 {
            mkdirat(&fd, "n", Mode::from_raw_mode(0o755)).unwrap();
            fd = openat(&fd, "n", flags, Mode::empty()).unwrap();
        }
        assert_eq!(tree_size(dir.path()), u64::MAX);
    }

    #[tokio::test]
    async fn a_sandboxed_process_runs_without_privileges() {
        let Sandbox::Bubblewrap(bwrap) = Sandbox::detect() else {
            eprintln!("SKIPPED: bubblewrap is missing");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        write_etc(&etc, 64_500, 64_500).unwrap();
        let cwd = dir.path().join("wd");
        std::fs::create_dir(&cwd).unwrap();
        let root = std::fs::metadata("/proc/self").map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        });
        let c = Confinement {
            sandbox: Sandbox::Bubblewrap(bwrap),
            drop_to: root.unwrap_or(false).then(|| DropTo {
                uid: 64_500,
                gid: 64_500,
                setpriv: crate::python::find_on_path("setpriv").unwrap(),
            }),
            seccomp: Arc::new(crate::seccomp::programs().unwrap()),
            cgroups: crate::cgroup::Cgroups::detect().ok().map(CgroupPool::new),
            ro_paths: vec![],
            etc_dir: etc,
            egress: None,
        };
        c.give(&cwd).unwrap();
        let jail = Jail {
            name: "unit-test".into(),
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "id -u; grep CapEff /proc/self/status; echo hi > f && cat f".into(),
            ],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: cwd.clone(),
            limits: Limits {
                memory_bytes: Some(256 << 20),
                pids: Some(64),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut p = c.prepare(&jail).unwrap();
        let mut cmd = p.forking();
        let out = cmd.output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{:?} {text} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("CapEff:\t0000000000000000"), "{text}");
        assert!(text.ends_with("hi\n"), "{text}");
    }
}
