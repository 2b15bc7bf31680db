//! The sandbox's root filesystem: assembled by the launcher, finished by pid 1.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::{Stage, StepError};
use crate::config::LaunchConfig;
use crate::sys::{self, TreeAttrs};

fn mkdir(path: &Path) -> std::io::Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Attaches the id-mapped layers, the writable layer and the host binds at staging mount
/// points in the runtime dir. Runs as host root inside the launcher's private mount namespace.
pub fn assemble(cfg: &LaunchConfig, userns: &OwnedFd) -> Result<(), StepError> {
    let rt = &cfg.runtime_dir;
    if cfg.rootfs.layers.is_empty() {
        return Err(StepError {
            stage: "assemble root",
            error: std::io::Error::other("no image layer"),
        });
    }
    for dir in ["rootfs", "layers", "writable", "binds"] {
        mkdir(&rt.join(dir)).stage("runtime dir")?;
    }
    for (i, layer) in cfg.rootfs.layers.iter().enumerate() {
        let target = rt.join("layers").join(i.to_string());
        mkdir(&target).stage("runtime dir")?;
        let attrs = TreeAttrs {
            readonly: true,
            nosuid: false,
            nodev: true,
        };
        let tree =
            sys::detached_tree(layer, false, Some(userns), attrs).stage("id-map image layer")?;
        sys::attach_tree(&tree, &target).stage("mount image layer")?;
    }
    let attrs = TreeAttrs {
        nodev: true,
        ..Default::default()
    };
    let tree = sys::detached_tree(&cfg.rootfs.writable, false, Some(userns), attrs)
        .stage("id-map writable layer")?;
    sys::attach_tree(&tree, &rt.join("writable")).stage("mount writable layer")?;
    for (i, bind) in cfg.rootfs.binds.iter().enumerate() {
        let target = rt.join("binds").join(i.to_string());
        mkdir(&target).stage("runtime dir")?;
        let attrs = TreeAttrs {
            readonly: bind.readonly,
            nosuid: true,
            nodev: true,
        };
        let ns = if bind.idmap { Some(userns) } else { None };
        let tree = sys::detached_tree(&bind.source, true, ns, attrs).stage("prepare bind mount")?;
        sys::attach_tree(&tree, &target).stage("bind mount")?;
    }
    if cfg.netns.is_some() {
        // In a network namespace of the host's user namespace the sandbox cannot mount a
        // sysfs of its own: it gets the host's /sys, without the mounts below it (a copy
        // with children would be locked to them, and CRIU could not bind it again on a
        // restore: it is passed to CRIU as an external mount, `sys`).
        let target = rt.join(STAGED_SYS);
        mkdir(&target).stage("runtime dir")?;
        let attrs = TreeAttrs {
            readonly: true,
            nosuid: true,
            nodev: true,
        };
        let tree = sys::detached_tree(Path::new("/sys"), false, None, attrs).stage("stage /sys")?;
        sys::attach_tree(&tree, &target).stage("stage /sys")?;
    }
    Ok(())
}

/// Where [`assemble`] stages the host's /sys (below the runtime dir) for a sandbox in a
/// persisted network namespace.
pub const STAGED_SYS: &str = "sys";

/// Mounts the overlay root over the staged layers and the binds on top of it, then enters the
/// root. Runs as pid 1 (root of the user namespace) with the runtime dir as working directory,
/// so that the writable layer's files are created by the sandbox's root.
pub fn mount_root(cfg: &LaunchConfig) -> Result<(), StepError> {
    mount_overlay(cfg)?;
    mount_binds(cfg)?;
    std::env::set_current_dir("rootfs").stage("enter root")?;
    Ok(())
}

/// Mounts the overlay of the staged layers at `rootfs` (relative to the runtime dir, the
/// working directory), from inside the sandbox's user namespace.
pub fn mount_overlay(cfg: &LaunchConfig) -> Result<(), StepError> {
    let lowerdir: Vec<String> = (0..cfg.rootfs.layers.len())
        .map(|i| format!("layers/{i}"))
        .collect();
    let opts = format!(
        "lowerdir={},upperdir=writable/upper,workdir=writable/work,userxattr,index=off",
        lowerdir.join(":")
    );
    mount(
        Some("overlay"),
        "rootfs",
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .stage("mount overlay root")?;
    Ok(())
}

/// Mounts the staged host binds on the overlay root at `rootfs`.
fn mount_binds(cfg: &LaunchConfig) -> Result<(), StepError> {
    for (i, bind) in cfg.rootfs.binds.iter().enumerate() {
        let rel = bind.target.strip_prefix("/").unwrap_or(&bind.target);
        let target = Path::new("rootfs").join(rel);
        if fs::symlink_metadata(&target).is_err() {
            fs::create_dir_all(&target).stage("make bind mount point")?;
        }
        let source = PathBuf::from(format!("binds/{i}"));
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .stage("bind mount")?;
    }
    Ok(())
}

/// Device nodes bound from the host into the sandbox's /dev.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Kernel files hidden behind /dev/null or an empty read-only tmpfs.
const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
    "/sys/kernel/debug",
    "/sys/kernel/security",
];

