//! A real one-node cluster on this machine (tests/node/up.sh): the control plane of
//! tests/controlplane, containerd + runc, CNI bridge networking, the kubelet, kube-proxy and
//! kube-scheduler, with the project's images imported into containerd. This is the test side
//! of it: its settings, what the kernel says about each container (peak memory, OOM kills, the
//! uid its process runs as, sampled from the kubelet's cgroups), and a teardown that checks
//! nothing was left behind. Test-only code, not shipped.

use crate::repo;
use imageindex_cgroup::{parse, Group, Hierarchy, DEFAULT_ROOT};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// What the kernel reported for one container's (or pod's) memory cgroup while it existed.
#[derive(Clone, Debug, PartialEq)]
pub struct CgroupMemory {
    /// The cgroup's directory (memory controller), relative to the hierarchy's root.
    pub path: String,
    /// The pod's uid (from the `pod<uid>` directory).
    pub pod_uid: String,
    /// The container id (the directory's name), `None` for the pod's own cgroup.
    pub container_id: Option<String>,
    /// The highest `memory.max_usage_in_bytes` (v1) or `memory.peak` (v2) read: the kernel's
    /// count, page cache included.
    pub peak_bytes: u64,
    /// Its limit.
    pub limit_bytes: u64,
    /// The kernel's count of OOM kills in this cgroup (`oom_kill` of memory.oom_control or
    /// memory.events).
    pub oom_kills: u64,
    /// When it was last read (the container was gone soon after, once it is no longer seen).
    pub last_seen: SystemTime,
}

/// An OOM kill as the kernel logged it (`oom-kill:` and `Killed process` lines of the kernel
/// log, /dev/kmsg).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelOomKill {
    /// The memory cgroup that ran out (`oom_memcg`): the container's or its pod's.
    pub oom_memcg: String,
    /// The killed task's memory cgroup (`task_memcg`): its container's.
    pub task_memcg: String,
    /// The killed process' name, pid and uid.
    pub task: String,
    /// Its pid.
    pub pid: u32,
    /// Its uid.
    pub uid: u32,
    /// Its anonymous resident memory when killed (`anon-rss`), in bytes, if logged.
    pub anon_rss_bytes: Option<u64>,
}

/// Every OOM kill in the kernel log (/dev/kmsg, read without blocking).
pub fn kernel_oom_kills() -> Vec<KernelOomKill> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut kmsg) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return Vec::new();
    };
    let mut messages = Vec::new();
    let mut buf = vec![0u8; 16384];
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let record = String::from_utf8_lossy(&buf[..n]);
                // "<prio>,<seq>,<usec>,<flags>;<message>\n<continuation>"
                if let Some((_, message)) = record.split_once(';') {
                    messages.push(message.lines().next().unwrap_or("").to_string());
                }
            }
            // EPIPE: a record was overwritten while reading; keep going.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    parse_oom_kills(&messages)
}

/// The OOM kills in kernel log messages.
pub fn parse_oom_kills(messages: &[String]) -> Vec<KernelOomKill> {
    let mut kills = Vec::new();
    for m in messages {
        let Some(fields) = m.strip_prefix("oom-kill:") else {
            continue;
        };
        let field = |key: &str| {
            fields
                .split(',')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or("")
                .to_string()
        };
        let pid: u32 = field("pid").parse().unwrap_or(0);
        // "Memory cgroup out of memory: Killed process 123 (indexer) total-vm:..kB, anon-rss:..kB, ..."
        let anon_rss_bytes = messages.iter().find_map(|k| {
            let rest = k.split("Killed process ").nth(1)?;
            let (p, rest) = rest.split_once(' ')?;
            if p.parse::<u32>().ok()? != pid {
                return None;
            }
            let kb = rest.split("anon-rss:").nth(1)?.split("kB").next()?;
            kb.trim().parse::<u64>().ok().map(|kb| kb * 1024)
        });
        kills.push(KernelOomKill {
            oom_memcg: field("oom_memcg"),
            task_memcg: field("task_memcg"),
            task: field("task"),
            pid,
            uid: field("uid").parse().unwrap_or(u32::MAX),
            anon_rss_bytes,
        });
    }
    kills
}

