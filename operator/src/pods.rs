//! What a scan or build pod's status says, read the way a kubelet writes it: the controller's
//! adapter from pods to the observations the decisions take ([`attempt_end`]).

use imageindex_crds::observation::{AttemptEnd, Stop};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// The container name of scan pods.
pub const SCAN_CONTAINER: &str = "scan";
/// The container name of build pods.
pub const BUILD_CONTAINER: &str = "build";
/// The name of the build container's metrics port.
pub const METRICS_PORT_NAME: &str = "metrics";
/// The reason a kubelet gives a container killed by the kernel's OOM killer.
pub const OOM_KILLED: &str = "OOMKilled";

/// How a pod's container ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Termination {
    /// The exit code, when known.
    pub exit_code: Option<i32>,
    /// Whether `state` or `lastState` says `OOMKilled`.
    pub oom_killed: bool,
    /// The kubelet's reason (`Completed`, `Error`, `OOMKilled`, `Evicted`, …).
    pub reason: Option<String>,
    /// The termination message, or the pod's status message.
    pub message: Option<String>,
    /// When the container finished.
    pub finished_at: Option<Time>,
    /// The container ended once but the pod is still active (it was restarted): the
    /// operator must stop it so that two builds never share the index volume.
    pub still_running: bool,
}

/// Where a pod is in its life, as far as the operator cares.
#[derive(Clone, Debug, PartialEq)]
pub enum PodState {
    /// Waiting to start (or running without an IP yet).
    Pending,
    /// Running with an address its metrics can be scraped at.
    Running {
        /// `status.podIP`.
        ip: String,
    },
    /// Being deleted, not terminated yet.
    Terminating,
    /// The container (or the pod) ended.
    Terminated(Termination),
}

impl PodState {
    /// Whether the pod may still run a process (so no other build may start).
    pub fn is_active(&self) -> bool {
        match self {
            PodState::Terminated(t) => t.still_running,
            _ => true,
        }
    }
}

fn terminated_summary(
    t: &ContainerStateTerminated,
) -> (Option<i32>, Option<String>, Option<String>, Option<Time>) {
    (
        Some(t.exit_code),
        t.reason.clone(),
        t.message.clone().filter(|m| !m.is_empty()),
        t.finished_at.clone(),
    )
}

/// Reads a pod's state from its status (first container, as the operator's pods have one).
pub fn observe(pod: &Pod) -> PodState {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first());
    let current = container
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let last = container
        .and_then(|c| c.last_state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let is_oom = |t: &&ContainerStateTerminated| t.reason.as_deref() == Some(OOM_KILLED);
    let pod_ended = phase == "Succeeded" || phase == "Failed";

    if pod_ended || current.is_some() || last.is_some() {
        let oom_killed = current.filter(is_oom).is_some() || last.filter(is_oom).is_some();
        // Prefer the record that explains an OOM kill, then the current one.
        let chosen = current
            .filter(is_oom)
            .or(last.filter(is_oom))
            .or(current)
            .or(last);
        let (exit_code, reason, message, finished_at) = match chosen {
            Some(t) => terminated_summary(t),
            None => (
                (phase == "Succeeded").then_some(0),
                status.and_then(|s| s.reason.clone()),
                status.and_then(|s| s.message.clone()),
                None,
            ),
        };
        return PodState::Terminated(Termination {
            exit_code,
            oom_killed,
            reason,
            message,
            finished_at,
            still_running: !pod_ended && current.is_none(),
        });
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Terminating;
    }
    match status
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())
    {
        Some(ip) if phase == "Running" => PodState::Running { ip: ip.to_string() },
        _ => PodState::Pending,
    }
}

/// How a build attempt ended, as its pod says: the exit code of the record that explains an
/// OOM kill (else the current one) and whether `state` or `lastState` says `OOMKilled`.
pub fn attempt_end(t: &Termination) -> AttemptEnd {
    AttemptEnd {
        exit_code: t.exit_code,
        oom_kill_reported: t.oom_killed,
        stopped: None,
    }
}

/// How a build attempt ended whose pod the operator deleted for `stop`: the controller does not
/// wait for the pod's exit code (the next attempt waits for the pod to go).
pub fn deleted_end(stop: Stop) -> AttemptEnd {
    AttemptEnd {
        exit_code: None,
        oom_kill_reported: false,
        stopped: Some(stop),
    }
}

