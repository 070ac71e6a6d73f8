//! A container without an image runtime: the container's process gets its own mount
//! namespace and a root directory laid out like a container's, and is started inside its
//! cgroup.
//!
//! The root (`<pod dir>/rootfs`) is a skeleton on the host: directories the system mounts land
//! on, the host's top-level symlinks (`/bin -> usr/bin`, …), placeholder files for `/dev`
//! entries and for the image's binaries. Between fork and exec the child
//! 1. joins its cgroups (writes `0` to their `cgroup.procs`), starts a session;
//! 2. `unshare(CLONE_NEWNS)` and makes every mount private, so nothing it mounts is seen by the
//!    host;
//! 3. bind-mounts into the skeleton: the host's `/usr` read-only, an overlay of the host's
//!    `/etc` with a per-pod upper layer (so volumes can be mounted under `/etc` without
//!    touching the host's), `/proc`, `/sys` (read-only), the `/dev` devices, a tmpfs at
//!    `/dev/shm`, the image's binaries under `/opt/imageindex/bin`, the termination-message
//!    file, the service-account directory and the pod's volumes;
//! 4. makes the root read-only if `readOnlyRootFilesystem`, `chroot`s into it, changes to the
//!    working directory, drops to `runAsUser`/`runAsGroup`, asks for SIGKILL if the agent dies;
//! 5. execs the command.
//!
//! Host paths therefore never change: mount points exist only in the skeleton or in the
//! overlay's upper layer, and the mounts vanish with the container's last process.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;

/// Where the image's binaries are mounted inside the container (first on `PATH`).
pub const IMAGE_BIN_DIR: &str = "/opt/imageindex/bin";
/// The `PATH` of every container (the images' binaries first).
pub const CONTAINER_PATH: &str =
    "/opt/imageindex/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Host trees bound read-only into every container.
const HOST_TREES: [&str; 1] = ["usr"];
/// Kernel filesystems bound from the host (read-only for `/sys`).
const KERNEL_TREES: [(&str, bool); 2] = [("proc", false), ("sys", true)];
/// Device nodes bound from the host's `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
/// `/dev` symlinks every container has.
const DEV_LINKS: [(&str, &str); 4] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// What is mounted at a path inside the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountKind {
    /// A host file or directory, recursively bound.
    Bind(PathBuf),
    /// A fresh tmpfs with these options.
    Tmpfs(String),
    /// An overlay: a host directory below, a per-pod directory on top.
    Overlay {
        /// The host directory.
        lower: PathBuf,
        /// Where the container's changes go.
        upper: PathBuf,
        /// The overlay's work directory (same filesystem as `upper`).
        work: PathBuf,
    },
}

/// One mount of the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Absolute path inside the container.
    pub target: String,
    /// What is mounted there.
    pub kind: MountKind,
    /// Mounted read-only.
    pub read_only: bool,
}

/// A pod's root directory skeleton.
#[derive(Clone, Debug)]
pub struct Rootfs {
    /// The root directory on the host.
    pub root: PathBuf,
    /// The upper layer of the `/etc` overlay.
    etc_upper: PathBuf,
    etc_work: PathBuf,
}

fn relative_components(target: &str) -> io::Result<Vec<String>> {
    let path = Path::new(target);
    if !path.is_absolute() {
        return Err(io::Error::other(format!(
            "{target:?} is not an absolute path"
        )));
    }
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            _ => {
                return Err(io::Error::other(format!(
                    "{target:?} may not contain `.` or `..`"
                )))
            }
        }
    }
    Ok(parts)
}

fn host_top_level_links() -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir("/") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let target = fs::read_link(e.path()).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), target))
        })
        .collect()
}

