//! The cgroup crate on fake hierarchies (plain directories laid out like cgroupfs): v1 and
//! v2 found, groups made with limits, processes added, the kernel's counters read, groups
//! removed.

use imageindex_cgroup::{Group, Hierarchy, Limits, ProcessGroup, Version, PARENT};
use std::fs;
use std::path::Path;
use std::time::Duration;

fn v1_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir_all(root.path().join("memory")).unwrap();
    fs::write(root.path().join("memory/cgroup.procs"), "").unwrap();
    root
}

fn v2_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    fs::write(root.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
    root
}

#[test]
fn the_hierarchy_is_found_under_its_root() {
    let v1 = v1_root();
    let h = Hierarchy::find(v1.path()).unwrap();
    assert_eq!(h.version(), Version::V1);
    assert_eq!(h.memory_root(), v1.path().join("memory"));
    assert_eq!(
        h.group(&Path::new(PARENT).join("cats-1")).dir(),
        v1.path().join("memory/imageindex/cats-1")
    );

    let v2 = v2_root();
    let h = Hierarchy::find(v2.path()).unwrap();
    assert_eq!(h.version(), Version::V2);
    assert_eq!(h.memory_root(), v2.path());

    let none = tempfile::tempdir().unwrap();
    assert!(Hierarchy::find(none.path()).is_none());
    let err = Hierarchy::require(none.path()).unwrap_err().to_string();
    assert!(
        err.contains("no writable cgroup memory controller"),
        "{err}"
    );
    assert!(err.contains("neither v1 memory nor v2"), "{err}");
}

#[test]
fn v1_groups_get_memory_swap_and_cpu_limits() {
    let root = v1_root();
    fs::create_dir_all(root.path().join("cpu,cpuacct")).unwrap();
    fs::write(root.path().join("cpu,cpuacct/cpu.cfs_quota_us"), "-1").unwrap();
    let relative = Path::new(PARENT).join("agent-1/pod_c");
    // cgroupfs makes a group's files; a fake tree has to.
    let dir = root.path().join("memory").join(&relative);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("memory.memsw.limit_in_bytes"), "").unwrap();

    let h = Hierarchy::find(root.path()).unwrap().with_cpu();
    assert_eq!(h.mounts().len(), 2);
    let g = h
        .create(
            &relative,
            Limits {
                memory: Some(80 << 20),
                cpu_millis: Some(250),
            },
        )
        .unwrap();
    let read = |p: &Path| fs::read_to_string(p).unwrap();
    assert_eq!(read(&dir.join("memory.limit_in_bytes")), "83886080");
    assert_eq!(read(&dir.join("memory.memsw.limit_in_bytes")), "83886080");
    let cpu = root.path().join("cpu,cpuacct").join(&relative);
    assert_eq!(g.cpu_dir(), Some(cpu.as_path()));
    assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "25000");
    assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(
        g.procs_files(),
        [dir.join("cgroup.procs"), cpu.join("cgroup.procs")]
    );
    g.add(42).unwrap();
    assert_eq!(read(&dir.join("cgroup.procs")), "42");
    assert_eq!(g.pids(), [42]);
    assert_eq!(g.limit(), Some(80 << 20));

    // Memory only: no cpu group, unlimited is -1.
    let h = Hierarchy::find(root.path()).unwrap();
    let g = h
        .create(Path::new("imageindex/x"), Limits::default())
        .unwrap();
    assert_eq!(g.cpu_dir(), None);
    assert_eq!(read(&g.dir().join("memory.limit_in_bytes")), "-1");
    assert_eq!(g.limit(), None);
}

#[test]
fn v1_counters_are_read() {
    let root = v1_root();
    let dir = root.path().join("memory/imageindex/cats-1");
    fs::create_dir_all(&dir).unwrap();
    let g = Hierarchy::find(root.path())
        .unwrap()
        .group(Path::new("imageindex/cats-1"));
    assert_eq!(g.oom_kills(), None, "unreadable");
    assert_eq!(g.peak(), None);
    assert_eq!(g.working_set(), None);
    fs::write(
        dir.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
    )
    .unwrap();
    fs::write(dir.join("memory.max_usage_in_bytes"), "83886080\n").unwrap();
    fs::write(dir.join("memory.usage_in_bytes"), "300000000\n").unwrap();
    fs::write(
        dir.join("memory.stat"),
        "cache 10\ntotal_inactive_file 100000000\n",
    )
    .unwrap();
    assert_eq!(g.oom_kills(), Some(3));
    assert_eq!(g.peak(), Some(80 << 20));
    assert_eq!(g.working_set(), Some(200_000_000));
    g.reset_peak();
    assert_eq!(g.peak(), Some(0));
}

