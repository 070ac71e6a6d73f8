//! A pod's status as a kubelet writes it, rendered from what the agent knows (pure; the
//! agent sends the result as a merge patch of `pods/status`).

use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// A time as the API writes it (RFC 3339, whole seconds, UTC).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

/// The pod phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not all containers started yet.
    Pending,
    /// Bound and its container started (or restarting).
    Running,
    /// Its container ended with 0 and will not restart.
    Succeeded,
    /// Its container ended otherwise and will not restart.
    Failed,
}

impl Phase {
    /// The API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }
}

/// How a container ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Terminated {
    /// Exit code (128 + signal when killed by a signal).
    pub exit_code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// `OOMKilled`, `Completed`, `Error`, `StartError`.
    pub reason: String,
    /// The termination message.
    pub message: Option<String>,
    /// When it started.
    pub started_at: Option<SystemTime>,
    /// When it ended.
    pub finished_at: SystemTime,
    /// `imageindex-agent://<pid>`.
    pub container_id: Option<String>,
}

impl Terminated {
    fn to_json(&self) -> Value {
        let mut t = json!({
            "exitCode": self.exit_code,
            "reason": self.reason,
            "finishedAt": rfc3339(self.finished_at),
        });
        if let Some(s) = self.signal {
            t["signal"] = json!(s);
        }
        if let Some(m) = self.message.as_ref().filter(|m| !m.is_empty()) {
            t["message"] = json!(m);
        }
        if let Some(s) = self.started_at {
            t["startedAt"] = json!(rfc3339(s));
        }
        if let Some(id) = &self.container_id {
            t["containerID"] = json!(id);
        }
        t
    }
}

/// The reason a kubelet gives a terminated container.
pub fn termination_reason(exit_code: i32, oom_killed: bool) -> &'static str {
    if oom_killed {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// Whether a container that ended with `exit_code` restarts under `restart_policy`.
pub fn restarts(restart_policy: &str, exit_code: i32) -> bool {
    match restart_policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true, // Always, the default
    }
}

/// The phase of a pod whose only container ended for good.
pub fn final_phase(exit_code: i32) -> Phase {
    if exit_code == 0 {
        Phase::Succeeded
    } else {
        Phase::Failed
    }
}

/// The current state of a container.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    /// Not running: being created, backing off, or misconfigured.
    Waiting {
        /// `ContainerCreating`, `CrashLoopBackOff`, `ErrImagePull`, ...
        reason: String,
        /// Details.
        message: Option<String>,
    },
    /// Running since.
    Running {
        /// When it started.
        started_at: SystemTime,
    },
    /// Ended.
    Terminated(Terminated),
}

/// What the agent knows about a pod's only container.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerView {
    /// Its name.
    pub name: String,
    /// Its image, as in the spec.
    pub image: String,
    /// The local binary the image maps to (as `imageID`).
    pub image_id: String,
    /// Current state.
    pub state: State,
    /// How its previous run ended.
    pub last: Option<Terminated>,
    /// Readiness.
    pub ready: bool,
    /// Restarts so far.
    pub restart_count: i32,
    /// `imageindex-agent://<pid>` of the current or last run.
    pub container_id: Option<String>,
}

/// What the agent knows about a pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    /// The phase.
    pub phase: Phase,
    /// The node's address.
    pub host_ip: String,
    /// The pod's own address, once its sandbox exists.
    pub pod_ip: Option<String>,
    /// When the agent accepted the pod.
    pub start_time: SystemTime,
    /// Its container.
    pub container: ContainerView,
    /// When `Ready` last changed.
    pub ready_since: SystemTime,
}

fn condition(type_: &str, ok: bool, since: SystemTime, reason: Option<&str>) -> Value {
    let mut c = json!({
        "type": type_,
        "status": if ok { "True" } else { "False" },
        "lastProbeTime": null,
        "lastTransitionTime": rfc3339(since),
    });
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    c
}

fn state_json(state: &State) -> Value {
    match state {
        State::Waiting { reason, message } => {
            let mut w = json!({"reason": reason});
            if let Some(m) = message {
                w["message"] = json!(m);
            }
            json!({"waiting": w})
        }
        State::Running { started_at } => json!({"running": {"startedAt": rfc3339(*started_at)}}),
        State::Terminated(t) => json!({"terminated": t.to_json()}),
    }
}

