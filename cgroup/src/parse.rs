//! The kernel's cgroup file formats, as pure functions over their text.

/// Above this a memory limit means "no limit" (v1 writes `9223372036854771712`).
pub const UNLIMITED: u64 = 1 << 60;

/// A single number (`memory.current`, `memory.max_usage_in_bytes`, …).
pub fn number(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// A memory limit: `None` for v2's `max` and for v1's page-rounded `i64::MAX`.
pub fn limit(text: &str) -> Option<u64> {
    number(text).filter(|v| *v < UNLIMITED)
}

/// The value of `key` in a flat-keyed file (`memory.stat`, `memory.events`,
/// `memory.oom_control`: one `key value` per line).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The `oom_kill N` counter of v1 `memory.oom_control` or v2 `memory.events`.
pub fn oom_kills(text: &str) -> Option<u64> {
    keyed(text, "oom_kill")
}

/// Usage minus inactive file cache: what the OOM killer and the kubelet count.
pub fn working_set(usage: u64, stat: &str, inactive_key: &str) -> u64 {
    usage.saturating_sub(keyed(stat, inactive_key).unwrap_or(0))
}

/// The process ids of a `cgroup.procs` file.
pub fn pids(text: &str) -> Vec<i32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The group of the v1 `memory` controller in `/proc/<pid>/cgroup`
/// (`4:memory:/kubepods/pod1`).
pub fn v1_memory_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    })
}

/// The unified (v2) group in `/proc/<pid>/cgroup` (`0::/user.slice/…`).
pub fn v2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The CFS quota (µs per `period_us`) of a CPU limit in millicores, at least 1 ms.
pub fn cpu_quota_us(millis: u64, period_us: u64) -> u64 {
    (millis * period_us / 1000).max(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_of_both_versions() {
        assert_eq!(limit("536870912\n"), Some(512 << 20));
        assert_eq!(limit("9223372036854771712\n"), None);
        assert_eq!(limit("max\n"), None);
        assert_eq!(number(" 7 "), Some(7));
    }

    #[test]
    fn oom_kill_lines_of_both_versions() {
        assert_eq!(
            oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"),
            Some(2)
        );
        assert_eq!(
            oom_kills("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n"),
            Some(1)
        );
        assert_eq!(oom_kills("oom_kill_disable 0\n"), None);
        assert_eq!(oom_kills(""), None);
    }

    #[test]
    fn working_set_is_usage_minus_inactive_file() {
        let v1 = "cache 10\ntotal_inactive_file 100\ninactive_file 1\n";
        assert_eq!(working_set(300, v1, "total_inactive_file"), 200);
        assert_eq!(
            working_set(300, "anon 1\ninactive_file 50\n", "inactive_file"),
            250
        );
        assert_eq!(working_set(300, "", "inactive_file"), 300);
        assert_eq!(working_set(10, "inactive_file 50\n", "inactive_file"), 0);
    }

    #[test]
    fn proc_cgroup_lines() {
        let v1 = "12:cpu,cpuacct:/a\n4:memory:/kubepods/pod1\n0::/\n";
        assert_eq!(v1_memory_path(v1), Some("/kubepods/pod1"));
        assert_eq!(v2_path(v1), Some("/"));
        assert_eq!(v1_memory_path("0::/pod2\n"), None);
        assert_eq!(v2_path("0::/pod2\n"), Some("/pod2"));
    }

    #[test]
    fn pids_and_cpu_quotas() {
        assert_eq!(pids("12\n\n 34\nx\n"), vec![12, 34]);
        assert_eq!(cpu_quota_us(250, 100_000), 25_000);
        assert_eq!(cpu_quota_us(1, 100_000), 1000);
    }
}
