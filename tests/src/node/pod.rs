//! One pod's life on the node: prepare its sandbox (volumes, token, address, root, cgroup),
//! run its container, probe it, restart it or report how it ended, stop it when deleted.

use crate::node::cgroup::{parse_cpu_millis, ContainerGroup, Limits};
use crate::node::expand::expand;
use crate::node::probe::{ProbeSpec, ProbeState};
use crate::node::sandbox::{self, Launch, Mount, MountKind, Rootfs, User, CONTAINER_PATH};
use crate::node::status::{self, ContainerView, Phase, PodView, State, Terminated};
use crate::node::volumes::{self, VolumeError};
use crate::node::{delete_params_now, ContainerRun, PodRecord, RunEnd, Shared};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount};
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the dispatcher tells a pod's supervisor.
#[derive(Debug)]
pub(crate) enum PodEvent {
    /// The pod object changed (e.g. it got a deletionTimestamp).
    Updated(Box<Pod>),
    /// The pod object is gone.
    Deleted,
}

/// Why a supervisor stops running the container.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    /// Graceful deletion: stop within the grace period, then remove the object.
    Delete(Duration),
    /// The object is gone (force-deleted): kill now.
    Gone,
    /// The agent stops: kill now, write nothing.
    Shutdown,
}

/// How a pod's life on the node ended.
enum Outcome {
    /// The container ended for good; the object stays with its final status.
    Finished,
    /// Stopped for a reason in [`Stop`].
    Stopped(Stop),
}

/// Why the sandbox could not be prepared (the container waits with this reason).
struct NotStarted {
    reason: &'static str,
    message: String,
}

/// A pod's prepared sandbox.
struct Sandbox {
    rootfs: Rootfs,
    group: ContainerGroup,
    launch: Launch,
    readiness: Option<ProbeSpec>,
    liveness: Option<ProbeSpec>,
    termination_file: PathBuf,
    fallback_to_logs: bool,
    service_account: Option<(String, PathBuf)>,
}

pub(crate) async fn event(
    shared: &Shared,
    pod: &Pod,
    warning: bool,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = shared.recorder.publish(&ev, &pod.object_ref(&())).await {
        shared
            .state
            .log
            .line(format!("event {reason} for {}: {e}", pod.name_any()));
    }
}

/// Removes the pod object now (grace period 0, only if it is still this pod).
pub(crate) async fn delete_now(shared: &Shared, pod: &Pod) {
    let api: Api<Pod> =
        Api::namespaced(shared.client.clone(), &pod.namespace().unwrap_or_default());
    match api
        .delete(&pod.name_any(), &delete_params_now(pod.uid()))
        .await
    {
        Ok(_) => shared.state.log.line(format!(
            "removed {}/{}",
            pod.namespace().unwrap_or_default(),
            pod.name_any()
        )),
        Err(kube::Error::Api(s)) if s.is_not_found() || s.code == 409 => {}
        Err(e) => shared
            .state
            .log
            .line(format!("removing {}: {e}", pod.name_any())),
    }
}

/// Runs pod `pod` on this node until it ends, is deleted, or the agent stops.
pub(crate) async fn supervise(
    shared: Arc<Shared>,
    pod: Pod,
    events: mpsc::UnboundedReceiver<PodEvent>,
    shutdown: watch::Receiver<bool>,
) {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let uid = pod.uid().unwrap_or_default();
    let dir = shared
        .config
        .state_dir
        .join("pods")
        .join(format!("{ns}_{name}_{uid}"));
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first().cloned())
        .unwrap_or_default();
    let now = SystemTime::now();
    if let Ok(mut r) = shared.state.records.lock() {
        r.pods.insert(
            uid.clone(),
            PodRecord {
                namespace: ns.clone(),
                name: name.clone(),
                uid: uid.clone(),
                labels: pod.labels().clone(),
                ip: None,
                cgroups: Vec::new(),
                dir: dir.clone(),
                torn_down: false,
            },
        );
    }
    let image = container.image.clone().unwrap_or_default();
    let image_id = shared
        .config
        .binary_for(&image)
        .map(|b| format!("file://{}", b.display()))
        .unwrap_or_default();
    let mut s = Supervisor {
        view: PodView {
            phase: Phase::Pending,
            host_ip: "127.0.0.1".into(),
            pod_ip: None,
            start_time: now,
            container: ContainerView {
                name: container.name.clone(),
                image,
                image_id,
                state: State::Waiting {
                    reason: "ContainerCreating".into(),
                    message: None,
                },
                last: None,
                ready: false,
                restart_count: 0,
                container_id: None,
            },
            ready_since: now,
        },
        shared,
        pod,
        ns,
        name,
        uid,
        dir,
        events,
        shutdown,
        ip: None,
        sandbox: None,
        last_patch: None,
        token_refresh: None,
    };
    s.log(format!("accepted, image {}", s.view.container.image));
    let outcome = s.lifecycle().await;
    s.teardown().await;
    if let Outcome::Stopped(Stop::Delete(_)) = outcome {
        delete_now(&s.shared, &s.pod).await;
    }
}