/// The termination message of the pod's (first) container: the scan report.
pub fn termination_message(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()?
        .message
        .as_deref()
}

/// The container port named `metrics` in the pod's spec.
pub fn metrics_port(pod: &Pod) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(METRICS_PORT_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// A label of the pod.
pub fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

/// Describes a termination in words for an attempt's message.
pub fn describe(t: &Termination) -> String {
    let mut text = match (t.exit_code, t.reason.as_deref()) {
        (Some(code), Some(reason)) => format!("exited with code {code} ({reason})"),
        (Some(code), None) => format!("exited with code {code}"),
        (None, Some(reason)) => format!("ended: {reason}"),
        (None, None) => "ended without an exit code".to_string(),
    };
    if t.oom_killed && t.reason.as_deref() != Some(OOM_KILLED) {
        text.push_str(", OOMKilled before");
    }
    if let Some(m) = t.message.as_deref() {
        let m: String = m.chars().take(300).collect();
        text.push_str(": ");
        text.push_str(m.trim());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "build", "ports": [{"name": "metrics", "containerPort": 9123}]}]},
            "status": status,
        }))
        .unwrap()
    }

    fn term(p: &Pod) -> Termination {
        match observe(p) {
            PodState::Terminated(t) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pending_running_and_terminating() {
        assert_eq!(observe(&pod(json!({}))), PodState::Pending);
        assert_eq!(
            observe(&pod(json!({"phase": "Running"}))),
            PodState::Pending
        );
        assert_eq!(
            observe(&pod(json!({"phase": "Running", "podIP": "10.0.0.9"}))),
            PodState::Running {
                ip: "10.0.0.9".into()
            }
        );
        let mut p = pod(json!({"phase": "Running", "podIP": "10.0.0.9"}));
        p.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(observe(&p), PodState::Terminating);
        assert!(observe(&p).is_active());
    }

    #[test]
    fn oom_kill_in_state_or_last_state_is_seen() {
        let in_state = pod(json!({"phase": "Failed", "containerStatuses": [{
            "name": "build", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}));
        let t = term(&in_state);
        assert!(t.oom_killed && !t.still_running);
        assert_eq!(t.exit_code, Some(137));

        let in_last_state = pod(json!({"phase": "Failed", "containerStatuses": [{
            "name": "build", "image": "i", "imageID": "", "ready": false, "restartCount": 1,
            "state": {"terminated": {"exitCode": 1, "reason": "Error"}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}));
        let t = term(&in_last_state);
        assert!(t.oom_killed);
        assert_eq!(
            attempt_end(&t),
            AttemptEnd {
                exit_code: Some(137),
                oom_kill_reported: true,
                stopped: None
            }
        );
        assert_eq!(
            (t.exit_code, t.reason.as_deref()),
            (Some(137), Some("OOMKilled"))
        );
        assert!(!observe(&in_last_state).is_active());
    }

    #[test]
    fn a_restarted_container_ended_but_is_still_running() {
        let p = pod(
            json!({"phase": "Running", "podIP": "10.0.0.9", "containerStatuses": [{
            "name": "build", "image": "i", "imageID": "", "ready": true, "restartCount": 1,
            "state": {"running": {}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}),
        );
        let t = term(&p);
        assert!(t.oom_killed && t.still_running);
        assert!(observe(&p).is_active());
    }

    #[test]
    fn succeeded_and_failed_pods_without_container_statuses() {
        let t = term(&pod(json!({"phase": "Succeeded"})));
        assert_eq!((t.exit_code, t.oom_killed), (Some(0), false));
        let t = term(&pod(
            json!({"phase": "Failed", "reason": "Evicted", "message": "node low on memory"}),
        ));
        assert_eq!(t.exit_code, None);
        assert_eq!(describe(&t), "ended: Evicted: node low on memory");
    }

    #[test]
    fn termination_message_and_metrics_port() {
        let p = pod(json!({"phase": "Succeeded", "containerStatuses": [{
            "name": "scan", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "message": "{\"version\":1}"}}}]}));
        assert_eq!(termination_message(&p), Some("{\"version\":1}"));
        assert_eq!(metrics_port(&p), Some(9123));
        assert_eq!(termination_message(&pod(json!({}))), None);
        let t = term(&p);
        assert_eq!(describe(&t), "exited with code 0: {\"version\":1}");
    }
}
