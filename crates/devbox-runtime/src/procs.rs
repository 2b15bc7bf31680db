//! A sandbox's processes as the host's /proc shows them, for `sandbox ps`.
//!
//! Everything read here is under the sandbox's control (its command lines and names are
//! whatever its processes set; a process can end between two reads): reads are bounded,
//! text has its control characters escaped, and a process that vanished is skipped.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use devbox_backend::ProcessSample;

/// The most bytes of a command line read (the rest is cut, marked with `…`).
pub const CMDLINE_READ_MAX: u64 = 4096;
/// The most characters of an escaped command kept.
pub const COMMAND_MAX_CHARS: usize = 1024;

fn read_bounded(path: &Path, max: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    File::open(path)
        .ok()?
        .take(max)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

/// Text from a sandbox made safe to print: invalid UTF-8 bytes as `\xNN`, control
/// characters (C0, C1, DEL) and bidirectional overrides escaped, a backslash doubled, and
/// at most `max_chars` characters of the result (then `…`).
pub fn escape(bytes: &[u8], max_chars: usize) -> String {
    let mut out = String::new();
    let mut count = 0usize;
    let mut push = |out: &mut String, s: &str| -> bool {
        let n = s.chars().count();
        if count + n > max_chars {
            out.push('…');
            return false;
        }
        count += n;
        out.push_str(s);
        true
    };
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            let esc = match c {
                '\\' => "\\\\".to_string(),
                '\n' => "\\n".to_string(),
                '\t' => "\\t".to_string(),
                '\r' => "\\r".to_string(),
                c if c.is_control() => {
                    if (c as u32) < 0x100 {
                        format!("\\x{:02x}", c as u32)
                    } else {
                        format!("\\u{{{:x}}}", c as u32)
                    }
                }
                '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                    format!("\\u{{{:x}}}", c as u32)
                }
                c => c.to_string(),
            };
            if !push(&mut out, &esc) {
                return out;
            }
        }
        for b in chunk.invalid() {
            if !push(&mut out, &format!("\\x{b:02x}")) {
                return out;
            }
        }
    }
    out
}

/// The command of a process: its argv joined by spaces (each escaped), or `[comm]` for a
/// process without one (kernel threads, zombies).
fn command(proc_dir: &Path) -> Option<String> {
    let raw = read_bounded(&proc_dir.join("cmdline"), CMDLINE_READ_MAX)?;
    let cut = raw.len() as u64 >= CMDLINE_READ_MAX;
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).filter(|s| !s.is_empty()).collect();
    if args.is_empty() {
        let comm = read_bounded(&proc_dir.join("comm"), 64)?;
        let comm = comm.strip_suffix(b"\n").unwrap_or(&comm);
        return Some(format!("[{}]", escape(comm, 64)));
    }
    let joined = args.join(&b' ');
    let mut s = escape(&joined, COMMAND_MAX_CHARS);
    if cut && !s.ends_with('…') {
        s.push('…');
    }
    Some(s)
}

/// The depth of `host_pid`'s pid namespace (the number of pids in its `NSpid`).
pub fn ns_depth(host_pid: i32) -> Option<usize> {
    let status = read_bounded(Path::new(&format!("/proc/{host_pid}/status")), 16384)?;
    let status = String::from_utf8_lossy(&status);
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| v.split_whitespace().count())
}

/// One process; `depth` is that of the sandbox's pid namespace ([`ns_depth`] of its
/// init), whose pid is the `depth`-th of `NSpid` (a namespace the sandbox nested inside
/// its own does not hide a process's pid in the sandbox's). None if it ended meanwhile.
pub fn sample(host_pid: i32, depth: usize, exec_cgroup: Option<String>) -> Option<ProcessSample> {
    let dir = format!("/proc/{host_pid}");
    let dir = Path::new(&dir);
    let status = read_bounded(&dir.join("status"), 16384)?;
    let status = String::from_utf8_lossy(&status);
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name));
    let host_uid = field("Uid:")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(u32::MAX);
    let pid = field("NSpid:").and_then(|v| {
        v.split_whitespace()
            .nth(depth.checked_sub(1)?)?
            .parse()
            .ok()
    });
    let rss_bytes = field("VmRSS:")
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let stat = read_bounded(&dir.join("stat"), 4096)?;
    let stat = String::from_utf8_lossy(&stat);
    // The name in parentheses may hold anything, `)` too: the fields follow the last one.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    let ticks = (num(11) + num(12)).max(0) as u64;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|v| *v > 0)
        .unwrap_or(100) as u64;
    Some(ProcessSample {
        host_pid,
        pid,
        host_ppid: num(1) as i32,
        host_sid: num(3) as i32,
        host_uid,
        cpu_usec: ticks.saturating_mul(1_000_000) / hz,
        rss_bytes,
        command: command(dir)?,
        exec_cgroup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_characters_and_bounds() {
        assert_eq!(escape(b"a\nb\tc\\", 100), "a\\nb\\tc\\\\");
        assert_eq!(escape(b"\x1b[31m", 100), "\\x1b[31m");
        assert_eq!(escape(b"\xff\xfe", 100), "\\xff\\xfe");
        assert_eq!(escape("x\u{202e}y".as_bytes(), 100), "x\\u{202e}y");
        assert_eq!(escape(&[b'a'; 50], 10), format!("{}…", "a".repeat(10)));
        assert!(!escape(&[b'\n'; 5000], 1024).contains('\n'));
    }

    #[test]
    fn samples_this_process() {
        let me = std::process::id() as i32;
        let depth = ns_depth(me).unwrap();
        let s = sample(me, depth, None).unwrap();
        assert_eq!(s.host_pid, me);
        assert!(s.pid.is_some());
        assert!(s.rss_bytes > 0);
        assert!(!s.command.is_empty());
    }
}
