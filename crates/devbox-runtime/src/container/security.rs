//! Privilege reduction of the sandbox's pid 1, inherited by everything it starts:
//! a minimal capability set, no_new_privs, and a seccomp filter.
//!
//! The filter denies (EPERM) system calls that reach kernel surface a sandbox has no use
//! for (modules, kexec, keyrings, bpf, perf, userfaultfd, io_uring, mounting, namespaces,
//! clock setting, handle-based opens) and answers `clone3` with ENOSYS so that libc falls
//! back to `clone`, whose flags the filter can inspect. Other architectures' system calls
//! (32-bit, x32) are refused outright. `socket` and `socketpair` make only the address
//! families in [`SOCKET_FAMILIES`] (others fail with EAFNOSUPPORT): vsock, for one, shares
//! the host's port space.
//!
//! Pid 1 keeps one capability more than anything it starts: [`GUARD_CAP`], in its permitted
//! set only (not effective) and gone from the bounding set, so no process of the sandbox can
//! ever hold it. The kernel lets a process without `CAP_SYS_PTRACE` in init's user namespace
//! ptrace init (attach, seize, `process_vm_readv`, `/proc/1/mem`, `pidfd_getfd`, ...) only
//! when init's permitted set is a subset of its own (`cap_ptrace_access_check`): with the
//! guard it never is, whether or not init is dumpable (it is while parked for a checkpoint).

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

/// The capability pid 1 keeps in its permitted set alone (never effective, never in the
/// bounding set, so never held by anything it starts; after `execve` a root process's
/// permitted set is the bounding set). Not in [`DEFAULT_CAPS`]: its being in init's
/// permitted set and in no sandbox process's is what keeps every process of the sandbox from
/// ptracing init. A checkpoint refuses an init without it, a restore kills one.
pub const GUARD_CAP: Capability = Capability::CAP_SYS_PTRACE;

/// Drops every capability not in [`DEFAULT_CAPS`] from all sets, including the bounding set;
/// keeps [`GUARD_CAP`] in the permitted set alone.
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
    let mut permitted = keep;
    permitted.insert(GUARD_CAP);
    caps::set(None, CapSet::Permitted, &permitted)
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

