//! Resolving `--user` against a sandbox's own /etc/passwd and /etc/group (no NSS).

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Home directory.
    pub home: String,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves `spec` (`user`, `uid`, `user:group`, `uid:gid`; `None` means root) against the
/// contents of passwd and group files. Unknown names are an error; unknown numeric ids are
/// accepted with gid 0 (or the given gid) and home `/`.
pub fn resolve(spec: Option<&str>, passwd: &str, group: &str) -> Result<Credentials, String> {
    let spec = spec.unwrap_or("0");
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() {
        return Err("empty user name".into());
    }
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|e| e.name == user)
                .ok_or_else(|| {
                    format!("user {user:?} does not exist in the sandbox's /etc/passwd")
                })?,
        ),
    };
    let uid = match &entry {
        Some(e) => e.uid,
        None => user.parse().map_err(|_| format!("bad user {user:?}"))?,
    };
    let gid = match grp {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|(name, _, _)| *name == g)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| format!("group {g:?} does not exist in the sandbox's /etc/group"))?,
        },
        None => entry.as_ref().map(|e| e.gid).unwrap_or(0),
    };
    let groups = match &entry {
        Some(e) => group_entries(group)
            .filter(|(_, _, m)| m.contains(&e.name))
            .map(|(_, gid, _)| gid)
            .collect(),
        None => Vec::new(),
    };
    let home = entry
        .as_ref()
        .map(|e| e.home.to_string())
        .unwrap_or_else(|| "/".into());
    Ok(Credentials {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\nbroken line\n";
    const GROUP: &str = "root:x:0:\nalice:x:1000:\nstaff:x:50:alice,bob\n";

    #[test]
    fn default_is_root() {
        let c = resolve(None, PASSWD, GROUP).unwrap();
        assert_eq!((c.uid, c.gid, c.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn names_and_groups() {
        let c = resolve(Some("alice"), PASSWD, GROUP).unwrap();
        assert_eq!(
            (c.uid, c.gid, c.groups.clone(), c.home.as_str()),
            (1000, 1000, vec![50], "/home/alice")
        );
        let c = resolve(Some("alice:staff"), PASSWD, GROUP).unwrap();
        assert_eq!(c.gid, 50);
    }

    #[test]
    fn numeric_without_entry() {
        let c = resolve(Some("4242"), PASSWD, GROUP).unwrap();
        assert_eq!((c.uid, c.gid, c.home.as_str()), (4242, 0, "/"));
        let c = resolve(Some("4242:7"), PASSWD, GROUP).unwrap();
        assert_eq!(c.gid, 7);
    }

    #[test]
    fn unknown_names_fail_clearly() {
        assert!(
            resolve(Some("mallory"), PASSWD, GROUP)
                .unwrap_err()
                .contains("mallory")
        );
        assert!(
            resolve(Some("alice:nogroup"), PASSWD, GROUP)
                .unwrap_err()
                .contains("nogroup")
        );
        assert!(resolve(Some(":1"), PASSWD, GROUP).is_err());
    }
}
