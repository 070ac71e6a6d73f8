//! The local processes of an ImageIndex: the scan, each build attempt (`indexer exec-limited
//! ... -- indexer build ...`, so the attempt's pid is the build inside its own cgroup), and
//! the query service. Spawning, signalling and reading how they ended is here (local mode's
//! adapter to the decisions' observations: [`attempt_end`]); what an ending means is
//! `imageindex_crds::outcome::classify`'s call, as in the cluster.

use imageindex_crds::observation::AttemptEnd;
pub use imageindex_crds::observation::Stop;
use imageindex_crds::outcome::exit_code;
use imageindex_crds::ScanReport;
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use thiserror::Error;
use tokio::process::{Child, Command};

/// Why a local process could not be run or read.
#[derive(Debug, Error)]
pub enum ProcessError {
    /// No `indexer` binary was found.
    #[error("no indexer binary: {0}")]
    IndexerMissing(String),
    /// A process could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// What was started.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A log or output file could not be made.
    #[error("cannot write {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The scan ended badly.
    #[error("indexer scan {}: {message}", .dataset.display())]
    Scan {
        /// The dataset.
        dataset: PathBuf,
        /// Its exit code, if it exited.
        code: Option<i32>,
        /// What it said.
        message: String,
    },
}

/// Finds the `indexer` binary: `explicit` if given, else next to this executable (the same
/// cargo target directory or install prefix), else on `PATH`.
pub fn locate_indexer(
    explicit: Option<&Path>,
    this_exe: Option<&Path>,
    path_var: Option<&str>,
) -> Result<PathBuf, ProcessError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(ProcessError::IndexerMissing(format!(
                "--indexer-bin {} is not a file",
                p.display()
            )))
        };
    }
    let beside = this_exe
        .and_then(Path::parent)
        .map(|d| d.join("indexer"))
        .filter(|p| p.is_file());
    let on_path = || {
        path_var?
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join("indexer"))
            .find(|p| p.is_file())
    };
    beside.or_else(on_path).ok_or_else(|| {
        ProcessError::IndexerMissing(
            "not next to the operator binary nor on PATH; build it (`cargo build -p indexer`) or pass --indexer-bin".into(),
        )
    })
}

/// How a process ended: its exit code, or the signal that killed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal, when one killed it.
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// Reads an exit status.
    pub fn of(status: ExitStatus) -> Self {
        ExitInfo {
            code: status.code(),
            signal: status.signal(),
        }
    }

    /// The code a shell (and the kubelet) would report: the exit code or 128 + signal.
    pub fn exit_code(&self) -> Option<i32> {
        self.code.or(self.signal.map(|s| 128 + s))
    }
}

/// How an attempt ended, as local mode sees it: the exit (its code, or 128 + the signal that
/// killed it), the OOM killer's counter of its cgroup, and whether the operator stopped it.
pub fn attempt_end(exit: &ExitInfo, oom_kills: u64, stop: Option<Stop>) -> AttemptEnd {
    AttemptEnd {
        exit_code: exit.exit_code(),
        oom_kill_reported: oom_kills > 0,
        stopped: stop,
    }
}

/// The attempt's ending in words, for its status message.
pub fn describe_end(process: &str, exit: &ExitInfo, oom_kills: u64, stop: Option<Stop>) -> String {
    let mut text = match (exit.code, exit.signal) {
        (Some(code), _) => format!("{process} exited with code {code}"),
        (None, Some(9)) => format!("{process} was killed by SIGKILL (exit 137)"),
        (None, Some(sig)) => format!("{process} was killed by signal {sig} (exit {})", 128 + sig),
        (None, None) => format!("{process} ended without an exit code"),
    };
    if oom_kills > 0 {
        text.push_str(&format!(
            "; the kernel's OOM killer fired in its cgroup (oom_kill {oom_kills})"
        ));
    }
    match (stop, exit.code) {
        (Some(Stop::Interrupt), Some(exit_code::INTERRUPTED)) => {
            text.push_str(" after the operator asked it to stop; its checkpoint is intact")
        }
        (Some(Stop::Interrupt), _) => text.push_str(" after the operator asked it to stop"),
        (Some(Stop::Pressure), _) => {
            text.push_str(" after the operator stopped it under memory pressure")
        }
        (None, _) => {}
    }
    text
}