impl Rootfs {
    /// Lays out the skeleton under `pod_dir`.
    pub fn create(pod_dir: &Path) -> io::Result<Rootfs> {
        let rootfs = Rootfs {
            root: pod_dir.join("rootfs"),
            etc_upper: pod_dir.join("etc-overlay/upper"),
            etc_work: pod_dir.join("etc-overlay/work"),
        };
        let root = &rootfs.root;
        for dir in [root, &rootfs.etc_upper, &rootfs.etc_work] {
            fs::create_dir_all(dir)?;
        }
        for dir in HOST_TREES
            .iter()
            .chain(KERNEL_TREES.iter().map(|(d, _)| d))
            .chain(
                [
                    "etc",
                    "dev/shm",
                    "run",
                    "var/run",
                    "root",
                    "opt/imageindex/bin",
                ]
                .iter(),
            )
        {
            fs::create_dir_all(root.join(dir))?;
        }
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))?;
        for (name, target) in host_top_level_links() {
            let link = root.join(&name);
            if fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(&target, &link)?;
            }
        }
        for dev in DEVICES {
            fs::File::create(root.join("dev").join(dev))?;
        }
        for (name, target) in DEV_LINKS {
            let link = root.join("dev").join(name);
            if fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(target, &link)?;
            }
        }
        Ok(rootfs)
    }

    /// The mounts every container of the pod gets (before its own).
    pub fn system_mounts(&self) -> Vec<Mount> {
        let mut mounts: Vec<Mount> = HOST_TREES
            .iter()
            .map(|d| Mount {
                target: format!("/{d}"),
                kind: MountKind::Bind(PathBuf::from("/").join(d)),
                read_only: true,
            })
            .collect();
        mounts.push(Mount {
            target: "/etc".into(),
            kind: MountKind::Overlay {
                lower: PathBuf::from("/etc"),
                upper: self.etc_upper.clone(),
                work: self.etc_work.clone(),
            },
            read_only: false,
        });
        for (tree, read_only) in KERNEL_TREES {
            mounts.push(Mount {
                target: format!("/{tree}"),
                kind: MountKind::Bind(PathBuf::from("/").join(tree)),
                read_only,
            });
        }
        for dev in DEVICES {
            mounts.push(Mount {
                target: format!("/dev/{dev}"),
                kind: MountKind::Bind(PathBuf::from("/dev").join(dev)),
                read_only: false,
            });
        }
        mounts.push(Mount {
            target: "/dev/shm".into(),
            kind: MountKind::Tmpfs("mode=1777,size=65536k".into()),
            read_only: false,
        });
        mounts
    }

    /// Creates what a mount at `target` lands on (a directory, or an empty file when
    /// `is_dir` is false) and returns its host path. Mount points under `/etc` go into the
    /// overlay's upper layer; under the host's read-only trees they are refused.
    pub fn placeholder(&self, target: &str, is_dir: bool) -> io::Result<PathBuf> {
        let parts = relative_components(target)?;
        let Some(top) = parts.first() else {
            return Err(io::Error::other("cannot mount over the root directory"));
        };
        let links = host_top_level_links();
        if HOST_TREES.contains(&top.as_str())
            || KERNEL_TREES.iter().any(|(d, _)| d == top)
            || links.iter().any(|(l, _)| l == top)
        {
            return Err(io::Error::other(format!(
                "mount path {target} is inside the host's /{top}, which the test node agent \
                 shares read-only with every container"
            )));
        }
        let host = if top == "etc" {
            parts[1..]
                .iter()
                .fold(self.etc_upper.clone(), |p, c| p.join(c))
        } else {
            parts.iter().fold(self.root.clone(), |p, c| p.join(c))
        };
        if is_dir {
            fs::create_dir_all(&host)?;
        } else {
            if let Some(parent) = host.parent() {
                fs::create_dir_all(parent)?;
            }
            if !host.exists() {
                fs::File::create(&host)?;
            }
        }
        Ok(host)
    }

    /// Whether `path` (absolute, inside the container) names an existing file of the image
    /// or the host trees the container sees.
    pub fn exists_inside(&self, path: &str) -> bool {
        let Ok(parts) = relative_components(path) else {
            return false;
        };
        let in_skeleton = parts.iter().fold(self.root.clone(), |p, c| p.join(c));
        if in_skeleton.is_file() {
            return true;
        }
        // /usr/..., /bin/... (-> usr/bin on the host), /etc/...: the host's own files.
        let Some(top) = parts.first() else {
            return false;
        };
        let shared = HOST_TREES.contains(&top.as_str())
            || top == "etc"
            || host_top_level_links().iter().any(|(l, _)| l == top);
        shared
            && parts
                .iter()
                .fold(PathBuf::from("/"), |p, c| p.join(c))
                .is_file()
    }

    /// Removes the skeleton, refusing if anything is still mounted under it in this (the
    /// host's) mount namespace — the container's mounts are private, so this only fails if
    /// something is wrong, and then nothing of the host is deleted through a mount.
    pub fn remove(&self, pod_dir: &Path) -> io::Result<()> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = pod_dir.to_string_lossy().into_owned();
        if let Some(line) = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&prefix)))
        {
            return Err(io::Error::other(format!(
                "not removing {}: still mounted on the host: {line}",
                pod_dir.display()
            )));
        }
        for dir in [self.root.clone(), pod_dir.join("etc-overlay")] {
            match fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
            }
        }
        Ok(())
    }
}