/// Kernel interfaces that stay readable but not writable.
const READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Mounts /proc, /sys and /dev into the root (the current directory), pivots into it, and
/// masks kernel paths. Runs as the sandbox's pid 1, root in its user namespace.
/// `staged_sys`: the host's /sys staged by [`assemble`] (a sandbox in a persisted network
/// namespace, which cannot mount a sysfs of its own).
pub fn finish_in_init(staged_sys: Option<&Path>) -> Result<(), StepError> {
    let none = None::<&str>;
    for dir in ["proc", "sys", "dev", "tmp", "work"] {
        mkdir(Path::new(dir)).stage("make mount point")?;
    }
    let nsx = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "proc", Some("proc"), nsx, none).stage("mount /proc")?;
    if let Some(staged) = staged_sys {
        mount(Some(staged), "sys", none, MsFlags::MS_BIND, none).stage("bind /sys")?;
        mount(
            none,
            "sys",
            none,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nsx,
            none,
        )
        .stage("read-only /sys")?;
    } else if mount(
        Some("sysfs"),
        "sys",
        Some("sysfs"),
        nsx | MsFlags::MS_RDONLY,
        none,
    )
    .is_err()
    {
        mount(
            Some("/sys"),
            "sys",
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .stage("bind /sys")?;
        mount(
            none,
            "sys",
            none,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nsx,
            none,
        )
        .stage("read-only /sys")?;
    }
    mount(
        Some("tmpfs"),
        "dev",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )
    .stage("mount /dev")?;
    for dev in DEVICES {
        let target = Path::new("dev").join(dev);
        fs::File::create(&target).stage("make device mount point")?;
        mount(
            Some(Path::new("/dev").join(dev).as_path()),
            &target,
            none,
            MsFlags::MS_BIND,
            none,
        )
        .stage("bind device")?;
    }
    mkdir(Path::new("dev/pts")).stage("make /dev/pts")?;
    mount(
        Some("devpts"),
        "dev/pts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .stage("mount /dev/pts")?;
    mkdir(Path::new("dev/shm")).stage("make /dev/shm")?;
    mount(
        Some("shm"),
        "dev/shm",
        Some("tmpfs"),
        nsx,
        Some("mode=1777,size=65536k"),
    )
    .stage("mount /dev/shm")?;
    mkdir(Path::new("dev/mqueue")).stage("make /dev/mqueue")?;
    let _ = mount(Some("mqueue"), "dev/mqueue", Some("mqueue"), nsx, none);
    for (link, to) in [
        ("dev/ptmx", "pts/ptmx"),
        ("dev/fd", "/proc/self/fd"),
        ("dev/stdin", "/proc/self/fd/0"),
        ("dev/stdout", "/proc/self/fd/1"),
        ("dev/stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, link).stage("make /dev link")?;
    }

    nix::unistd::pivot_root(".", ".").stage("pivot_root")?;
    umount2(".", MntFlags::MNT_DETACH).stage("detach host root")?;
    std::env::set_current_dir("/").stage("chdir /")?;

    // Masked directories share one empty read-only tmpfs (a checkpoint then saves one).
    let mut empty: Option<&Path> = None;
    for path in MASKED {
        let p = Path::new(path);
        let Ok(meta) = fs::symlink_metadata(p) else {
            continue;
        };
        let res = if meta.is_dir() {
            match empty {
                None => {
                    empty = Some(p);
                    mount(
                        Some("tmpfs"),
                        p,
                        Some("tmpfs"),
                        MsFlags::MS_RDONLY | nsx,
                        Some("size=0"),
                    )
                }
                Some(first) => mount(Some(first), p, none, MsFlags::MS_BIND, none).and_then(|()| {
                    mount(
                        none,
                        p,
                        none,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nsx,
                        none,
                    )
                }),
            }
        } else {
            mount(Some("/dev/null"), p, none, MsFlags::MS_BIND, none)
        };
        res.stage("mask kernel path")?;
    }
    for path in READ_ONLY {
        let p = Path::new(path);
        if fs::symlink_metadata(p).is_err() {
            continue;
        }
        mount(Some(p), p, none, MsFlags::MS_BIND | MsFlags::MS_REC, none)
            .stage("bind read-only path")?;
        mount(
            none,
            p,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nsx,
            none,
        )
        .stage("remount read-only path")?;
    }
    Ok(())
}