/// Samples every memory cgroup of the kubelet's pods every 100 ms, keeping the last reading
/// of each: a container's cgroup is removed with the container, so its peak and OOM kill
/// count must be read while it lives.
struct MemoryWatch {
    seen: Arc<Mutex<BTreeMap<String, CgroupMemory>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The memory hierarchy: v1's memory controller or the v2 tree.
fn memory_hierarchy() -> Option<Hierarchy> {
    Hierarchy::find(Path::new(DEFAULT_ROOT))
}

fn read_cgroup(hierarchy: &Hierarchy, dir: &Path) -> Option<CgroupMemory> {
    let name = dir.file_name()?.to_str()?.to_string();
    let parent = dir.parent()?.file_name()?.to_str()?.to_string();
    let (pod_uid, container_id) = if let Some(uid) = name.strip_prefix("pod") {
        (uid.to_string(), None)
    } else {
        (parent.strip_prefix("pod")?.to_string(), Some(name))
    };
    let group = Group::new(hierarchy.version(), dir.to_path_buf(), None);
    // v2 before Linux 5.19 has no memory.peak: the current usage is the best reading there.
    let peak = group.peak().or_else(|| {
        parse::number(&std::fs::read_to_string(dir.join(hierarchy.version().usage_file())).ok()?)
    })?;
    Some(CgroupMemory {
        path: dir
            .strip_prefix(hierarchy.memory_root())
            .unwrap_or(dir)
            .display()
            .to_string(),
        pod_uid,
        container_id,
        peak_bytes: peak,
        limit_bytes: group.limit().unwrap_or(u64::MAX),
        oom_kills: group.oom_kills().unwrap_or(0),
        last_seen: SystemTime::now(),
    })
}

/// The pod and container cgroups under `kubepods` (QoS classes `burstable`, `besteffort` in
/// between for pods that are not Guaranteed).
fn pod_cgroups(kubepods: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let children = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut pods = Vec::new();
    for c in children(kubepods) {
        let name = c
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if name.starts_with("pod") {
            pods.push(c);
        } else {
            pods.extend(children(&c).into_iter().filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("pod"))
            }));
        }
    }
    for pod in pods {
        out.extend(children(&pod));
        out.push(pod);
    }
    out
}

/// The kubelet's `kubepods` group under its cgroup root (`--cgroup-root`).
fn kubepods(hierarchy: &Hierarchy, cgroup_root: &str) -> PathBuf {
    hierarchy
        .memory_root()
        .join(cgroup_root.trim_start_matches('/'))
        .join("kubepods")
}