/// The user a container runs as (`securityContext.runAsUser` / `runAsGroup`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Everything needed to start one container process.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The pod's root skeleton.
    pub root: PathBuf,
    /// The mounts, system ones first, each parent before what is mounted below it.
    pub mounts: Vec<Mount>,
    /// `securityContext.readOnlyRootFilesystem`.
    pub read_only_root: bool,
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<PathBuf>,
    /// Run as this user (root otherwise).
    pub user: Option<User>,
    /// `workingDir` (default `/`).
    pub workdir: String,
    /// The program, an absolute path inside the container.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its whole environment.
    pub env: Vec<(String, String)>,
    /// Where stdout and stderr go.
    pub log: PathBuf,
}

fn cstring(text: impl AsRef<[u8]>) -> io::Result<CString> {
    CString::new(text.as_ref()).map_err(|_| io::Error::other("a path contains a NUL byte"))
}

/// One mount(2) call prepared before fork (no allocation in the child).
struct MountCall {
    source: Option<CString>,
    target: CString,
    fstype: Option<CString>,
    flags: libc::c_ulong,
    data: Option<CString>,
    /// Remount read-only afterwards (bind mounts ignore MS_RDONLY on the first call).
    then_read_only: bool,
    /// Written to the container's log if the call fails.
    what: CString,
}

fn opt_ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// Writes `message` and the OS error to stderr (the container log) from the child; returns
/// the error for `spawn` to report.
fn child_error(message: &CString) -> io::Error {
    let err = io::Error::last_os_error();
    let bytes = message.as_bytes();
    // SAFETY: write(2) on fd 2 with a valid buffer; async-signal-safe.
    unsafe {
        libc::write(2, bytes.as_ptr().cast(), bytes.len());
    }
    err
}

fn prepare_mounts(launch: &Launch) -> io::Result<Vec<MountCall>> {
    let mut calls = Vec::new();
    // The root itself becomes a mount point, so that it can be made read-only.
    let root = cstring(launch.root.as_os_str().as_bytes())?;
    calls.push(MountCall {
        source: Some(root.clone()),
        target: root.clone(),
        fstype: None,
        flags: libc::MS_BIND | libc::MS_REC,
        data: None,
        then_read_only: false,
        what: cstring("node agent: cannot bind the container's root onto itself\n")?,
    });
    for m in &launch.mounts {
        let parts = relative_components(&m.target)?;
        let host_target = parts.iter().fold(launch.root.clone(), |p, c| p.join(c));
        let target = cstring(host_target.as_os_str().as_bytes())?;
        let what = cstring(format!("node agent: cannot mount {}\n", m.target))?;
        let call = match &m.kind {
            MountKind::Bind(source) => MountCall {
                source: Some(cstring(source.as_os_str().as_bytes())?),
                target,
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
                then_read_only: m.read_only,
                what,
            },
            MountKind::Tmpfs(options) => MountCall {
                source: Some(cstring("tmpfs")?),
                target,
                fstype: Some(cstring("tmpfs")?),
                flags: libc::MS_NOSUID
                    | libc::MS_NODEV
                    | if m.read_only { libc::MS_RDONLY } else { 0 },
                data: Some(cstring(options)?),
                then_read_only: false,
                what,
            },
            MountKind::Overlay { lower, upper, work } => MountCall {
                source: Some(cstring("overlay")?),
                target,
                fstype: Some(cstring("overlay")?),
                flags: if m.read_only || launch.read_only_root {
                    libc::MS_RDONLY
                } else {
                    0
                },
                data: Some(cstring(format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.display(),
                    upper.display(),
                    work.display()
                ))?),
                then_read_only: false,
                what,
            },
        };
        calls.push(call);
    }
    Ok(calls)
}

