//! The seccomp filters of sandboxed processes (runs and environment builds), compiled
//! with `seccompiler` and handed to bubblewrap (`--add-seccomp-fd`) as raw BPF.
//!
//! What they refuse: everything that changes the view of the system (mount, umount,
//! pivot_root, chroot, the new mount API), that enters or makes namespaces (setns,
//! unshare, clone with a namespace flag), that reaches into other processes (ptrace,
//! process_vm_*, pidfd_getfd), the kernel keyring, BPF, perf, modules, kexec, reboot,
//! swap, clocks, quotas, handles by id (open_by_handle_at, the classic container
//! escape), userfaultfd, io_uring and vsock sockets. The answer is `EPERM`; `clone3` answers `ENOSYS`
//! because its flags live in memory a filter cannot read, and libc then falls back to
//! `clone`, whose flags the filter checks.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// System calls a sandboxed process may never make (seccompiler, like the kernel on
/// the 64-bit architectures it supports, numbers them as `i64`).
const DENIED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_quotactl,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_vhangup,
    // open_tree_attr (Linux 6.15), not yet named by libc; the number is the same on
    // every architecture since the syscall tables were unified.
    467,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
];

/// `clone` flags that make namespaces.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// A seccomp filter could not be built for this machine.
#[derive(Debug, thiserror::Error)]
#[error("building the seccomp filter: {0}")]
pub struct SeccompError(String);

/// The sandbox's filters as raw BPF programs (one `struct sock_filter` array each), in
/// the order bubblewrap should install them.
pub fn programs() -> Result<Vec<Vec<u8>>, SeccompError> {
    let arch =
        TargetArch::try_from(std::env::consts::ARCH).map_err(|e| SeccompError(e.to_string()))?;
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    // One rule per flag: rules of a syscall match when any of them does.
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let cond = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?;
            SeccompRule::new(vec![cond])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SeccompError(e.to_string()))?;
    denied.insert(libc::SYS_clone, clone_rules);
    // vsock reaches the hypervisor whatever the network namespace or firewall says.
    let vsock = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_VSOCK as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|e| SeccompError(e.to_string()))?;
    denied.insert(libc::SYS_socket, vec![vsock]);
    // On x86_64 the x32 ABI numbers the same calls with bit 30 set, under the same
    // audit architecture: deny those too, on kernels that have it. (Other ABIs, i386
    // through `int 0x80` among them, fail the filter's architecture check and are killed.)
    if arch == TargetArch::x86_64 {
        const X32: i64 = 0x4000_0000;
        let x32: Vec<(i64, Vec<SeccompRule>)> = denied
            .iter()
            .map(|(nr, rules)| (nr | X32, rules.clone()))
            .collect();
        denied.extend(x32);
        denied.insert(libc::SYS_clone3 | X32, Vec::new());
        // Calls x32 numbers apart from the 64-bit ones (kexec_load, ptrace,
        // process_vm_readv, process_vm_writev).
        for nr in [528, 521, 539, 540] {
            denied.insert(nr | X32, Vec::new());
        }
    }
    let deny = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| SeccompError(e.to_string()))?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| SeccompError(e.to_string()))?;
    [deny, clone3]
        .into_iter()
        .map(|f| {
            let prog: BpfProgram = f
                .try_into()
                .map_err(|e: seccompiler::BackendError| SeccompError(e.to_string()))?;
            Ok(raw(&prog))
        })
        .collect()
}

/// The program as the kernel (and bubblewrap) reads it: `struct sock_filter` in
/// native byte order, 8 bytes each.
fn raw(prog: &BpfProgram) -> Vec<u8> {
    let mut out = Vec::with_capacity(prog.len() * 8);
    for ins in prog {
        out.extend_from_slice(&ins.code.to_ne_bytes());
        out.push(ins.jt);
        out.push(ins.jf);
        out.extend_from_slice(&ins.k.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_for_this_machine() {
        let progs = programs().unwrap();
        assert_eq!(progs.len(), 2);
        for p in progs {
            assert!(!p.is_empty() && p.len() % 8 == 0);
        }
    }
}