impl MemoryWatch {
    /// Watches the pods under the kubelet's `cgroup_root`; watches nothing on a machine
    /// without a memory hierarchy.
    fn start(cgroup_root: &str) -> MemoryWatch {
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let Some(hierarchy) = memory_hierarchy() else {
            return MemoryWatch {
                seen,
                stop,
                thread: None,
            };
        };
        let kubepods = kubepods(&hierarchy, cgroup_root);
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("cgroup-memory-watch".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    for dir in pod_cgroups(&kubepods) {
                        if let Some(m) = read_cgroup(&hierarchy, &dir) {
                            if let Ok(mut seen) = s.lock() {
                                seen.insert(m.path.clone(), m);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .ok();
        MemoryWatch { seen, stop, thread }
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running one-node cluster; stopped with tests/node/down.sh when dropped (or by
/// [`RealNode::stop`], which reports what was left behind).
pub struct RealNode {
    state: PathBuf,
    env: BTreeMap<String, String>,
    watch: Option<MemoryWatch>,
    stopped: bool,
}

fn read_env(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches(['\'', '"']).to_string()))
        .collect())
}

impl RealNode {
    /// Runs tests/node/up.sh in `state` (the control plane and the node), importing the image
    /// archives in `images`; `env` is passed on (e.g. `KUBE_CONTROLLER_MANAGER_EXTRA_ARGS`).
    /// The error holds up.sh's output.
    pub fn start(
        state: &Path,
        images: Option<&Path>,
        env: &[(&str, String)],
    ) -> Result<RealNode, String> {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("tests/node/up.sh"))
            .arg(state)
            .env("PATH", crate::chart::tools_path())
            .stdin(Stdio::null());
        if let Some(dir) = images {
            cmd.env("IMAGEINDEX_IMAGES_DIR", dir);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run tests/node/up.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tests/node/up.sh failed (build the node with tests/controlplane/build.sh --node, \
                 set up the machine with scripts/setup.sh):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut env = read_env(&state.join("env"))?;
        env.extend(read_env(&state.join("node.env"))?);
        let watch = MemoryWatch::start(env.get("CGROUP_ROOT").map_or("", String::as_str));
        Ok(RealNode {
            state: state.to_path_buf(),
            env,
            watch: Some(watch),
            stopped: false,
        })
    }

    /// A value of STATE_DIR/env or STATE_DIR/node.env (`NODE_NAME`, `NODE_IP`, `CGROUP_ROOT`,
    /// `CONTAINERD_SOCK`, `APISERVER_URL`, ...).
    pub fn env(&self, key: &str) -> &str {
        self.env
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{key} is not in the node's env files"))
    }

    /// Every pod and container memory cgroup seen so far, by path.
    pub fn cgroups(&self) -> Vec<CgroupMemory> {
        self.watch
            .as_ref()
            .and_then(|w| w.seen.lock().ok().map(|s| s.values().cloned().collect()))
            .unwrap_or_default()
    }

    /// The last reading of a container's memory cgroup (`containerID` without `containerd://`).
    pub fn container_memory(&self, container_id: &str) -> Option<CgroupMemory> {
        let id = container_id.trim_start_matches("containerd://");
        self.cgroups()
            .into_iter()
            .find(|c| c.container_id.as_deref() == Some(id))
    }

    /// The last reading of a pod's own memory cgroup (its containers and sandbox together).
    pub fn pod_memory(&self, pod_uid: &str) -> Option<CgroupMemory> {
        self.cgroups()
            .into_iter()
            .find(|c| c.container_id.is_none() && c.pod_uid == pod_uid)
    }

    /// The memory cgroup directories of the node's pods that exist now.
    pub fn live_cgroups(&self) -> Vec<PathBuf> {
        memory_hierarchy()
            .map(|h| pod_cgroups(&kubepods(&h, self.env("CGROUP_ROOT"))))
            .unwrap_or_default()
    }

    /// The kernel's OOM kills of a container's processes (`containerID`, with or without
    /// `containerd://`).
    pub fn oom_kills_of(&self, container_id: &str) -> Vec<KernelOomKill> {
        let id = container_id.trim_start_matches("containerd://");
        kernel_oom_kills()
            .into_iter()
            .filter(|k| !id.is_empty() && k.task_memcg.ends_with(id))
            .collect()
    }

    /// The uids (real, effective) of a running container's processes.
    pub fn process_uids(&self, container_id: &str) -> Vec<(u32, u32)> {
        let id = container_id.trim_start_matches("containerd://");
        let Some(dir) = self
            .live_cgroups()
            .into_iter()
            .find(|d| d.file_name().and_then(|n| n.to_str()) == Some(id))
        else {
            return Vec::new();
        };
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        procs
            .lines()
            .filter_map(|pid| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let uid = status.lines().find(|l| l.starts_with("Uid:"))?;
                let mut ids = uid.split_whitespace().skip(1).map(|v| v.parse().ok());
                Some((ids.next()??, ids.next()??))
            })
            .collect()
    }

    /// `ctr --namespace k8s.io ARGS` against the node's containerd; its stdout.
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ctr")
            .args([
                "--address",
                self.env("CONTAINERD_SOCK"),
                "--namespace",
                "k8s.io",
            ])
            .args(args)
            .output()
            .map_err(|e| format!("ctr: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "ctr {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The last `lines` lines of a node component's log (`kubelet`, `containerd`,
    /// `kube-proxy`, `kube-scheduler`).
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.state.join("node").join(format!("{component}.log")))
                .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the node and the control plane (tests/node/down.sh); the error lists what down.sh
    /// found left behind (processes, mounts, cgroups, the bridge, iptables chains).
    pub fn stop(&mut self) -> Result<(), String> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        self.watch.take();
        let out = Command::new("bash")
            .arg(repo().join("tests/node/down.sh"))
            .arg(&self.state)
            .env("PATH", crate::chart::tools_path())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run tests/node/down.sh: {e}"))?;
        // Its progress lines (timestamped), for the test's output.
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "tests/node/down.sh: exit {:?}\n{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_kernel_messages() {
        let messages: Vec<String> = [
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=abc,mems_allowed=0,oom_memcg=/r/kubepods/podu1,task_memcg=/r/kubepods/podu1/abc,task=indexer,pid=4321,uid=65532",
            "Memory cgroup out of memory: Killed process 4321 (indexer) total-vm:312000kB, anon-rss:51200kB, file-rss:2048kB, shmem-rss:0kB, UID:65532 pgtables:300kB oom_score_adj:0",
            "something else",
        ]
        .map(String::from)
        .to_vec();
        let kills = parse_oom_kills(&messages);
        assert_eq!(
            kills,
            [KernelOomKill {
                oom_memcg: "/r/kubepods/podu1".into(),
                task_memcg: "/r/kubepods/podu1/abc".into(),
                task: "indexer".into(),
                pid: 4321,
                uid: 65532,
                anon_rss_bytes: Some(51200 * 1024),
            }]
        );
    }
}