/// Starts the container's process (see the module documentation for what happens between
/// fork and exec). Fails with the errno of the step that failed; the step is named in the log.
pub fn spawn(launch: &Launch) -> io::Result<tokio::process::Child> {
    let calls = prepare_mounts(launch)?;
    let root = cstring(launch.root.as_os_str().as_bytes())?;
    let workdir = cstring(&launch.workdir)?;
    let procs: Vec<CString> = launch
        .cgroup_procs
        .iter()
        .map(|p| cstring(p.as_os_str().as_bytes()))
        .collect::<io::Result<_>>()?;
    let slash = cstring("/")?;
    let read_only_root = launch.read_only_root;
    let user = launch.user.clone();
    let groups: Vec<libc::gid_t> = user.as_ref().map(|u| u.groups.clone()).unwrap_or_default();
    let parent = std::process::id() as libc::pid_t;
    let messages = [
        cstring("node agent: cannot join the container's cgroup\n")?,
        cstring("node agent: cannot start a session\n")?,
        cstring("node agent: cannot make a private mount namespace\n")?,
        cstring("node agent: cannot make the root read-only\n")?,
        cstring(format!(
            "node agent: cannot chroot/chdir into {}\n",
            launch.workdir
        ))?,
        cstring("node agent: cannot switch to the container's user\n")?,
        cstring("node agent: the agent is gone\n")?,
    ];

    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launch.log)?;
    let mut cmd = tokio::process::Command::new(&launch.program);
    cmd.args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child_setup = move || -> io::Result<()> {
        // SAFETY: only async-signal-safe system calls on memory prepared before fork.
        unsafe {
            for p in &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(child_error(&messages[0]));
                }
                libc::close(fd);
            }
            if libc::setsid() < 0 {
                return Err(child_error(&messages[1]));
            }
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
            {
                return Err(child_error(&messages[2]));
            }
            for c in &calls {
                if libc::mount(
                    opt_ptr(&c.source),
                    c.target.as_ptr(),
                    opt_ptr(&c.fstype),
                    c.flags,
                    opt_ptr(&c.data).cast(),
                ) != 0
                {
                    return Err(child_error(&c.what));
                }
                if c.then_read_only
                    && libc::mount(
                        std::ptr::null(),
                        c.target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        std::ptr::null(),
                    ) != 0
                {
                    return Err(child_error(&c.what));
                }
            }
            if read_only_root
                && libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                ) != 0
            {
                return Err(child_error(&messages[3]));
            }
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(workdir.as_ptr()) != 0 {
                return Err(child_error(&messages[4]));
            }
            if let Some(u) = &user {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(u.gid) != 0
                    || libc::setuid(u.uid) != 0
                {
                    return Err(child_error(&messages[5]));
                }
            }
            // After the uid change, which clears it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != parent
            {
                return Err(child_error(&messages[6]));
            }
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe system calls (see above).
    unsafe {
        cmd.pre_exec(child_setup);
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_stay_inside_the_pod() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = Rootfs::create(dir.path()).unwrap();
        let p = rootfs.placeholder("/dataset", true).unwrap();
        assert_eq!(p, rootfs.root.join("dataset"));
        assert!(p.is_dir());
        let f = rootfs.placeholder("/dev/termination-log", false).unwrap();
        assert!(f.is_file());
        let e = rootfs.placeholder("/etc/imageindex", true).unwrap();
        assert!(e.starts_with(dir.path().join("etc-overlay/upper")));
        assert!(rootfs.placeholder("/usr/share/x", true).is_err());
        assert!(rootfs.placeholder("/proc/x", true).is_err());
        assert!(rootfs.placeholder("relative", true).is_err());
        assert!(rootfs.placeholder("/a/../b", true).is_err());
        assert!(!Path::new("/dataset").exists() || Path::new("/dataset").is_dir());
        rootfs.remove(dir.path()).unwrap();
        assert!(!rootfs.root.exists());
    }
}