#[test]
fn v2_groups_enable_controllers_on_the_way_and_read_counters() {
    let root = v2_root();
    let h = Hierarchy::find(root.path()).unwrap();
    let g = h
        .create(Path::new("imageindex/cats-1"), Limits::memory(64 << 20))
        .unwrap();
    let read = |p: &Path| fs::read_to_string(p).unwrap();
    assert_eq!(read(&root.path().join("cgroup.subtree_control")), "+memory");
    assert_eq!(
        read(&root.path().join("imageindex/cgroup.subtree_control")),
        "+memory"
    );
    assert_eq!(read(&g.dir().join("memory.max")), "67108864");
    assert_eq!(read(&g.dir().join("memory.swap.max")), "0");
    assert_eq!(g.limit(), Some(64 << 20));
    fs::write(g.dir().join("memory.current"), "150000000\n").unwrap();
    fs::write(
        g.dir().join("memory.stat"),
        "anon 1\ninactive_file 50000000\n",
    )
    .unwrap();
    fs::write(
        g.dir().join("memory.events"),
        "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
    )
    .unwrap();
    fs::write(g.dir().join("memory.peak"), "160000000\n").unwrap();
    assert_eq!(g.working_set(), Some(100_000_000));
    assert_eq!(g.oom_kills(), Some(1));
    assert_eq!(g.peak(), Some(160_000_000));

    // With cpu: both controllers, a cpu.max line.
    let g = h
        .with_cpu()
        .create(
            Path::new("imageindex/agent-1/c"),
            Limits {
                memory: None,
                cpu_millis: Some(500),
            },
        )
        .unwrap();
    assert_eq!(read(&g.dir().join("memory.max")), "max");
    assert_eq!(read(&g.dir().join("cpu.max")), "50000 100000");
    assert_eq!(g.cpu_dir(), None);
}

#[test]
fn groups_are_listed_and_removed() {
    let root = v2_root();
    let h = Hierarchy::find(root.path()).unwrap();
    for name in ["cats-build-3-99", "dogs-build-1-99"] {
        fs::create_dir_all(root.path().join(PARENT).join(name)).unwrap();
    }
    let mut names = h.children(Path::new(PARENT));
    names.sort();
    assert_eq!(names, ["cats-build-3-99", "dogs-build-1-99"]);

    let g = h.group(&Path::new(PARENT).join("cats-build-3-99"));
    g.remove(Duration::from_millis(100)).unwrap();
    assert!(!g.dir().exists());
    g.remove(Duration::ZERO).unwrap();

    // A group that will not go (here: a file in it) is an error after the timeout.
    let busy = h.group(&Path::new(PARENT).join("dogs-build-1-99"));
    fs::write(busy.dir().join("cgroup.procs"), "").unwrap();
    assert!(busy.remove(Duration::from_millis(50)).is_err());
    fs::remove_file(busy.dir().join("cgroup.procs")).unwrap();

    fs::create_dir_all(root.path().join("imageindex/agent-7/c1")).unwrap();
    assert!(h.remove_tree(Path::new("imageindex/agent-7")));
    assert!(
        h.check_writable().is_err(),
        "a plain directory has no memory.max"
    );
}

#[test]
fn a_process_group_and_the_tightest_limit_above_it() {
    // v1: the parent's limit is tighter than the group's own.
    let root = v1_root();
    let mem = root.path().join("memory");
    let pod = mem.join("kubepods/pod1");
    fs::create_dir_all(&pod).unwrap();
    fs::write(mem.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
    fs::write(mem.join("kubepods/memory.limit_in_bytes"), "536870912\n").unwrap();
    fs::write(pod.join("memory.limit_in_bytes"), "1073741824\n").unwrap();
    let p = ProcessGroup::from_proc("4:memory:/kubepods/pod1\n0::/\n", root.path()).unwrap();
    assert_eq!(p.group.dir(), pod);
    assert_eq!(p.group.version(), Version::V1);
    assert_eq!(p.limit(), Some(512 << 20));
    // A path this namespace cannot see resolves to the mount.
    let p = ProcessGroup::from_proc("4:memory:/elsewhere\n", root.path()).unwrap();
    assert_eq!(p.group.dir(), mem);
    assert_eq!(p.limit(), None);

    // v2.
    let root = v2_root();
    let pod = root.path().join("pod2");
    fs::create_dir_all(&pod).unwrap();
    fs::write(pod.join("memory.max"), "max\n").unwrap();
    fs::write(root.path().join("memory.max"), "268435456\n").unwrap();
    let p = ProcessGroup::from_proc("0::/pod2\n", root.path()).unwrap();
    assert_eq!(p.group, Group::new(Version::V2, pod, None));
    assert_eq!(p.limit(), Some(256 << 20));
    // No memory files: not a memory group.
    fs::create_dir_all(root.path().join("pod3")).unwrap();
    fs::remove_file(root.path().join("memory.max")).unwrap();
    assert!(ProcessGroup::from_proc("0::/pod3\n", root.path()).is_none());
}
