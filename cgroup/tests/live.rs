//! The cgroup crate on this machine's real hierarchy (root only; skipped where groups
//! cannot be made): a group with a limit, a process in it, the kernel's counters, removal.

use imageindex_cgroup::{Hierarchy, Limits, ProcessGroup, DEFAULT_ROOT, PARENT};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn writable() -> Option<Hierarchy> {
    let h = Hierarchy::find(Path::new(DEFAULT_ROOT))?;
    match h.check_writable() {
        Ok(()) => Some(h),
        Err(e) => {
            // Unprivileged runs cannot make cgroups; the root test runs cover this.
            eprintln!("cgroups not writable here ({e}); skipped");
            None
        }
    }
}

#[test]
fn a_real_group_limits_counts_and_goes_away() {
    let Some(h) = writable() else { return };
    let relative = Path::new(PARENT).join(format!("crate-test-{}", std::process::id()));
    let g = h.create(&relative, Limits::memory(64 << 20)).unwrap();
    assert_eq!(g.limit(), Some(64 << 20));
    assert_eq!(g.oom_kills(), Some(0));
    // A shell that waits for a line, then execs: what it maps after joining is charged to the
    // group (v1 does not move a process's earlier charges with it).
    let mut child = Command::new("sh")
        .args(["-c", "read line; exec sleep 30"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    g.add(child.id()).unwrap();
    assert_eq!(g.pids(), [child.id() as i32]);
    writeln!(child.stdin.as_mut().unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.peak().unwrap() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(g.peak().unwrap() > 0);
    assert!(g.working_set().is_some());
    // Busy until its process is gone: destroy kills it first.
    g.destroy(Duration::from_secs(5)).unwrap();
    let _ = child.wait();
    assert!(!g.dir().exists());
}

#[test]
fn this_process_has_a_memory_group() {
    if Hierarchy::find(Path::new(DEFAULT_ROOT)).is_none() {
        return;
    }
    let p = ProcessGroup::detect().expect("a memory cgroup for this process");
    assert!(p.group.working_set().is_some());
}
