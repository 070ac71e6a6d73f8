//! A throw-away Kubernetes control plane for the tests that need a real API server:
//! tests/controlplane/up.sh (etcd, kube-apiserver and kube-controller-manager v1.20.2 on
//! loopback; no scheduler, no kubelet) in a scratch directory, stopped with down.sh — when the
//! value is dropped, or, for one shared by every test of a binary ([`ControlPlane::start_shared`]),
//! when the test process exits. kubectl and helm run against it with a private helm home.
//! [`ControlPlane::start_with`] lets another script start it, e.g. tests/node/up.sh with a real
//! node beside it.

use crate::chart::{helm_bin, kubectl_bin, tools_path};
use crate::repo;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Set to `1` to skip the tests that need the control plane (they fail without it).
pub const SKIP_VAR: &str = "IMAGEINDEX_SKIP_APISERVER";

/// Whether the control-plane tests are to be skipped (`IMAGEINDEX_SKIP_APISERVER=1`); says
/// so on stderr for `test`.
pub fn skipped(test: &str) -> bool {
    let skip = std::env::var(SKIP_VAR).as_deref() == Ok("1");
    if skip {
        eprintln!("{test}: SKIPPED ({SKIP_VAR}=1): the real kube-apiserver scenarios did not run");
    }
    skip
}

/// How to start a control plane.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Prefix of the scratch directory's name.
    pub prefix: &'static str,
    /// Extra users authenticated by a static token: (user, token), group `imageindex`.
    pub users: Vec<(String, String)>,
    /// Extra flags of kube-controller-manager.
    pub controller_manager_args: Vec<String>,
}

/// A running control plane.
pub struct ControlPlane {
    dir: PathBuf,
    env: BTreeMap<String, String>,
    /// Stopped by its watchdog when the process exits, not on drop.
    shared: bool,
    /// Keep the scratch directory when dropped ([`ControlPlane::keep_dir`]).
    keep_dir: bool,
}

impl ControlPlane {
    /// Starts a control plane, stopped when dropped (panics with up.sh's output if it cannot
    /// start).
    pub fn start(options: &Options) -> ControlPlane {
        Self::up(options, false)
    }

    /// Starts a control plane that lives as long as this process: a detached watchdog runs
    /// down.sh and removes the scratch directory once the process is gone (however it ends).
    /// For one control plane shared by the tests of a binary (e.g. in a `OnceLock`).
    pub fn start_shared(options: &Options) -> ControlPlane {
        let cp = Self::up(options, true);
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; bash {down} {state} >/dev/null 2>&1; {remove}",
            pid = std::process::id(),
            down = repo().join("tests/controlplane/down.sh").display(),
            state = cp.state().display(),
            remove = if keep() {
                String::new()
            } else {
                format!("rm -rf {}", cp.dir.display())
            },
        );
        let mut watchdog = Command::new("bash");
        watchdog
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe; the watchdog leaves this process's session so
        // that a Ctrl-C to the tests does not stop it before it cleaned up.
        unsafe {
            watchdog.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        // Never waited for: the watchdog outlives this process by design.
        #[allow(clippy::zombie_processes)]
        watchdog
            .spawn()
            .expect("cannot start the control plane's watchdog");
        cp
    }