/// The message of the last error a build logged (its JSON log lines, or plain text).
pub fn last_error(log: &str) -> Option<String> {
    log.lines().rev().find_map(|line| {
        let line = line.trim();
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) if v.get("level").and_then(|l| l.as_str()) == Some("ERROR") => v
                .pointer("/fields/message")
                .and_then(|m| m.as_str())
                .map(|m| m.chars().take(300).collect()),
            Ok(_) => None,
            Err(_) => line
                .strip_prefix("error: ")
                .map(|m| m.chars().take(300).collect()),
        }
    })
}

/// Children run in their own process group, so a terminal's Ctrl-C reaches only the
/// operator (which stops them in order), and are sent SIGTERM if the operator dies.
fn detach_from_terminal_signals(cmd: &mut Command) {
    // SAFETY: setpgid and prctl are async-signal-safe and the closure touches no memory of
    // the parent. With PDEATHSIG a build whose operator died checkpoints and exits.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

fn create(path: &Path) -> Result<File, ProcessError> {
    File::create(path).map_err(|source| ProcessError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs `indexer scan DIR --json` and reads its report.
pub async fn scan(
    indexer: &Path,
    dataset: &Path,
    memory_limit: u64,
    threads: u32,
    shard: Option<&str>,
) -> Result<ScanReport, ProcessError> {
    let mut cmd = Command::new(indexer);
    cmd.arg("scan")
        .arg(dataset)
        .args(["--json", "--log-format", "json", "--memory-limit"])
        .arg(memory_limit.to_string())
        .arg("--threads")
        .arg(threads.to_string());
    if let Some(shard) = shard {
        cmd.args(["--shard", shard]);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    detach_from_terminal_signals(&mut cmd);
    let out = cmd.output().await.map_err(|source| ProcessError::Spawn {
        program: format!("{} scan", indexer.display()),
        source,
    })?;
    let fail = |message: String| ProcessError::Scan {
        dataset: dataset.to_path_buf(),
        code: out.status.code(),
        message,
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(fail(last_error(&stderr).unwrap_or_else(|| {
            format!("ended with {:?}", ExitInfo::of(out.status).exit_code())
        })));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| fail(format!("its report is not JSON: {e}")))
}

/// One build attempt's command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildCommand {
    /// The indexer binary.
    pub indexer: PathBuf,
    /// The dataset directory.
    pub dataset: PathBuf,
    /// The index directory (`--out`).
    pub index: PathBuf,
    /// The preset label.
    pub preset: String,
    /// The memory limit in bytes (the cgroup's and the build's plan).
    pub memory_limit: u64,
    /// Extraction threads.
    pub threads: u32,
    /// Loopback port of the build's `/metrics`.
    pub metrics_port: u16,
    /// Name of the attempt's cgroup (under `imageindex/`).
    pub cgroup: String,
    /// The shard to build (`I/N`), if the index is sharded.
    pub shard: Option<String>,
}

impl BuildCommand {
    /// `exec-limited --memory-limit Q --name G -- indexer build ...`.
    pub fn args(&self) -> Vec<OsString> {
        let limit = self.memory_limit.to_string();
        let mut args: Vec<OsString> = [
            "--log-format",
            "json",
            "exec-limited",
            "--memory-limit",
            &limit,
            "--name",
            &self.cgroup,
            "--",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push(self.indexer.clone().into_os_string());
        args.extend(["build".into(), self.dataset.clone().into_os_string()]);
        args.extend(["--out".into(), self.index.clone().into_os_string()]);
        for (flag, value) in [
            ("--preset", self.preset.clone()),
            ("--memory-limit", limit.clone()),
            ("--threads", self.threads.to_string()),
            ("--metrics-addr", format!("127.0.0.1:{}", self.metrics_port)),
            ("--log-format", "json".into()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        if let Some(shard) = &self.shard {
            args.push("--shard".into());
            args.push(shard.into());
        }
        args.push("--json".into());
        args
    }

    /// Starts the attempt: stdout (the build's JSON summary) to `summary`, its log to `log`.
    pub fn spawn(&self, log: &Path, summary: &Path) -> Result<BuildProcess, ProcessError> {
        let mut cmd = Command::new(&self.indexer);
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(create(summary)?)
            .stderr(create(log)?);
        detach_from_terminal_signals(&mut cmd);
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            program: format!("{} exec-limited", self.indexer.display()),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        Ok(BuildProcess { child, pid })
    }
}

/// A running child process.
#[derive(Debug)]
pub struct BuildProcess {
    child: Child,
    /// Its process id.
    pub pid: u32,
}

impl BuildProcess {
    fn signal(&self, signal: libc::c_int) {
        // Only while it has not been reaped, so the pid cannot belong to another process.
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Asks it to stop (SIGTERM: the build finishes its checkpoint and exits 6).
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Stops it now (SIGKILL).
    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// Waits for it to end (cancel-safe).
    pub async fn wait(&mut self) -> std::io::Result<ExitInfo> {
        self.child.wait().await.map(ExitInfo::of)
    }

    /// Whether it has ended (without waiting).
    pub fn try_wait(&mut self) -> Option<ExitInfo> {
        self.child.try_wait().ok().flatten().map(ExitInfo::of)
    }
}

/// Starts `program args…` in its own process group (terminal signals are the parent's to
/// forward), with stdout and stderr to `log`.
pub fn spawn_logged(
    program: &Path,
    args: &[OsString],
    log: &Path,
) -> Result<BuildProcess, ProcessError> {
    let out = create(log)?;
    let err = out.try_clone().map_err(|source| ProcessError::File {
        path: log.to_path_buf(),
        source,
    })?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    detach_from_terminal_signals(&mut cmd);
    let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        program: format!(
            "{} {}",
            program.display(),
            // The command: the first argument that is not a flag or its value.
            args.iter()
                .map(|a| a.to_string_lossy())
                .find(|a| !a.starts_with('-') && a != "json")
                .unwrap_or_default()
        ),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    Ok(BuildProcess { child, pid })
}

/// Starts `indexer serve INDEX --addr ADDR`, logging to `log`.
pub fn serve(
    indexer: &Path,
    index: &Path,
    dataset: &Path,
    addr: std::net::SocketAddr,
    log: &Path,
) -> Result<BuildProcess, ProcessError> {
    let args: Vec<OsString> = vec![
        "--log-format".into(),
        "json".into(),
        "serve".into(),
        index.into(),
        "--addr".into(),
        addr.to_string().into(),
        "--dataset".into(),
        dataset.into(),
        "--watch".into(),
    ];
    spawn_logged(indexer, &args, log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> ExitInfo {
        ExitInfo {
            code: Some(code),
            signal: None,
        }
    }

    fn killed(signal: i32) -> ExitInfo {
        ExitInfo {
            code: None,
            signal: Some(signal),
        }
    }

    #[test]
    fn endings_are_observed_with_the_cgroup_counter_and_the_stop() {
        use imageindex_crds::outcome::classify;
        use imageindex_crds::pressure::MemorySample;
        use imageindex_crds::types::AttemptOutcome::*;
        let near = MemorySample {
            at_ms: 0,
            working_set: 90,
            limit: 100,
        };
        let none = None::<MemorySample>;
        let cases = [
            (exited(0), 0, None, none, Succeeded),
            (exited(0), 0, Some(Stop::Interrupt), None, Succeeded),
            (exited(0), 0, Some(Stop::Pressure), None, Succeeded),
            (killed(9), 1, None, None, OomKilled),
            (exited(1), 1, None, None, OomKilled),
            // A SIGKILL the cgroup did not count is the OOM killer's only at the limit.
            (killed(9), 0, None, Some(near), OomKilled),
            (exited(137), 0, None, Some(near), OomKilled),
            (killed(9), 0, None, None, Killed),
            (exited(137), 0, None, None, Killed),
            (killed(9), 0, Some(Stop::Interrupt), None, Interrupted),
            (exited(6), 0, Some(Stop::Interrupt), None, Interrupted),
            (exited(6), 0, None, None, Interrupted),
            (killed(15), 0, None, None, Interrupted),
            (
                exited(6),
                0,
                Some(Stop::Pressure),
                None,
                MemoryPressureRestart,
            ),
            (
                killed(9),
                0,
                Some(Stop::Pressure),
                None,
                MemoryPressureRestart,
            ),
            (exited(1), 0, None, None, Failed),
            (exited(3), 0, None, None, Failed),
        ];
        for (exit, ooms, stop, last, want) in cases {
            let end = attempt_end(&exit, ooms, stop);
            assert_eq!(
                classify(&end, last.as_ref()),
                want,
                "{exit:?} {ooms} {stop:?} {last:?}"
            );
        }
        assert_eq!(killed(9).exit_code(), Some(137));
        assert_eq!(exited(6).exit_code(), Some(6));
    }

    #[test]
    fn endings_read_well() {
        assert_eq!(
            describe_end("process x-build-1 (pid 7)", &killed(9), 1, None),
            "process x-build-1 (pid 7) was killed by SIGKILL (exit 137); the kernel's OOM killer fired in its cgroup (oom_kill 1)"
        );
        assert_eq!(
            describe_end("p", &exited(6), 0, Some(Stop::Interrupt)),
            "p exited with code 6 after the operator asked it to stop; its checkpoint is intact"
        );
        assert!(describe_end("p", &exited(6), 0, Some(Stop::Pressure)).contains("memory pressure"));
    }

    #[test]
    fn last_error_of_json_and_text_logs() {
        let log = r#"{"level":"INFO","fields":{"message":"build planned"}}
{"level":"ERROR","fields":{"message":"no writable cgroup memory controller"}}
{"level":"INFO","fields":{"message":"bye"}}
"#;
        assert_eq!(
            last_error(log).as_deref(),
            Some("no writable cgroup memory controller")
        );
        assert_eq!(
            last_error("error: dataset gone\n").as_deref(),
            Some("dataset gone")
        );
        assert_eq!(last_error("fine\n"), None);
    }

    #[test]
    fn build_command_line() {
        let cmd = BuildCommand {
            indexer: "/bin/indexer".into(),
            dataset: "/data/cats".into(),
            index: "/state/index".into(),
            preset: "medium".into(),
            memory_limit: 80 << 20,
            threads: 2,
            metrics_port: 9100,
            shard: None,
            cgroup: "cats-build-2-77".into(),
        };
        let line: Vec<String> = cmd
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            line.join(" "),
            "--log-format json exec-limited --memory-limit 83886080 --name cats-build-2-77 -- /bin/indexer build /data/cats --out /state/index --preset medium --memory-limit 83886080 --threads 2 --metrics-addr 127.0.0.1:9100 --log-format json --json"
        );
    }

    #[test]
    fn the_indexer_is_found_beside_or_on_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("indexer");
        std::fs::write(&bin, "").unwrap();
        let me = dir.path().join("operator");
        assert_eq!(locate_indexer(None, Some(&me), None).unwrap(), bin);
        let elsewhere = Path::new("/nonexistent/operator");
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(
            locate_indexer(None, Some(elsewhere), Some(&path)).unwrap(),
            bin
        );
        assert!(locate_indexer(None, Some(elsewhere), Some("/nonexistent")).is_err());
        assert_eq!(locate_indexer(Some(&bin), None, None).unwrap(), bin);
        assert!(locate_indexer(Some(elsewhere), None, None).is_err());
    }
}