struct Supervisor {
    shared: Arc<Shared>,
    pod: Pod,
    ns: String,
    name: String,
    uid: String,
    dir: PathBuf,
    events: mpsc::UnboundedReceiver<PodEvent>,
    shutdown: watch::Receiver<bool>,
    view: PodView,
    ip: Option<Ipv4Addr>,
    sandbox: Option<Sandbox>,
    last_patch: Option<Value>,
    token_refresh: Option<Instant>,
}

fn deletion_grace(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or(pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds))
        .unwrap_or(30);
    Duration::from_secs(secs.max(0) as u64)
}

fn exit_code(status: std::process::ExitStatus) -> (i32, Option<i32>) {
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(sig)) => (128 + sig, Some(sig)),
        (None, None) => (255, None),
    }
}

/// The termination message: the file's first 4 KiB, else (FallbackToLogsOnError, on error) the
/// log's last 80 lines / 2 KiB.
fn termination_message(file: &Path, log: &Path, fallback: bool, exit_code: i32) -> Option<String> {
    let text = std::fs::read(file).ok().map(|b| {
        let b = &b[..b.len().min(4096)];
        String::from_utf8_lossy(b).into_owned()
    });
    match text {
        Some(t) if !t.is_empty() => Some(t),
        _ if fallback && exit_code != 0 => {
            let tail = super::tail(log, 80);
            let start = tail.len().saturating_sub(2048);
            let start = (start..=tail.len())
                .find(|i| tail.is_char_boundary(*i))
                .unwrap_or(0);
            Some(tail[start..].to_string()).filter(|t| !t.is_empty())
        }
        _ => None,
    }
}