/// Address families `socket` and `socketpair` may make; any other fails with EAFNOSUPPORT.
pub const SOCKET_FAMILIES: &[i32] = &[
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

// Classic BPF opcodes and `struct seccomp_data` offsets, for the hand-written checks.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
/// `seccomp_data.args[0]`, its low half (x86_64 is little-endian).
const ARG0_LOW: u32 = 16;

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
    // And refuse x32 system call numbers (bit 30), which share the x86_64 audit arch. And
    // allow only some socket families. These checks go right after the architecture check
    // that opens seccompiler's program, whose next instruction reloads the call's number.
    let arch_check_ok = prog.len() > 4
        && prog[0].code == BPF_LD_W_ABS
        && prog[0].k == ARCH_OFFSET
        && prog[2].code == BPF_RET_K
        && prog[3].code == BPF_LD_W_ABS
        && prog[3].k == NR_OFFSET;
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
    let mut guard = vec![
        stmt(BPF_LD_W_ABS, NR_OFFSET),
        jump(BPF_JMP_JGE_K, 0x4000_0000, 0, 1),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        jump(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ];
    guard.extend(socket_family_guard());
    prog.splice(3..3, guard);
    Ok(prog)
}

/// BPF that answers `socket` and `socketpair` of a family outside [`SOCKET_FAMILIES`] with
/// EAFNOSUPPORT and falls through otherwise (seccompiler's program, next, reloads the
/// system call number). Expects the number in the accumulator. The kernel takes the family
/// as an `int`: only the low 32 bits of the argument count, and only they are compared.
fn socket_family_guard() -> Vec<sock_filter> {
    let n = SOCKET_FAMILIES.len() as u8;
    let jump = |k, jt, jf| sock_filter {
        code: BPF_JMP_JEQ_K,
        jt,
        jf,
        k,
    };
    // Layout: [socket?] [socketpair?] [load family] [family == f_i?]... [deny] (pass)
    let mut out = vec![
        // socket: to the family check; else to the socketpair check.
        jump(libc::SYS_socket as u32, 1, 0),
        // socketpair: to the family check; else past everything.
        jump(libc::SYS_socketpair as u32, 0, n + 2),
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: ARG0_LOW,
        },
    ];
    for (i, family) in SOCKET_FAMILIES.iter().enumerate() {
        // An allowed family jumps past the remaining checks and the deny.
        out.push(jump(*family as u32, n - i as u8, 0));
    }
    out.push(sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ERRNO | libc::EAFNOSUPPORT as u32,
    });
    out
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

    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const EAFNOSUPPORT: u32 = libc::SECCOMP_RET_ERRNO | libc::EAFNOSUPPORT as u32;

    /// Runs a classic BPF program over one system call, as the kernel would (the opcodes
    /// seccompiler and this module emit; any other fails the test).
    fn run(prog: &[sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend((nr as u32).to_le_bytes());
        data.extend(arch.to_le_bytes());
        data.extend(0u64.to_le_bytes());
        for a in args {
            data.extend(a.to_le_bytes());
        }
        let word = |k: u32| {
            let k = k as usize;
            u32::from_le_bytes(data[k..k + 4].try_into().unwrap())
        };
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = &prog[pc];
            pc += 1;
            match i.code {
                0x20 => acc = word(i.k),
                0x54 => acc &= i.k,
                0x05 => pc += i.k as usize,
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let taken = match i.code {
                        0x15 => acc == i.k,
                        0x25 => acc > i.k,
                        0x35 => acc >= i.k,
                        _ => acc & i.k != 0,
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                0x06 => return i.k,
                c => panic!("opcode {c:#x} at {}", pc - 1),
            }
        }
    }

    fn call(prog: &[sock_filter], nr: i64, arg0: u64) -> u32 {
        run(prog, AUDIT_ARCH_X86_64, nr, [arg0, 1, 0, 0, 0, 0])
    }

    #[test]
    fn filter_builds_with_guards_after_arch_check() {
        let prog = default_filter().unwrap();
        assert_eq!(prog[3].k, 0, "loads the syscall number");
        assert_eq!(prog[6].k, libc::SYS_clone3 as u32);
        assert!(prog.len() > 60);
    }

    #[test]
    fn only_allowed_socket_families() {
        let prog = default_filter().unwrap();
        for nr in [libc::SYS_socket, libc::SYS_socketpair] {
            for family in SOCKET_FAMILIES {
                assert_eq!(call(&prog, nr, *family as u64), ALLOW, "{nr} {family}");
            }
            let refused = [
                libc::AF_VSOCK,
                libc::AF_PACKET,
                libc::AF_BLUETOOTH,
                libc::AF_ALG,
                libc::AF_KEY,
                libc::AF_CAN,
                libc::AF_TIPC,
                libc::AF_RDS,
                libc::AF_XDP,
                libc::AF_UNSPEC,
                46, // AF_MAX: no family yet
                -1,
            ];
            for family in refused {
                assert_eq!(
                    call(&prog, nr, family as u32 as u64),
                    EAFNOSUPPORT,
                    "{nr} {family}"
                );
            }
            // The kernel reads an int: high bits do not matter, either way.
            assert_eq!(
                call(&prog, nr, (1 << 32) | libc::AF_VSOCK as u64),
                EAFNOSUPPORT
            );
            assert_eq!(call(&prog, nr, (1 << 32) | libc::AF_UNIX as u64), ALLOW);
        }
    }

    #[test]
    fn the_rest_of_the_filter_is_unchanged() {
        let prog = default_filter().unwrap();
        assert_eq!(call(&prog, libc::SYS_read, 0), ALLOW);
        assert_eq!(call(&prog, libc::SYS_connect, libc::AF_VSOCK as u64), ALLOW);
        assert_eq!(call(&prog, libc::SYS_mount, 0), EPERM);
        assert_eq!(call(&prog, libc::SYS_unshare, 0), EPERM);
        assert_eq!(call(&prog, libc::SYS_bpf, 0), EPERM);
        assert_eq!(
            call(&prog, libc::SYS_clone3, 0),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        assert_eq!(call(&prog, libc::SYS_clone, libc::SIGCHLD as u64), ALLOW);
        let newuser = libc::CLONE_NEWUSER as u64 | libc::SIGCHLD as u64;
        assert_eq!(call(&prog, libc::SYS_clone, newuser), EPERM);
        assert_eq!(call(&prog, 0x4000_0000 | libc::SYS_read, 0), EPERM, "x32");
        let i386 = run(
            &prog,
            0x4000_0003,
            41,
            [libc::AF_VSOCK as u64, 1, 0, 0, 0, 0],
        );
        assert_ne!(i386, ALLOW, "other architectures");
    }

    #[test]
    fn guard_cap_is_never_granted() {
        assert!(!DEFAULT_CAPS.contains(&GUARD_CAP));
    }
}