/// The pod's `status`, complete (a merge patch with it replaces every list the kubelet owns).
pub fn render(view: &PodView) -> Value {
    let c = &view.container;
    let terminal = matches!(view.phase, Phase::Succeeded | Phase::Failed);
    let ready = c.ready && !terminal;
    let not_ready_reason = if terminal {
        Some("PodCompleted")
    } else if ready {
        None
    } else {
        Some("ContainersNotReady")
    };
    let mut container = json!({
        "name": c.name,
        "image": c.image,
        "imageID": c.image_id,
        "ready": ready,
        "restartCount": c.restart_count,
        "started": matches!(c.state, State::Running { .. }),
        "state": state_json(&c.state),
        "lastState": c.last.as_ref().map_or(json!({}), |t| json!({"terminated": t.to_json()})),
    });
    if let Some(id) = &c.container_id {
        container["containerID"] = json!(id);
    }
    let mut status = json!({
        "phase": view.phase.as_str(),
        "hostIP": view.host_ip,
        "startTime": rfc3339(view.start_time),
        "conditions": [
            condition("PodScheduled", true, view.start_time, None),
            condition("Initialized", true, view.start_time, if terminal { Some("PodCompleted") } else { None }),
            condition("ContainersReady", ready, view.ready_since, not_ready_reason),
            condition("Ready", ready, view.ready_since, not_ready_reason),
        ],
        "containerStatuses": [container],
    });
    if let Some(ip) = &view.pod_ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn view(state: State, phase: Phase) -> PodView {
        PodView {
            phase,
            host_ip: "127.0.0.1".into(),
            pod_ip: Some("10.244.3.2".into()),
            start_time: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            container: ContainerView {
                name: "build".into(),
                image: "imageindex/indexer:0.1.0".into(),
                image_id: "file:///bin/indexer".into(),
                state,
                last: None,
                ready: false,
                restart_count: 0,
                container_id: Some("imageindex-agent://42".into()),
            },
            ready_since: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    #[test]
    fn an_oom_killed_build_reads_as_the_operator_expects() {
        let t = Terminated {
            exit_code: 137,
            signal: Some(9),
            reason: termination_reason(137, true).into(),
            message: None,
            started_at: None,
            finished_at: UNIX_EPOCH + Duration::from_secs(1_700_000_100),
            container_id: None,
        };
        let v = view(State::Terminated(t), final_phase(137));
        let status = render(&v);
        assert_eq!(status["phase"], "Failed");
        assert_eq!(status["podIP"], "10.244.3.2");
        let cs = &status["containerStatuses"][0];
        assert_eq!(cs["state"]["terminated"]["reason"], "OOMKilled");
        assert_eq!(cs["state"]["terminated"]["exitCode"], 137);
        assert_eq!(
            cs["state"]["terminated"]["finishedAt"],
            "2023-11-14T22:15:00Z"
        );
        // What the operator reads, through its own parser.
        let pod: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "status": status})).unwrap();
        match operator::pods::observe(&pod) {
            operator::pods::PodState::Terminated(t) => {
                assert!(t.oom_killed);
                assert_eq!(t.exit_code, Some(137));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn running_pods_are_ready_only_when_the_container_is() {
        let mut v = view(
            State::Running {
                started_at: UNIX_EPOCH,
            },
            Phase::Running,
        );
        let s = render(&v);
        assert_eq!(s["conditions"][3]["status"], "False");
        assert_eq!(s["conditions"][3]["reason"], "ContainersNotReady");
        assert_eq!(s["containerStatuses"][0]["started"], true);
        v.container.ready = true;
        let s = render(&v);
        assert_eq!(s["conditions"][3]["status"], "True");
        let pod: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "status": s})).unwrap();
        assert_eq!(
            operator::pods::observe(&pod),
            operator::pods::PodState::Running {
                ip: "10.244.3.2".into()
            }
        );
    }

    #[test]
    fn reasons_and_restarts() {
        assert_eq!(termination_reason(0, false), "Completed");
        assert_eq!(termination_reason(1, false), "Error");
        assert_eq!(termination_reason(137, true), "OOMKilled");
        assert!(!restarts("Never", 1));
        assert!(restarts("OnFailure", 1));
        assert!(!restarts("OnFailure", 0));
        assert!(restarts("Always", 0));
        assert_eq!(final_phase(0), Phase::Succeeded);
        assert_eq!(final_phase(2), Phase::Failed);
    }
}