impl Supervisor {
    fn log(&self, message: impl AsRef<str>) {
        self.shared
            .state
            .log
            .line(format!("{}/{}: {}", self.ns, self.name, message.as_ref()));
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    /// Writes the status (if it changed); false once the pod object is gone.
    async fn patch(&mut self) -> bool {
        let status = status::render(&self.view);
        if self.last_patch.as_ref() == Some(&status) {
            return true;
        }
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.ns);
        for attempt in 0..5 {
            match api
                .patch_status(
                    &self.name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await
            {
                Ok(_) => {
                    self.last_patch = Some(status);
                    return true;
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => return false,
                Err(e) => {
                    self.log(format!("status patch (attempt {}): {e}", attempt + 1));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        true
    }

    async fn event(&self, warning: bool, reason: &str, action: &str, note: String) {
        event(&self.shared, &self.pod, warning, reason, action, note).await;
    }

    /// Handles one event; `Some` when the container must stop.
    fn on_event(&mut self, event: Option<PodEvent>) -> Option<Stop> {
        match event {
            Some(PodEvent::Updated(pod)) => {
                let deleting = pod.metadata.deletion_timestamp.is_some();
                self.pod = *pod;
                deleting.then(|| Stop::Delete(deletion_grace(&self.pod)))
            }
            Some(PodEvent::Deleted) | None => Some(Stop::Gone),
        }
    }

    /// Waits `duration` for a reason to stop.
    async fn wait(&mut self, duration: Duration) -> Option<Stop> {
        let deadline = Instant::now() + duration;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return None,
                ev = self.events.recv() => {
                    if let Some(stop) = self.on_event(ev) {
                        return Some(stop);
                    }
                }
                _ = self.shutdown.changed() => return Some(Stop::Shutdown),
            }
        }
    }

    async fn lifecycle(&mut self) -> Outcome {
        if self.pod.metadata.deletion_timestamp.is_some() {
            return Outcome::Stopped(Stop::Delete(Duration::ZERO));
        }
        if !self.patch().await {
            return Outcome::Stopped(Stop::Gone);
        }
        loop {
            match self.prepare().await {
                Ok(sandbox) => {
                    self.sandbox = Some(sandbox);
                    break;
                }
                Err(e) => {
                    let state = State::Waiting {
                        reason: e.reason.into(),
                        message: Some(e.message.clone()),
                    };
                    if self.view.container.state != state {
                        self.log(format!("waiting: {}: {}", e.reason, e.message));
                        if e.reason != "ContainerCreating" {
                            self.event(true, "Failed", "Prepare", e.message.clone())
                                .await;
                        }
                        self.view.container.state = state;
                        self.patch().await;
                    }
                    if let Some(stop) = self.wait(Duration::from_secs(1)).await {
                        return Outcome::Stopped(stop);
                    }
                }
            }
        }
        loop {
            let (term, stop) = self.run_container().await;
            if let Some(stop) = stop {
                if stop != Stop::Shutdown {
                    self.view.container.state = State::Terminated(term.clone());
                    self.view.container.ready = false;
                    self.view.phase = status::final_phase(term.exit_code);
                    self.patch().await;
                }
                return Outcome::Stopped(stop);
            }
            if status::restarts(&self.restart_policy(), term.exit_code) {
                let n = self.view.container.restart_count;
                let backoff = self
                    .shared
                    .config
                    .restart_backoff
                    .saturating_mul(1 << n.clamp(0, 16))
                    .min(self.shared.config.max_restart_backoff);
                let message = format!(
                    "back-off {:?} restarting failed container={} pod={}",
                    backoff, self.view.container.name, self.name
                );
                self.log(&message);
                self.view.container.last = Some(term);
                self.view.container.restart_count += 1;
                self.view.container.ready = false;
                self.view.container.state = State::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(message.clone()),
                };
                self.view.phase = Phase::Running;
                self.patch().await;
                self.event(true, "BackOff", "Restart", message).await;
                if let Some(stop) = self.wait(backoff).await {
                    return Outcome::Stopped(stop);
                }
            } else {
                self.view.phase = status::final_phase(term.exit_code);
                self.view.container.state = State::Terminated(term);
                self.view.container.ready = false;
                self.patch().await;
                return Outcome::Finished;
            }
        }
    }

    /// Kills what is left, removes the cgroup, the address and the root skeleton.
    async fn teardown(&mut self) {
        if let Some(sb) = self.sandbox.take() {
            let group = sb.group.clone();
            let result =
                tokio::task::spawn_blocking(move || group.destroy(Duration::from_secs(10))).await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.log(format!("cgroup not removed: {e}")),
                Err(e) => self.log(format!("cgroup removal: {e}")),
            }
            if let Err(e) = sb.rootfs.remove(&self.dir) {
                self.log(format!("root not removed: {e}"));
            }
        }
        if let Some(ip) = self.ip.take() {
            if let Ok(mut n) = self.shared.state.network.lock() {
                n.release(ip);
            }
        }
        if let Ok(mut r) = self.shared.state.records.lock() {
            if let Some(p) = r.pods.get_mut(&self.uid) {
                p.torn_down = true;
            }
        }
        self.log("sandbox removed");
    }

    // ------------------------------------------------------------------ prepare

    async fn prepare(&mut self) -> Result<Sandbox, NotStarted> {
        let config = |message: String| NotStarted {
            reason: "CreateContainerConfigError",
            message,
        };
        let spec = self.pod.spec.clone().unwrap_or_default();
        if spec.containers.len() != 1
            || spec.init_containers.as_ref().is_some_and(|i| !i.is_empty())
        {
            return Err(config(
                "the test node agent runs pods with exactly one container and no init containers"
                    .into(),
            ));
        }
        let c = spec.containers[0].clone();
        let image = c.image.clone().unwrap_or_default();
        let binary = self.shared.config.binary_for(&image).map(Path::to_path_buf).ok_or_else(|| NotStarted {
            reason: "ErrImagePull",
            message: format!(
                "image {image:?} is none of the images the test node agent maps to local binaries ({})",
                self.shared
                    .config
                    .images
                    .iter()
                    .map(|i| i.repository.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
        let volumes = volumes::resolve(&self.shared.client, &self.pod, &self.dir)
            .await
            .map_err(|e| match e {
                VolumeError::NotReady(m) => NotStarted {
                    reason: "ContainerCreating",
                    message: m,
                },
                VolumeError::Unsupported(m) => config(m),
            })?;
        let service_account = self.service_account_dir().await?;
        let ip = match self.ip {
            Some(ip) => ip,
            None => {
                let ip = self
                    .shared
                    .state
                    .network
                    .lock()
                    .map_err(|_| config("pod network lock poisoned".into()))?
                    .allocate()
                    .map_err(|m| NotStarted {
                        reason: "ContainerCreating",
                        message: format!("pod sandbox: {m}"),
                    })?;
                self.ip = Some(ip);
                self.view.pod_ip = Some(ip.to_string());
                if let Ok(mut r) = self.shared.state.records.lock() {
                    if let Some(p) = r.pods.get_mut(&self.uid) {
                        p.ip = Some(ip);
                    }
                }
                ip
            }
        };
        let env = self.environment(&c, ip).await.map_err(config)?;
        let (user, read_only_root) = self.security(&c).map_err(config)?;

        let io = |what: &str, e: std::io::Error| config(format!("{what}: {e}"));
        let rootfs = Rootfs::create(&self.dir).map_err(|e| io("container root", e))?;
        let mut mounts = rootfs.system_mounts();
        let bin_name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bin_target = format!("{}/{bin_name}", sandbox::IMAGE_BIN_DIR);
        rootfs
            .placeholder(&bin_target, false)
            .map_err(|e| io("image binary", e))?;
        mounts.push(Mount {
            target: bin_target,
            kind: MountKind::Bind(binary),
            read_only: true,
        });
        let container_dir = self.dir.join("containers").join(&c.name);
        std::fs::create_dir_all(&container_dir).map_err(|e| io("container directory", e))?;
        let termination_file = container_dir.join("termination-log");
        std::fs::write(&termination_file, b"").map_err(|e| io("termination log", e))?;
        let _ = std::fs::set_permissions(&termination_file, std::fs::Permissions::from_mode(0o666));
        let termination_path = c
            .termination_message_path
            .clone()
            .unwrap_or_else(|| "/dev/termination-log".into());
        rootfs
            .placeholder(&termination_path, false)
            .map_err(|e| io("terminationMessagePath", e))?;
        mounts.push(Mount {
            target: termination_path,
            kind: MountKind::Bind(termination_file.clone()),
            read_only: false,
        });
        if let Some((_, dir)) = &service_account {
            let target = "/var/run/secrets/kubernetes.io/serviceaccount";
            rootfs
                .placeholder(target, true)
                .map_err(|e| io("service account", e))?;
            mounts.push(Mount {
                target: target.into(),
                kind: MountKind::Bind(dir.clone()),
                read_only: true,
            });
        }
        let mut volume_mounts = c.volume_mounts.clone().unwrap_or_default();
        volume_mounts.sort_by_key(|m| m.mount_path.matches('/').count());
        for vm in volume_mounts {
            let volume = volumes.iter().find(|v| v.name == vm.name).ok_or_else(|| {
                config(format!(
                    "volumeMount {:?} names no volume of the pod",
                    vm.name
                ))
            })?;
            let source = match vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) if sub.split('/').any(|p| p == "..") => {
                    return Err(config(format!("subPath {sub:?} leaves the volume")))
                }
                Some(sub) => volume.path.join(sub),
                None => volume.path.clone(),
            };
            let is_dir = !source.is_file();
            if is_dir {
                std::fs::create_dir_all(&source).map_err(|e| io("subPath", e))?;
            }
            rootfs
                .placeholder(&vm.mount_path, is_dir)
                .map_err(|e| io(&format!("volumeMount {}", vm.mount_path), e))?;
            mounts.push(Mount {
                target: vm.mount_path.clone(),
                kind: MountKind::Bind(source),
                read_only: vm.read_only.unwrap_or(false) || volume.read_only,
            });
        }

        let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
        let limit = |key: &str| limits.and_then(|l| l.get(key)).map(|q| q.0.clone());
        let limits = Limits {
            memory: match limit("memory") {
                Some(q) => Some(
                    imageindex_crds::quantity::parse_bytes(&q)
                        .map_err(|e| config(format!("resources.limits.memory: {e}")))?,
                ),
                None => None,
            },
            cpu_millis: match limit("cpu") {
                Some(q) => Some(
                    parse_cpu_millis(&q)
                        .ok_or_else(|| config(format!("resources.limits.cpu {q:?}")))?,
                ),
                None => None,
            },
        };
        let relative = self
            .shared
            .state
            .cgroup_parent
            .join(format!("{}_{}", self.uid, c.name));
        let group: ContainerGroup = self
            .shared
            .state
            .hierarchy
            .create(&relative, limits)
            .map_err(|e| config(format!("cgroup: {e}")))?;
        if let Ok(mut r) = self.shared.state.records.lock() {
            if let Some(p) = r.pods.get_mut(&self.uid) {
                p.cgroups = group
                    .procs_files()
                    .iter()
                    .filter_map(|f| f.parent().map(Path::to_path_buf))
                    .collect();
            }
        }

        let lookup = |name: &str| {
            env.iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let entry: Vec<String> = match c.command.as_ref().filter(|c| !c.is_empty()) {
            Some(command) => command.iter().map(|a| expand(a, lookup)).collect(),
            None => vec![bin_name],
        };
        let mut args: Vec<String> = entry[1..].to_vec();
        args.extend(c.args.iter().flatten().map(|a| expand(a, lookup)));
        let ip_text = ip.to_string();
        let ip_str = ip_text.as_str();
        let readiness = c
            .readiness_probe
            .as_ref()
            .map(|p| ProbeSpec::new(p, &c, ip_str));
        let liveness = c
            .liveness_probe
            .as_ref()
            .map(|p| ProbeSpec::new(p, &c, ip_str));
        let launch = Launch {
            root: rootfs.root.clone(),
            mounts,
            read_only_root,
            cgroup_procs: group.procs_files(),
            user,
            workdir: c.working_dir.clone().unwrap_or_else(|| "/".into()),
            program: entry[0].clone(),
            args,
            env,
            log: PathBuf::new(),
        };
        self.log(format!(
            "sandbox ready: ip {ip}, cgroup {}, limits {limits:?}",
            group.dir().display()
        ));
        Ok(Sandbox {
            rootfs,
            group,
            launch,
            readiness,
            liveness,
            termination_file,
            fallback_to_logs: c.termination_message_policy.as_deref()
                == Some("FallbackToLogsOnError"),
            service_account,
        })
    }

    /// The effective user and read-only root of the container (container securityContext
    /// over the pod's).
    fn security(&self, c: &Container) -> Result<(Option<User>, bool), String> {
        let pod_sc = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.clone())
            .unwrap_or_default();
        let sc = c.security_context.clone().unwrap_or_default();
        let uid = sc.run_as_user.or(pod_sc.run_as_user);
        let gid = sc.run_as_group.or(pod_sc.run_as_group);
        let non_root = sc
            .run_as_non_root
            .or(pod_sc.run_as_non_root)
            .unwrap_or(false);
        if non_root && uid.unwrap_or(0) == 0 {
            return Err("container has runAsNonRoot and image will run as root".into());
        }
        let mut groups: Vec<u32> = pod_sc
            .supplemental_groups
            .iter()
            .flatten()
            .filter_map(|g| u32::try_from(*g).ok())
            .collect();
        groups.extend(pod_sc.fs_group.and_then(|g| u32::try_from(g).ok()));
        let user = match (uid, gid) {
            (None, None) if groups.is_empty() => None,
            _ => Some(User {
                uid: u32::try_from(uid.unwrap_or(0)).map_err(|_| "runAsUser out of range")?,
                gid: u32::try_from(gid.unwrap_or(0)).map_err(|_| "runAsGroup out of range")?,
                groups,
            }),
        };
        Ok((user, sc.read_only_root_filesystem.unwrap_or(false)))
    }

    /// The container's environment, in the kubelet's order: defaults, the API server's
    /// in-cluster variables, `envFrom`, then `env` (each expanded with those before it).
    async fn environment(
        &self,
        c: &Container,
        ip: Ipv4Addr,
    ) -> Result<Vec<(String, String)>, String> {
        let config = &self.shared.config;
        let host = config.apiserver_host.clone();
        let port = config.apiserver_port.to_string();
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), CONTAINER_PATH.into()),
            ("HOSTNAME".into(), self.name.clone()),
            ("HOME".into(), "/root".into()),
            ("KUBERNETES_SERVICE_HOST".into(), host.clone()),
            ("KUBERNETES_SERVICE_PORT".into(), port.clone()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.clone()),
            ("KUBERNETES_PORT".into(), format!("tcp://{host}:{port}")),
            (
                "KUBERNETES_PORT_443_TCP".into(),
                format!("tcp://{host}:{port}"),
            ),
            ("KUBERNETES_PORT_443_TCP_PROTO".into(), "tcp".into()),
            ("KUBERNETES_PORT_443_TCP_ADDR".into(), host.clone()),
            ("KUBERNETES_PORT_443_TCP_PORT".into(), port.clone()),
        ];
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        };
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let data: BTreeMap<String, String> = if let Some(r) = &from.config_map_ref {
                match self.config_map(&r.name).await? {
                    Some(m) => m.data.unwrap_or_default(),
                    None if r.optional == Some(true) => BTreeMap::new(),
                    None => return Err(format!("configmap {:?} not found", r.name)),
                }
            } else if let Some(r) = &from.secret_ref {
                match self.secret(&r.name).await? {
                    Some(s) => s
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, ByteString(v))| (k, String::from_utf8_lossy(&v).into_owned()))
                        .collect(),
                    None if r.optional == Some(true) => BTreeMap::new(),
                    None => return Err(format!("secret {:?} not found", r.name)),
                }
            } else {
                BTreeMap::new()
            };
            for (k, v) in data {
                set(&mut env, format!("{prefix}{k}"), v);
            }
        }
        for var in c.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (_, Some(from)) => {
                    if let Some(f) = &from.field_ref {
                        self.field(&f.field_path, ip)?
                    } else if let Some(r) = &from.resource_field_ref {
                        self.resource_field(
                            c,
                            &r.resource,
                            r.divisor.as_ref().map(|d| d.0.as_str()),
                        )?
                    } else if let Some(k) = &from.config_map_key_ref {
                        let value = self
                            .config_map(&k.name)
                            .await?
                            .and_then(|m| m.data.and_then(|d| d.get(&k.key).cloned()));
                        match value {
                            Some(v) => v,
                            None if k.optional == Some(true) => continue,
                            None => {
                                return Err(format!(
                                    "configmap {:?} has no key {:?}",
                                    k.name, k.key
                                ))
                            }
                        }
                    } else if let Some(k) = &from.secret_key_ref {
                        let value = self.secret(&k.name).await?.and_then(|s| {
                            s.data.and_then(|d| {
                                d.get(&k.key)
                                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                            })
                        });
                        match value {
                            Some(v) => v,
                            None if k.optional == Some(true) => continue,
                            None => {
                                return Err(format!("secret {:?} has no key {:?}", k.name, k.key))
                            }
                        }
                    } else {
                        return Err(format!("env {}: unsupported valueFrom", var.name));
                    }
                }
                (Some(v), None) => {
                    let snapshot = env.clone();
                    expand(v, |n| {
                        snapshot
                            .iter()
                            .rev()
                            .find(|(k, _)| k == n)
                            .map(|(_, v)| v.clone())
                    })
                }
                (None, None) => String::new(),
            };
            set(&mut env, var.name.clone(), value);
        }
        Ok(env)
    }

    fn field(&self, path: &str, ip: Ipv4Addr) -> Result<String, String> {
        let meta = &self.pod.metadata;
        let spec = self.pod.spec.clone().unwrap_or_default();
        let keyed = |prefix: &str, map: Option<&BTreeMap<String, String>>| -> Option<String> {
            let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
            Some(map.and_then(|m| m.get(key).cloned()).unwrap_or_default())
        };
        Ok(match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.ns.clone(),
            "metadata.uid" => self.uid.clone(),
            "spec.nodeName" => spec.node_name.unwrap_or_default(),
            "spec.serviceAccountName" => spec
                .service_account_name
                .unwrap_or_else(|| "default".into()),
            "status.hostIP" => "127.0.0.1".into(),
            "status.podIP" | "status.podIPs" => ip.to_string(),
            p => keyed("metadata.labels['", meta.labels.as_ref())
                .or_else(|| keyed("metadata.annotations['", meta.annotations.as_ref()))
                .ok_or_else(|| format!("fieldRef {p:?} is not supported"))?,
        })
    }

    fn resource_field(
        &self,
        c: &Container,
        resource: &str,
        divisor: Option<&str>,
    ) -> Result<String, String> {
        let (kind, key) = resource
            .split_once('.')
            .ok_or_else(|| format!("resourceFieldRef {resource:?}"))?;
        let r = c.resources.clone().unwrap_or_default();
        let map = if kind == "limits" {
            r.limits
        } else {
            r.requests
        };
        let q = map.and_then(|m| m.get(key).map(|q| q.0.clone()));
        Ok(match key {
            "memory" => {
                let bytes = match q {
                    Some(q) => {
                        imageindex_crds::quantity::parse_bytes(&q).map_err(|e| e.to_string())?
                    }
                    None => 0,
                };
                let d = divisor
                    .map_or(Ok(1), imageindex_crds::quantity::parse_bytes)
                    .map_err(|e| e.to_string())?;
                bytes.div_ceil(d.max(1)).to_string()
            }
            "cpu" => {
                let millis = q.as_deref().and_then(parse_cpu_millis).unwrap_or(0);
                let d = divisor.and_then(parse_cpu_millis).unwrap_or(1000).max(1);
                millis.div_ceil(d).to_string()
            }
            _ => return Err(format!("resourceFieldRef {resource:?} is not supported")),
        })
    }

    async fn config_map(&self, name: &str) -> Result<Option<ConfigMap>, String> {
        let api: Api<ConfigMap> = Api::namespaced(self.shared.client.clone(), &self.ns);
        api.get_opt(name)
            .await
            .map_err(|e| format!("configmap {name:?}: {e}"))
    }

    async fn secret(&self, name: &str) -> Result<Option<Secret>, String> {
        let api: Api<Secret> = Api::namespaced(self.shared.client.clone(), &self.ns);
        api.get_opt(name)
            .await
            .map_err(|e| format!("secret {name:?}: {e}"))
    }

    /// The service-account directory (token, ca.crt, namespace) when the token is mounted:
    /// `automountServiceAccountToken` of the pod, else of the ServiceAccount, else true.
    async fn service_account_dir(&mut self) -> Result<Option<(String, PathBuf)>, NotStarted> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let sa = spec
            .service_account_name
            .clone()
            .or(spec.service_account.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.shared.client.clone(), &self.ns);
        let waiting = |message: String| NotStarted {
            reason: "ContainerCreating",
            message,
        };
        let account = api
            .get_opt(&sa)
            .await
            .map_err(|e| waiting(format!("serviceaccount {sa:?}: {e}")))?
            .ok_or_else(|| waiting(format!("serviceaccount {sa:?} not found")))?;
        let mount = spec
            .automount_service_account_token
            .or(account.automount_service_account_token)
            .unwrap_or(true);
        if !mount {
            return Ok(None);
        }
        let dir = self.dir.join("serviceaccount");
        self.write_token(&sa, &dir).await.map_err(waiting)?;
        Ok(Some((sa, dir)))
    }

    /// Writes a token for ServiceAccount `sa` (TokenRequest API, one hour, renewed at 80 % as
    /// the kubelet does), the CA and the namespace into `dir`. The token is bound to the pod
    /// when the pod names its ServiceAccount; pods that do not (this control plane runs without
    /// the ServiceAccount admission plugin, which would fill in `default`) get an unbound token
    /// of `default`, as the API server refuses to bind a pod to another account.
    async fn write_token(&mut self, sa: &str, dir: &Path) -> Result<(), String> {
        const SECONDS: i64 = 3600;
        let api: Api<ServiceAccount> = Api::namespaced(self.shared.client.clone(), &self.ns);
        let named = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            == Some(sa);
        let mut spec = json!({"audiences": [], "expirationSeconds": SECONDS});
        if named {
            spec["boundObjectRef"] =
                json!({"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid});
        }
        let request: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": spec,
        }))
        .map_err(|e| e.to_string())?;
        let answer: TokenRequest = api
            .create_subresource("token", sa, &PostParams::default(), &request)
            .await
            .map_err(|e| format!("token for serviceaccount {sa:?}: {e}"))?;
        let token = answer.status.map(|s| s.token).unwrap_or_default();
        let io = |e: std::io::Error| format!("{}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(io)?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        let ca = std::fs::read(&self.shared.config.ca_cert).map_err(io)?;
        for (name, bytes) in [
            ("token", token.into_bytes()),
            ("ca.crt", ca),
            ("namespace", self.ns.clone().into_bytes()),
        ] {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, bytes).map_err(io)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(io)?;
            std::fs::rename(&tmp, dir.join(name)).map_err(io)?;
        }
        self.token_refresh = Some(Instant::now() + Duration::from_secs(SECONDS as u64 * 8 / 10));
        Ok(())
    }

    // ------------------------------------------------------------------ run

    /// Resolves the command in the container's PATH.
    fn resolve_program(&self, sb: &Sandbox) -> Result<String, String> {
        let program = &sb.launch.program;
        if program.contains('/') {
            return if sb.rootfs.exists_inside(program) {
                Ok(program.clone())
            } else {
                Err(format!("exec: {program:?}: no such file or directory"))
            };
        }
        let path = sb
            .launch
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(CONTAINER_PATH.to_string(), |(_, v)| v.clone());
        path.split(':')
            .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
            .find(|p| sb.rootfs.exists_inside(p))
            .ok_or_else(|| format!("exec: {program:?}: executable file not found in $PATH"))
    }

    /// One run of the container: start, probe, wait. Returns how it ended, and why it was
    /// stopped if it was.
    async fn run_container(&mut self) -> (Terminated, Option<Stop>) {
        let restart = self.view.container.restart_count;
        let c_name = self.view.container.name.clone();
        let log = self
            .dir
            .join("containers")
            .join(&c_name)
            .join(format!("{restart}.log"));
        let Some(sb) = self.sandbox.as_ref() else {
            unreachable!("run_container without a sandbox");
        };
        let _ = std::fs::write(&sb.termination_file, b"");
        let mut launch = sb.launch.clone();
        launch.log = log.clone();
        let oom_before = sb.group.oom_kills().unwrap_or(0);
        sb.group.reset_peak();
        let started = SystemTime::now();
        let spawned = self.resolve_program(sb).and_then(|program| {
            launch.program = program;
            sandbox::spawn(&launch).map_err(|e| {
                format!(
                    "starting {:?}: {e}; {}",
                    launch.program,
                    super::tail(&log, 5)
                )
            })
        });
        let mut child = match spawned {
            Ok(child) => child,
            Err(message) => {
                self.log(format!("start failed: {message}"));
                self.event(true, "Failed", "Start", message.clone()).await;
                let term = Terminated {
                    exit_code: 128,
                    signal: None,
                    reason: "StartError".into(),
                    message: Some(message),
                    started_at: None,
                    finished_at: SystemTime::now(),
                    container_id: None,
                };
                return (term, None);
            }
        };
        let pid = child.id().unwrap_or(0);
        let container_id = format!("imageindex-agent://{pid}");
        let ip = self.ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        if let Ok(mut r) = self.shared.state.records.lock() {
            r.runs.push(ContainerRun {
                namespace: self.ns.clone(),
                pod: self.name.clone(),
                uid: self.uid.clone(),
                labels: self.pod.labels().clone(),
                container: c_name.clone(),
                restart,
                pid,
                ip,
                cgroup: sb.group.dir().to_path_buf(),
                log: log.clone(),
                started,
                ended: None,
            });
        }
        let readiness = sb.readiness.clone();
        let liveness = sb.liveness.clone();
        self.log(format!(
            "started pid {pid}: {} {}",
            launch.program,
            launch.args.join(" ")
        ));
        self.view.phase = Phase::Running;
        self.view.container.state = State::Running {
            started_at: started,
        };
        self.view.container.container_id = Some(container_id.clone());
        self.set_ready(readiness.is_none());
        self.patch().await;
        self.event(
            false,
            "Started",
            "Start",
            format!("Started container {c_name} (pid {pid})"),
        )
        .await;

        let start = Instant::now();
        let mut ready_state = ProbeState::default();
        let mut live_state = ProbeState::default();
        let mut next_ready = readiness.as_ref().map(|p| start + p.initial_delay);
        let mut next_live = liveness.as_ref().map(|p| start + p.initial_delay);
        let far = || Instant::now() + Duration::from_secs(3600);
        let (status, stop) = loop {
            let token_at = self.token_refresh.unwrap_or_else(far);
            tokio::select! {
                status = child.wait() => break (status, None),
                _ = tokio::time::sleep_until(next_ready.unwrap_or_else(far)), if next_ready.is_some() => {
                    let probe = readiness.as_ref().expect("readiness probe");
                    let result = probe.run(&self.shared.http).await;
                    if ready_state.record(probe, result.is_ok()) {
                        let ready = ready_state.healthy == Some(true);
                        self.log(format!("readiness: {}", result.as_ref().err().map_or("ready", |e| e.as_str())));
                        self.set_ready(ready);
                        self.patch().await;
                    }
                    if let Err(e) = result {
                        if ready_state.healthy == Some(true) || start.elapsed() > Duration::from_secs(30) {
                            self.event(true, "Unhealthy", "Probe", format!("Readiness probe failed: {e}")).await;
                        }
                    }
                    next_ready = Some(Instant::now() + probe.period);
                }
                _ = tokio::time::sleep_until(next_live.unwrap_or_else(far)), if next_live.is_some() => {
                    let probe = liveness.as_ref().expect("liveness probe");
                    let result = probe.run(&self.shared.http).await;
                    live_state.record(probe, result.is_ok());
                    next_live = Some(Instant::now() + probe.period);
                    if let Err(e) = result {
                        self.event(true, "Unhealthy", "Probe", format!("Liveness probe failed: {e}")).await;
                    }
                    if live_state.healthy == Some(false) {
                        let message = format!("Container {c_name} failed liveness probe, will be restarted");
                        self.log(&message);
                        self.event(false, "Killing", "Kill", message).await;
                        let grace = deletion_grace(&self.pod);
                        break (self.stop_container(&mut child, grace).await, None);
                    }
                }
                _ = tokio::time::sleep_until(token_at), if self.token_refresh.is_some() => {
                    if let Some((sa, dir)) = self.sandbox.as_ref().and_then(|s| s.service_account.clone()) {
                        if let Err(e) = self.write_token(&sa, &dir).await {
                            self.log(format!("token refresh: {e}"));
                            self.token_refresh = Some(Instant::now() + Duration::from_secs(10));
                        }
                    } else {
                        self.token_refresh = None;
                    }
                }
                ev = self.events.recv() => {
                    if let Some(stop) = self.on_event(ev) {
                        let grace = match stop {
                            Stop::Delete(grace) => grace,
                            Stop::Gone | Stop::Shutdown => Duration::ZERO,
                        };
                        self.log(format!("stopping container (grace {grace:?})"));
                        if let Stop::Delete(_) = stop {
                            self.event(false, "Killing", "Kill", format!("Stopping container {c_name}")).await;
                        }
                        break (self.stop_container(&mut child, grace).await, Some(stop));
                    }
                }
                _ = self.shutdown.changed() => {
                    break (self.stop_container(&mut child, Duration::ZERO).await, Some(Stop::Shutdown));
                }
            }
        };
        let sb = self.sandbox.as_ref().expect("sandbox");
        // The container's init is gone: nothing of it may outlive it.
        sb.group.signal_all(libc::SIGKILL);
        let (exit_code, signal) = match status {
            Ok(s) => exit_code(s),
            Err(_) => (255, None),
        };
        let oom = sb.group.oom_kills().unwrap_or(0) > oom_before;
        let reason = status::termination_reason(exit_code, oom).to_string();
        let peak = sb.group.peak();
        let message =
            termination_message(&sb.termination_file, &log, sb.fallback_to_logs, exit_code);
        self.log(format!(
            "pid {pid} ended: exit {exit_code}{}, {reason}, peak {} MiB",
            signal.map_or(String::new(), |s| format!(" (signal {s})")),
            peak.map_or(0, |p| p >> 20)
        ));
        if oom {
            self.event(
                true,
                "OOMKilling",
                "Kill",
                format!(
                    "Memory cgroup out of memory: killed process {pid} of container {c_name} (limit {:?})",
                    sb.group.limit()
                ),
            )
            .await;
        }
        if let Ok(mut r) = self.shared.state.records.lock() {
            if let Some(run) = r
                .runs
                .iter_mut()
                .rev()
                .find(|r| r.pid == pid && r.uid == self.uid)
            {
                run.ended = Some(RunEnd {
                    at: SystemTime::now(),
                    exit_code,
                    reason: reason.clone(),
                    peak_memory: peak,
                });
            }
        }
        let term = Terminated {
            exit_code,
            signal,
            reason,
            message,
            started_at: Some(started),
            finished_at: SystemTime::now(),
            container_id: Some(container_id),
        };
        (term, stop)
    }

    fn set_ready(&mut self, ready: bool) {
        if self.view.container.ready != ready {
            self.view.container.ready = ready;
            self.view.ready_since = SystemTime::now();
        }
    }

    /// SIGTERM to the container's process, SIGKILL to every process of its cgroup after
    /// `grace`; returns its exit status.
    async fn stop_container(
        &self,
        child: &mut tokio::process::Child,
        grace: Duration,
    ) -> std::io::Result<std::process::ExitStatus> {
        if let Some(pid) = child.id() {
            let signal = if grace.is_zero() {
                libc::SIGKILL
            } else {
                libc::SIGTERM
            };
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                self.log(format!("grace period {grace:?} over: SIGKILL"));
                if let Some(sb) = &self.sandbox {
                    sb.group.signal_all(libc::SIGKILL);
                }
                let _ = child.start_kill();
                child.wait().await
            }
        }
    }
}
