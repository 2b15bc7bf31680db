//! Privilege reduction of the sandbox's pid 1, inherited by everything it starts:
//! a minimal capability set, no_new_privs, and a seccomp filter.
//!
//! The filter denies (EPERM) system calls that reach kernel surface a sandbox has no use
//! for (modules, kexec, keyrings, bpf, perf, userfaultfd, io_uring, mounting, namespaces,
//! clock setting, handle-based opens) and answers `clone3` with ENOSYS so that libc falls
//! back to `clone`, whose flags the filter can inspect. Other architectures' system calls
//! (32-bit, x32) are refused outright.

use std::collections::{BTreeMap, HashSet};

use caps::{CapSet, Capability};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

use super::{Stage, StepError};

/// Capabilities a sandbox keeps (inside its user namespace), as container engines grant by default.
pub const DEFAULT_CAPS: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETGID,
    Capability::CAP_SETPCAP,
    Capability::CAP_SETUID,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_AUDIT_WRITE,
];

/// Drops every capability not in [`DEFAULT_CAPS`] from all sets, including the bounding set.
pub fn drop_capabilities() -> Result<(), StepError> {
    let keep: HashSet<Capability> = DEFAULT_CAPS.iter().copied().collect();
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(caps_err)
                .stage("drop bounding capability")?;
        }
    }
    caps::clear(None, CapSet::Ambient)
        .map_err(caps_err)
        .stage("clear ambient capabilities")?;
    caps::set(None, CapSet::Inheritable, &HashSet::new())
        .map_err(caps_err)
        .stage("clear inheritable capabilities")?;
    caps::set(None, CapSet::Effective, &keep)
        .map_err(caps_err)
        .stage("set effective capabilities")?;
    caps::set(None, CapSet::Permitted, &keep)
        .map_err(caps_err)
        .stage("set permitted capabilities")?;
    Ok(())
}

fn caps_err(e: caps::errors::CapsError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// System calls denied with EPERM.
const DENIED: &[i64] = &[
    libc::SYS_acct,
    libc::SYS_add_key,
    libc::SYS_bpf,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_settime,
    libc::SYS_settimeofday,
    libc::SYS_adjtimex,
    libc::SYS_delete_module,
    libc::SYS_finit_module,
    libc::SYS_init_module,
    libc::SYS_fanotify_init,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fsopen,
    libc::SYS_fspick,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_setup,
    libc::SYS_ioperm,
    libc::SYS_iopl,
    libc::SYS_kexec_file_load,
    libc::SYS_kexec_load,
    libc::SYS_keyctl,
    libc::SYS_lookup_dcookie,
    libc::SYS_mount,
    libc::SYS_mount_setattr,
    libc::SYS_move_mount,
    libc::SYS_name_to_handle_at,
    libc::SYS_nfsservctl,
    libc::SYS_open_by_handle_at,
    libc::SYS_open_tree,
    libc::SYS_perf_event_open,
    libc::SYS_pivot_root,
    libc::SYS_quotactl,
    libc::SYS_reboot,
    libc::SYS_request_key,
    libc::SYS_setns,
    libc::SYS_swapoff,
    libc::SYS_swapon,
    libc::SYS_sysfs,
    libc::SYS_syslog,
    libc::SYS_umount2,
    libc::SYS_unshare,
    libc::SYS_uselib,
    libc::SYS_userfaultfd,
    libc::SYS_ustat,
    libc::SYS_vhangup,
];

/// `clone` flags that make new namespaces; a clone with any of them is denied.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// Builds the default filter as a BPF program.
pub fn default_filter() -> Result<BpfProgram, String> {
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|nr| (*nr, vec![])).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            let cond = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(*flag),
                *flag,
            )
            .map_err(|e| e.to_string())?;
            SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, String>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, eperm, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    let mut prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;

    // clone3 passes its flags in memory the filter cannot read: make libc fall back to clone.
    // And refuse x32 system call numbers (bit 30), which share the x86_64 audit arch.
    // Both checks go right after the architecture check that opens seccompiler's program.
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JEQ_K: u16 = 0x15;
    const BPF_JMP_JGE_K: u16 = 0x35;
    const BPF_RET_K: u16 = 0x06;
    const NR_OFFSET: u32 = 0;
    const ARCH_OFFSET: u32 = 4;
    let arch_check_ok = prog.len() > 3
        && prog[0].code == BPF_LD_W_ABS
        && prog[0].k == ARCH_OFFSET
        && prog[2].code == BPF_RET_K;
    if !arch_check_ok {
        return Err("unexpected seccomp program layout".into());
    }
    let stmt = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code, k, jt, jf| sock_filter { code, jt, jf, k };
    let guard = [
        stmt(BPF_LD_W_ABS, NR_OFFSET),
        jump(BPF_JMP_JGE_K, 0x4000_0000, 0, 1),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        jump(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ];
    prog.splice(3..3, guard);
    Ok(prog)
}

/// Sets no_new_privs and installs a seccomp filter (built by [`default_filter`]) on the
/// calling thread.
pub fn lock_down(filter: Option<&BpfProgram>) -> Result<(), StepError> {
    nix::sys::prctl::set_no_new_privs().stage("no_new_privs")?;
    if let Some(prog) = filter {
        seccompiler::apply_filter(prog)
            .map_err(|e| std::io::Error::other(e.to_string()))
            .stage("install seccomp filter")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_builds_with_guards_after_arch_check() {
        let prog = default_filter().unwrap();
        assert_eq!(prog[3].k, 0, "loads the syscall number");
        assert_eq!(prog[6].k, libc::SYS_clone3 as u32);
        assert!(prog.len() > 60);
    }
}
