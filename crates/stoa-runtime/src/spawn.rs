//! Starting a sandbox's process without copying the server: `clone` with `CLONE_VM |
//! CLONE_VFORK`, as `posix_spawn` does, where a fork would copy the server's page
//! tables and then fault in every page the server writes until the child executes.
//! The child runs on a stack of its own, in the server's memory, while the calling
//! thread waits; it only makes the system calls of its set-up (process group, standard
//! streams, cgroups, seccomp fds, rlimits, scheduling policy, working directory) on
//! values prepared before, then executes bubblewrap (or the program).

#![allow(unsafe_code)]

use std::ffi::{CString, c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;

use crate::sandbox::Prepared;

/// A process started by [`spawn`]: killed (and reaped) when dropped before it ended.
pub struct RawChild {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

impl RawChild {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Its exit status once it exited (reaping it), without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let mut st = 0;
        // SAFETY: our own child, not reaped yet (its pid cannot have been reused).
        let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) };
        if r == 0 {
            return Ok(None);
        }
        if r != self.pid {
            return Err(std::io::Error::last_os_error());
        }
        let s = ExitStatus::from_raw(st);
        self.status = Some(s);
        Ok(Some(s))
    }

    /// Waits until it exited (its pidfd turns readable), and reaps it.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            self.pidfd.readable().await?.clear_ready();
        }
    }
}

impl Drop for RawChild {
    fn drop(&mut self) {
        if matches!(self.try_wait(), Ok(Some(_)) | Err(_)) {
            return;
        }
        // SAFETY: a signal sent through our pidfd of the process (never another one).
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<c_void>(),
                0,
            )
        };
        let pid = self.pid;
        // A thread of its own, which a runtime shutting down does not skip.
        std::thread::spawn(move || {
            let mut st = 0;
            // SAFETY: our child, killed just now: this returns as it dies.
            unsafe { libc::waitpid(pid, &mut st, 0) };
        });
    }
}

/// What the child needs, all prepared before the clone: it allocates nothing.
struct ChildArgs<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// Null for none.
    cwd: *const libc::c_char,
    /// Become fds 0, 1 and 2.
    stdio: [RawFd; 3],
    /// Become fds `first_fd`, `first_fd + 1`, … (bubblewrap's seccomp programs).
    seccomp: &'a [RawFd],
    first_fd: RawFd,
    /// `cgroup.procs` files the child writes itself into.
    procs: &'a [RawFd],
    rlimits: &'a [(libc::__rlimit_resource_t, u64)],
    idle: bool,
    /// The calling thread's signal mask, given back to it after the clone.
    mask: u64,
    /// Set by the child when a step failed (it then exits 127).
    errno: c_int,
}

/// The child's side: the set-up's system calls, then `execve`.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive (the parent is suspended until
    // this process executes or exits). Only async-signal-safe system calls follow.
    unsafe {
        let a = &mut *(arg as *mut ChildArgs);
        // The parent's handlers would run here, on its memory: back to the defaults.
        // Ignored signals stay ignored, as across an exec, but SIGPIPE, which the
        // server ignores for itself (as a command's child gets it back too).
        for sig in 1..=64 {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction != libc::SIG_DFL
                && (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        if libc::setpgid(0, 0) < 0 {
            return fail(a);
        }
        // The cgroups first: a `cgroup.procs` fd may have a low number that the copies
        // below take over.
        for p in a.procs {
            if libc::write(*p, b"0".as_ptr().cast(), 1) < 0 {
                return fail(a);
            }
        }
        // Every source moved above its target first, so no copy overwrites another's
        // source.
        let mut high = [0 as RawFd; 16];
        let n = 3 + a.seccomp.len();
        if n > high.len() {
            *libc::__errno_location() = libc::EMFILE;
            return fail(a);
        }
        for (i, fd) in a.stdio.iter().chain(a.seccomp).enumerate() {
            let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64);
            if h < 0 {
                return fail(a);
            }
            high[i] = h;
        }
        for (i, h) in high.iter().take(n).enumerate() {
            let target = if i < 3 {
                i as RawFd
            } else {
                a.first_fd + (i - 3) as RawFd
            };
            if libc::dup2(*h, target) < 0 {
                return fail(a);
            }
        }
        for (res, v) in a.rlimits {
            let lim = libc::rlimit {
                rlim_cur: *v,
                rlim_max: *v,
            };
            if libc::setrlimit(*res, &lim) < 0 {
                return fail(a);
            }
        }
        if a.idle {
            let p = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) < 0 {
                return fail(a);
            }
        }
        if !a.cwd.is_null() && libc::chdir(a.cwd) < 0 {
            return fail(a);
        }
        // It starts with no signal blocked, as a command's child does.
        let none: u64 = 0;
        set_mask(&none, std::ptr::null_mut());
        libc::execve(a.program, a.argv, a.envp);
        fail(a)
    }
}

