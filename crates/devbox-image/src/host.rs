//! The `host` image: the host's own system, read-only, without its secrets.
//!
//! The image itself is a small skeleton: the root directories, the merged-/usr links, and a
//! copy of the host's /etc reduced to world-readable files (so /etc/shadow, private keys and
//! sudoers stay out). The host's /usr (and /bin, /sbin, /lib* where they are real
//! directories) is bind-mounted read-only on top at start. Nothing else of the host, in
//! particular not /root, /home, /var or dev-box's own state, is reachable.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Host directories bound read-only into host-image sandboxes.
pub fn host_binds() -> Vec<PathBuf> {
    let mut binds = vec![PathBuf::from("/usr")];
    for d in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        if let Ok(m) = fs::symlink_metadata(d)
            && m.is_dir()
        {
            binds.push(PathBuf::from(d));
        }
    }
    binds
}

/// Files of /etc never copied, even when world-readable.
const ETC_EXCLUDED: &[&str] = &[
    "shadow",
    "shadow-",
    "gshadow",
    "gshadow-",
    "machine-id",
    ".pwd.lock",
    "hostname",
    "mtab",
];

/// Writes the skeleton into the empty directory `dest`.
pub fn build_skeleton(dest: &Path) -> io::Result<()> {
    let dirs: &[(&str, u32)] = &[
        ("dev", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("mnt", 0o755),
        ("opt", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("run", 0o755),
        ("srv", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("var", 0o755),
        ("var/cache", 0o755),
        ("var/lib", 0o755),
        ("var/log", 0o755),
        ("var/tmp", 0o1777),
        ("work", 0o755),
    ];
    for (d, mode) in dirs {
        let p = dest.join(d);
        fs::create_dir_all(&p)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
    }
    for d in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(d);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                std::os::unix::fs::symlink(fs::read_link(&host)?, dest.join(d))?;
            }
            Ok(m) if m.is_dir() => fs::create_dir_all(dest.join(d))?,
            _ => {}
        }
    }
    copy_etc(Path::new("/etc"), &dest.join("etc"))?;
    fs::write(
        dest.join("etc/hosts"),
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )?;
    Ok(())
}

fn world_readable(m: &fs::Metadata) -> bool {
    if m.is_dir() {
        m.mode() & 0o005 == 0o005
    } else {
        m.mode() & 0o004 != 0
    }
}

fn copy_etc(src: &Path, dst: &Path) -> io::Result<()> {
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let name = entry.file_name();
        if ETC_EXCLUDED.iter().any(|x| name == *x) {
            continue;
        }
        let from = entry.path();
        let to = dst.join(&name);
        let meta = fs::symlink_metadata(&from)?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
        } else if !world_readable(&meta) {
            continue;
        } else if ft.is_dir() {
            fs::create_dir(&to)?;
            copy_etc(&from, &to)?;
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        } else if ft.is_file() {
            fs::copy(&from, &to)?;
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode() & 0o777))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeleton_leaves_secrets_out() {
        let tmp = tempfile::tempdir().unwrap();
        build_skeleton(tmp.path()).unwrap();
        assert!(tmp.path().join("etc/passwd").exists());
        assert!(!tmp.path().join("etc/shadow").exists());
        assert!(tmp.path().join("work").is_dir());
        assert_eq!(
            fs::metadata(tmp.path().join("tmp")).unwrap().mode() & 0o7777,
            0o1777
        );
        assert!(host_binds().contains(&PathBuf::from("/usr")));
    }
}
