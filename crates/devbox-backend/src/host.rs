//! Facts about host processes that every backend with a host process needs.

/// Reads `/proc/<pid>/stat` field 22: the process's start time in clock ticks since boot.
/// Together with the pid it names a process unambiguously across pid reuse.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.get(stat.rfind(')')? + 2..)?;
    after_comm.split(' ').nth(19)?.parse().ok()
}

/// Whether the process `pid` that started at `start` still runs.
pub fn still_runs(p: &crate::HostProcess) -> bool {
    p.start.is_some() && process_start_time(p.pid) == p.start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_readable() {
        assert!(process_start_time(std::process::id() as i32).is_some());
        assert!(process_start_time(i32::MAX).is_none());
    }
}