/// The calling thread's signal mask, with the system call itself: the C library's
/// wrapper keeps its own internal signals unblocked, whose handlers must not run in the
/// child either.
///
/// # Safety
/// `old` is null or points to 8 writable bytes.
unsafe fn set_mask(mask: &u64, old: *mut u64) {
    // SAFETY: the kernel's signal set is 8 bytes on Linux.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            mask as *const u64,
            old,
            std::mem::size_of::<u64>(),
        );
    }
}

/// The child's stack: mapped for it, with an inaccessible page below it, so that an
/// overflow faults instead of writing over the server's memory.
struct Stack {
    base: *mut c_void,
    len: usize,
}

impl Stack {
    const SIZE: usize = 64 * 1024;
    const GUARD: usize = 4096;

    fn new() -> std::io::Result<Stack> {
        let len = Self::SIZE + Self::GUARD;
        // SAFETY: a new private anonymous mapping; its lowest page then made
        // inaccessible.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            let stack = Stack { base, len };
            if libc::mprotect(base, Self::GUARD, libc::PROT_NONE) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(stack)
        }
    }

    /// Its top (stacks grow down), 16-byte aligned.
    fn top(&self) -> *mut c_void {
        ((self.base as usize + self.len) & !15) as *mut c_void
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used (the child executed or exited).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Records why the child could not go on, and ends it.
///
/// # Safety
/// Only in the child of [`spawn`].
unsafe fn fail(a: &mut ChildArgs) -> c_int {
    // SAFETY: the child's errno, then its own end (no atexit handlers, no flush).
    unsafe {
        std::ptr::write_volatile(&mut a.errno, (*libc::__errno_location()).max(1));
        libc::_exit(127)
    }
}

fn c_string(b: &[u8]) -> std::io::Result<CString> {
    CString::new(b).map_err(|_| std::io::Error::other("a NUL byte in an argument"))
}

/// Starts `p` (its command, environment, working directory, cgroups, seccomp fds,
/// rlimits and policy) as the leader of a new process group, with `stdio` as its fds
/// 0, 1 and 2.
pub fn spawn(p: &Prepared, stdio: [RawFd; 3]) -> std::io::Result<RawChild> {
    let cmd = p.command.as_std();
    let program = c_string(cmd.get_program().as_bytes())?;
    let mut argv = vec![program.clone()];
    for a in cmd.get_args() {
        argv.push(c_string(a.as_bytes())?);
    }
    // The environment is the command's whole environment (it was cleared).
    let mut envp = Vec::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            envp.push(c_string(&kv)?);
        }
    }
    let cwd = cmd
        .get_current_dir()
        .map(|d| c_string(d.as_os_str().as_bytes()))
        .transpose()?;
    let argv_p: Vec<*const libc::c_char> = argv
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_p: Vec<*const libc::c_char> = envp
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let seccomp: Vec<RawFd> = p.seccomp.iter().map(|f| f.as_raw_fd()).collect();
    let procs: Vec<RawFd> = p.procs.iter().map(|f| f.as_raw_fd()).collect();
    let mut args = ChildArgs {
        program: program.as_ptr(),
        argv: argv_p.as_ptr(),
        envp: envp_p.as_ptr(),
        cwd: cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        stdio,
        seccomp: &seccomp,
        first_fd: crate::sandbox::FIRST_FD,
        procs: &procs,
        rlimits: &p.rlimits,
        idle: p.idle,
        mask: 0,
        errno: 0,
    };
    let stack = Stack::new()?;
    // SAFETY: signals are blocked around the clone (the child unblocks them once its
    // handlers are the defaults, just before it executes); the child runs `child_main`
    // on `stack`, which lives until it executed or exited, since CLONE_VFORK suspends
    // this thread until then.
    let pid = unsafe {
        set_mask(&u64::MAX, &mut args.mask);
        let pid = libc::clone(
            child_main,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut args as *mut ChildArgs).cast(),
        );
        let err = std::io::Error::last_os_error();
        set_mask(&args.mask, std::ptr::null_mut());
        if pid < 0 {
            return Err(err);
        }
        pid
    };
    drop(stack);
    // SAFETY: read after the child executed or exited; it wrote there, if anywhere.
    let errno = unsafe { std::ptr::read_volatile(&args.errno) };
    let reap = |pid: i32| {
        let mut st = 0;
        // SAFETY: our child, that exited or is killed just before.
        unsafe { libc::waitpid(pid, &mut st, 0) };
    };
    if errno != 0 {
        reap(pid);
        return Err(std::io::Error::from_raw_os_error(errno));
    }
    // SAFETY: a new fd (close-on-exec) for our own child, not reaped yet.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = if fd < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        // SAFETY: the fd was just opened and is owned by nothing else; the `OwnedFd`
        // keeps it open, the same fd, for as long as the `AsyncFd` holds it.
        unsafe {
            let fd = OwnedFd::from_raw_fd(fd as RawFd);
            AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
                .map_err(|e| e.into_parts().1)
        }
    };
    match pidfd {
        Ok(pidfd) => Ok(RawChild {
            pid,
            pidfd,
            status: None,
        }),
        Err(e) => {
            // SAFETY: our child, not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap(pid);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn plain(program: &str, args: &[&str]) -> Prepared {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args).env_clear().env("PATH", "/usr/bin:/bin");
        Prepared::plain(cmd)
    }

    /// Runs `p` with stdout read here, to its end.
    async fn output_of(p: &Prepared) -> (ExitStatus, String, u32) {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut child = spawn(p, [null.as_raw_fd(), w.as_raw_fd(), w.as_raw_fd()]).unwrap();
        drop(w);
        let mut r = tokio::net::unix::pipe::Receiver::from_owned_fd(r).unwrap();
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        (child.wait().await.unwrap(), out, child.id())
    }

    /// The child leads its own process group, starts with no signal blocked and SIGPIPE
    /// not ignored (the test process ignores it, as every Rust program does), in the
    /// working directory and environment given, and its exit status is its own.
    #[tokio::test]
    async fn a_child_starts_clean_in_its_own_group() {
        let mut p = plain(
            "/bin/cat",
            &["/proc/self/status", "/proc/self/stat", "environ"],
        );
        p.command.current_dir("/proc/self").env("ONLY", "this");
        let (status, out, pid) = output_of(&p).await;
        assert!(status.success(), "{status:?} {out}");
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap_or_else(|| panic!("{name} in {out}"))
        };
        assert_eq!(field("SigBlk:"), 0);
        assert_eq!(field("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0);
        let stat = out
            .lines()
            .find(|l| l.starts_with(&format!("{pid} (")))
            .unwrap();
        let pgrp: u32 = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(pgrp, pid);
        assert!(
            out.ends_with("PATH=/usr/bin:/bin\0ONLY=this\0")
                || out.ends_with("ONLY=this\0PATH=/usr/bin:/bin\0"),
            "{out:?}"
        );
        let (status, _, _) = output_of(&plain("/bin/sh", &["-c", "exit 3"])).await;
        assert_eq!(status.code(), Some(3));
    }

    /// A program that cannot be executed is an error, not a child.
    #[tokio::test]
    async fn a_missing_program_is_an_error() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = null.as_raw_fd();
        let e = spawn(&plain("/nonexistent/program", &[]), [fd, fd, fd])
            .err()
            .expect("no child");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }

    /// A child dropped before its end is killed and reaped.
    #[tokio::test]
    async fn a_dropped_child_is_killed_and_reaped() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = null.as_raw_fd();
        let child = spawn(&plain("/bin/sleep", &["30"]), [fd, fd, fd]).unwrap();
        let pid = child.id();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        drop(child);
        for _ in 0..200 {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("process {pid} is still there (or a zombie)");
    }
}
