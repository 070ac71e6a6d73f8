//! Memory limits are real: a full-feature build of large photos fits a real 512 MiB cgroup,
//! and the same build under a limit far too small is really OOM-killed by the kernel.

use imageindex_e2e::*;
use std::path::Path;

fn limited_build(
    ds: &Path,
    out: &Path,
    limit: &str,
    name: &str,
    preset: &str,
) -> (std::process::Output, u64) {
    let o = std::process::Command::new(bin("indexer"))
        .args([
            "exec-limited",
            "--memory-limit",
            limit,
            "--name",
            name,
            "--",
        ])
        .arg(bin("indexer"))
        .args([
            "build",
            ds.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--preset",
            preset,
            "--json",
        ])
        .output()
        .unwrap();
    let (root, file) = if Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists() {
        ("/sys/fs/cgroup/memory/imageindex", "memory.oom_control")
    } else {
        ("/sys/fs/cgroup/imageindex", "memory.events")
    };
    let dir = Path::new(root).join(name);
    let kills = std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    let _ = std::fs::remove_dir(&dir);
    (o, kills)
}

#[test]
fn full_features_of_large_photos_fit_512_mib_and_a_tiny_limit_is_really_enforced() {
    assert!(
        cgroups_writable(),
        "this test needs a writable cgroup memory controller: run as root (CI does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("large");
    make_photos(&ds, 50, 4000);
    let out = tmp.path().join("idx");
    let name = format!("e2e-fit-{}", std::process::id());
    let (o, kills) = limited_build(&ds, &out, "512Mi", &name, "full");
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(kills, 0);
    let s = json_of(&o);
    assert_eq!(s["meta"]["imagesIndexed"], 50);
    assert_eq!(s["meta"]["preset"]["nfeatures"], 1000);
    let peak = s["memory"]["peakWorkingSet"].as_u64().unwrap();
    assert!(peak > 0 && peak < 512 << 20, "peak working set {peak}");
    assert!(s["meta"]["descriptors"].as_u64().unwrap() > 50 * 800);
    eprintln!(
        "512Mi build: peak working set {} MiB, VmHWM {} MiB, RssAnon peak {} MiB, {} descriptors",
        peak >> 20,
        s["memory"]["peakRss"].as_u64().unwrap() >> 20,
        s["memory"]["peakRssAnon"].as_u64().unwrap() >> 20,
        s["meta"]["descriptors"]
    );

    // The same build under 48 MiB cannot hold even one 4000-pixel photo in flight.
    let out2 = tmp.path().join("idx2");
    let name2 = format!("e2e-oom-{}", std::process::id());
    let (o, kills) = limited_build(&ds, &out2, "48Mi", &name2, "full");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        o.status.signal(),
        Some(9),
        "expected a SIGKILL, got {:?}",
        o.status
    );
    assert!(kills >= 1, "the kernel's OOM killer did not fire");
}
