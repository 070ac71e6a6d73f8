//! The plan of one reconcile: the effects [`super::apply`] carries out in order, and the
//! status [`Step`]s that follow an effect once it happened (a scan pod made, an attempt's pod
//! created or adopted, the query service available), recorded by [`record`].

use super::{REQUEUE_IDLE, REQUEUE_WATCH};
use crate::pods;
use imageindex_crds::conditions::{self, PROGRESSING, READY};
use imageindex_crds::labels::Component;
use imageindex_crds::observation::Stop;
use imageindex_crds::transitions::StatusDraft;
use imageindex_crds::types::Attempt;
use imageindex_crds::ImageIndexStatus;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use std::time::Duration;

/// What a reconcile makes or removes, in order, and when it looks again.
#[derive(Debug, Default)]
pub struct Plan {
    /// The effects, carried out in order; the first that fails ends the reconcile.
    pub effects: Vec<Effect>,
    /// Requeue after this long (unless a recorded [`Step`] says otherwise).
    pub requeue: Duration,
}

/// One thing to do in the cluster, or status to record once the effects before it are done.
#[derive(Debug)]
pub enum Effect {
    /// Delete the pod (with its uid as precondition; already gone is fine).
    DeletePod(Pod),
    /// Make the index claim unless it exists.
    EnsureIndexClaim(PersistentVolumeClaim),
    /// Create the pod; an existing one of that name is adopted.
    CreatePod {
        /// The pod.
        pod: Pod,
        /// Scan or build (names the error).
        component: Component,
    },
    /// Apply the query Deployment and Service (server-side apply).
    ApplyQuery {
        /// The Deployment.
        deployment: Box<Deployment>,
        /// The Service.
        service: Box<Service>,
        /// The replicas the spec asks for (0: serving is not wanted, the index is Ready anyway).
        replicas: i32,
    },
    /// Record a step in status.
    Record(Step),
}

/// What the last effect before a [`Step`] reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// Nothing to report.
    Nothing,
    /// A pod was created (`false`: it existed and was adopted).
    Created(bool),
    /// The query service was applied; whether it has an available replica (or needs none).
    Available(bool),
}

/// Status that follows an effect.
#[derive(Debug)]
pub enum Step {
    /// The scan pod exists: phase Scanning.
    Scanning(String),
    /// Attempt `attempt.number`'s pod exists (created by the effect before, or found).
    AttemptStarted {
        /// The attempt as recorded.
        attempt: Attempt,
        /// `spec.memoryLimit`.
        memory_limit: String,
        /// Found in the pod list (adopted) rather than created.
        found: bool,
        /// The decision that led to it, after an earlier attempt.
        why: Option<(&'static str, String)>,
    },
    /// The running build's pod was deleted under critical pressure.
    StoppedForPressure {
        /// The attempt.
        number: u32,
        /// Its end in words.
        message: String,
        /// `spec.memoryLimit`.
        memory_limit: String,
    },
    /// The build published and the query service is applied: Ready once it is available.
    Published {
        /// `<name>-query`.
        query: String,
        /// `status.endpoint`.
        endpoint: String,
    },
    /// Ready and serving: the query service is applied again.
    Served {
        /// `<name>-query`.
        query: String,
        /// `status.endpoint`.
        endpoint: String,
    },
    /// Set a condition.
    Condition {
        /// Its type.
        type_: &'static str,
        /// True or False.
        status: bool,
        /// Reason.
        reason: &'static str,
        /// Message.
        message: String,
    },
}

/// Records `step` after the effects before it succeeded (`done`: what the last one reported);
/// returns a requeue that replaces the plan's.
pub fn record(draft: &mut StatusDraft, step: Step, done: Done) -> Option<Duration> {
    match step {
        Step::Scanning(message) => {
            draft.scanning(message);
            None
        }
        Step::AttemptStarted {
            attempt,
            memory_limit,
            found,
            why,
        } => {
            let adopted = found || done == Done::Created(false);
            let pod = attempt.pod.clone().unwrap_or_default();
            let place = format!("pod {pod}{}", if adopted { " (adopted)" } else { "" });
            draft.attempt_started(attempt, &memory_limit, &place, why);
            None
        }
        Step::StoppedForPressure {
            number,
            message,
            memory_limit,
        } => {
            let end = pods::deleted_end(Stop::Pressure);
            draft.attempt_ended(number, &end, message, None, &memory_limit);
            None
        }
        Step::Published { query, endpoint } => {
            draft.status.endpoint = Some(endpoint);
            draft.published();
            let available = done == Done::Available(true);
            if available || conditions::is_true(&draft.status.conditions, READY) {
                let message = served_message(&draft.status);
                draft.ready("IndexServed", message, "Publish");
                Some(REQUEUE_IDLE)
            } else {
                let message = format!(
                    "index generation {} published; waiting for an available replica of {query}",
                    draft.status.unit.index_generation.unwrap_or(0),
                );
                draft.set_condition(READY, false, "WaitingForQueryService", &message);
                draft.set_condition(PROGRESSING, true, "WaitingForQueryService", &message);
                Some(REQUEUE_WATCH)
            }
        }
        Step::Served { query, endpoint } => {
            draft.status.endpoint = Some(endpoint);
            if done == Done::Available(true) {
                let message = served_message(&draft.status);
                if draft.set_condition(READY, true, "IndexServed", &message) {
                    draft.note(false, "Ready", "Serve", message);
                }
            } else {
                let message = format!("{query} has no available replica");
                if draft.set_condition(READY, false, "QueryServiceUnavailable", &message) {
                    draft.note(true, "QueryServiceUnavailable", "Serve", message);
                }
            }
            None
        }
        Step::Condition {
            type_,
            status,
            reason,
            message,
        } => {
            draft.set_condition(type_, status, reason, &message);
            None
        }
    }
}

fn served_message(status: &ImageIndexStatus) -> String {
    format!(
        "index generation {} is served at {}",
        status.unit.index_generation.unwrap_or(0),
        status.endpoint.clone().unwrap_or_default()
    )
}