    /// Starts a control plane with `start` instead of tests/controlplane/up.sh: `start` gets
    /// up.sh's state directory and the environment up.sh reads for `options` (extra tokens,
    /// controller-manager flags), and runs a script that runs up.sh there and more (e.g.
    /// tests/node/up.sh: a real node too). Stopped and removed when dropped, as
    /// [`ControlPlane::start`]'s; what `start` returns comes beside it (stop it before the
    /// control plane drops). Panics with `start`'s error.
    pub fn start_with<T>(
        options: &Options,
        start: impl FnOnce(&Path, &[(&'static str, String)]) -> Result<T, String>,
    ) -> (ControlPlane, T) {
        Self::launch(options, false, start)
    }

    fn up(options: &Options, shared: bool) -> ControlPlane {
        let (cp, ()) = Self::launch(options, shared, |state, env| {
            let out = Command::new("bash")
                .arg(repo().join("tests/controlplane/up.sh"))
                .arg(state)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run tests/controlplane/up.sh: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "tests/controlplane/up.sh failed (build the control plane with \
                     tests/controlplane/build.sh, or set {SKIP_VAR}=1 to skip):\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        });
        cp
    }

    /// A scratch directory, the environment of up.sh for `options`, `start` run with both,
    /// then up.sh's env file read.
    fn launch<T>(
        options: &Options,
        shared: bool,
        start: impl FnOnce(&Path, &[(&'static str, String)]) -> Result<T, String>,
    ) -> (ControlPlane, T) {
        let prefix = if options.prefix.is_empty() {
            "imageindex-controlplane-"
        } else {
            options.prefix
        };
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("a temporary directory")
            .keep();
        let state = dir.join("state");
        let mut env = Vec::new();
        if !options.users.is_empty() {
            let tokens = dir.join("extra-tokens.csv");
            let lines: String = options
                .users
                .iter()
                .map(|(user, token)| format!("{token},{user},{user},\"imageindex\"\n"))
                .collect();
            std::fs::write(&tokens, lines).expect("writing the extra tokens");
            env.push(("EXTRA_TOKENS_FILE", tokens.display().to_string()));
        }
        if !options.controller_manager_args.is_empty() {
            let extra = format!(
                "{} {}",
                std::env::var("KUBE_CONTROLLER_MANAGER_EXTRA_ARGS").unwrap_or_default(),
                options.controller_manager_args.join(" ")
            );
            env.push((
                "KUBE_CONTROLLER_MANAGER_EXTRA_ARGS",
                extra.trim().to_string(),
            ));
        }
        // From here on the scratch directory is removed when `cp` is dropped (unless shared).
        let mut cp = ControlPlane {
            dir,
            env: BTreeMap::new(),
            shared,
            keep_dir: false,
        };
        let started = start(&state, &env).unwrap_or_else(|e| panic!("{e}"));
        cp.env = std::fs::read_to_string(state.join("env"))
            .expect("up.sh writes STATE_DIR/env")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches(['\'', '"']).to_string()))
            .collect();
        (cp, started)
    }

    /// Keeps the scratch directory when dropped, as IMAGEINDEX_KEEP_CLUSTER=1 does: e.g. a
    /// teardown left something behind that the state tells the next run to clean up.
    pub fn keep_dir(&mut self) {
        self.keep_dir = true;
    }

    /// The scratch directory (control-plane state, kubeconfigs, helm's home, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// up.sh's state directory.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// A value of STATE_DIR/env (`APISERVER_URL`, `APISERVER_PORT`, `CA_CERT`, `ADMIN_TOKEN`, ...).
    pub fn env(&self, key: &str) -> &str {
        self.env
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{key} is not in up.sh's env"))
    }

    /// The admin's kubeconfig (group system:masters).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.state().join("admin.kubeconfig")
    }

    /// A kubeconfig for `user` authenticated by `token` (same server and CA as the admin's),
    /// written into the scratch directory.
    pub fn kubeconfig_for(&self, user: &str, token: &str) -> PathBuf {
        let admin =
            std::fs::read_to_string(self.admin_kubeconfig()).expect("the admin's kubeconfig");
        let text = admin
            .replace(self.env("ADMIN_TOKEN"), token)
            .replace("name: admin", &format!("name: {user}"))
            .replace("user: admin", &format!("user: {user}"));
        let path = self.dir.join(format!("{user}.kubeconfig"));
        std::fs::write(&path, text).expect("writing a kubeconfig");
        path
    }

    /// A Kubernetes client from `kubeconfig`.
    pub async fn client(&self, kubeconfig: &Path) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("a readable kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("a usable kubeconfig");
        kube::Client::try_from(config).expect("a client")
    }

    /// A command with the admin's KUBECONFIG, a private helm home, and the tools' kubectl and
    /// helm first on PATH.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("KUBECONFIG", self.admin_kubeconfig())
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"))
            .env("PATH", tools_path())
            .stdin(Stdio::null());
        cmd
    }

    /// `kubectl ARGS`, whatever its outcome.
    pub fn kubectl_output(&self, args: &[&str]) -> Output {
        self.command(kubectl_bin())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    /// `kubectl ARGS`, its stdout; panics with its output if it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr_without_skew(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl ARGS -o json`, parsed.
    pub fn kubectl_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let text = self.kubectl(&args);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: not JSON ({e}): {text}"))
    }

    /// `helm ARGS`, its stdout; panics if it fails.
    pub fn helm(&self, args: &[&str]) -> String {
        let out = self
            .command(helm_bin())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("helm {args:?}: {e}"));
        crate::stdout_of_success(&out, &format!("helm {args:?}"))
    }
}

fn keep() -> bool {
    std::env::var("IMAGEINDEX_KEEP_CLUSTER").as_deref() == Ok("1")
}

impl Drop for ControlPlane {
    /// Stops the control plane and removes the scratch directory (unless
    /// IMAGEINDEX_KEEP_CLUSTER=1 or [`ControlPlane::keep_dir`]: then its path is printed). A
    /// shared one is left to its watchdog.
    fn drop(&mut self) {
        if self.shared {
            return;
        }
        let _ = Command::new("bash")
            .arg(repo().join("tests/controlplane/down.sh"))
            .arg(self.state())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if keep() {
            eprintln!("IMAGEINDEX_KEEP_CLUSTER=1: kept {}", self.dir.display());
        } else if self.keep_dir {
            eprintln!(
                "kept {} (a teardown left something behind)",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A command's stderr without kubectl's version-skew warning (kubectl is newer than 1.20).
pub fn stderr_without_skew(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("version difference") && !l.contains("skew"))
        .map(|l| format!("{l}\n"))
        .collect()
}
