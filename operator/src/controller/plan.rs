//! The plan of one reconcile: the effects [`super::apply`] carries out in order, and the
//! status [`Step`]s that follow an effect once it happened (a scan pod made, an attempt's pod
//! created or adopted, the query service available), recorded by [`record`].

use super::{REQUEUE_IDLE, REQUEUE_SHORT, REQUEUE_WATCH};
use crate::pods;
use imageindex_crds::conditions::{self, DEGRADED, PROGRESSING, READY};
use imageindex_crds::labels::Component;
use imageindex_crds::observation::Stop;
use imageindex_crds::transitions::StatusDraft;
use imageindex_crds::types::Attempt;
use imageindex_crds::ImageIndexStatus;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use std::time::Duration;

/// `Degraded` reason while a shard of a Ready index does not serve.
pub const SHARD_UNAVAILABLE: &str = "ShardUnavailable";
/// `Degraded` reason once every shard serves again.
pub const ALL_SHARDS_SERVING: &str = "AllShardsServing";

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
    /// Apply a sharded index's serving objects: each shard's query Deployment and Service,
    /// then the router Deployment and the ImageIndex's Service (server-side apply).
    ApplyShards {
        /// Each shard's query Deployment and Service, in shard order.
        shards: Vec<(Deployment, Service)>,
        /// The router and its Service, once every shard Service has a ClusterIP (`None`:
        /// they are made on a later reconcile).
        router: Option<Box<(Deployment, Service)>>,
        /// The replicas the spec asks for (0: serving is not wanted).
        replicas: i32,
    },
    /// Record a step in status.
    Record(Step),
}

/// What the last effect before a [`Step`] reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Done {
    /// Nothing to report.
    Nothing,
    /// A pod was created (`false`: it existed and was adopted).
    Created(bool),
    /// The query service was applied; whether it has an available replica (or needs none).
    Available(bool),
    /// A sharded index's serving objects were applied.
    Shards {
        /// Whether the router was applied (every shard Service had a ClusterIP).
        router_applied: bool,
        /// Whether the router has an available replica (or needs none).
        router_available: bool,
        /// The shards whose query Deployment has no available replica.
        unavailable: Vec<u32>,
    },
}

impl Done {
    /// Whether the query service answers: the unsharded query Deployment, or the router with
    /// every shard.
    fn all_available(&self) -> bool {
        match self {
            Done::Available(a) => *a,
            Done::Shards {
                router_available,
                unavailable,
                ..
            } => *router_available && unavailable.is_empty(),
            _ => false,
        }
    }
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
        /// The shard whose attempt it is (`None`: unsharded).
        shard: Option<u32>,
    },
    /// The running build's pod was deleted under critical pressure.
    StoppedForPressure {
        /// The attempt.
        number: u32,
        /// Its end in words.
        message: String,
        /// `spec.memoryLimit`.
        memory_limit: String,
        /// The shard whose attempt it is (`None`: unsharded).
        shard: Option<u32>,
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
            shard,
        } => {
            let adopted = found || done == Done::Created(false);
            let pod = attempt.pod.clone().unwrap_or_default();
            let place = format!("pod {pod}{}", if adopted { " (adopted)" } else { "" });
            draft.select(shard);
            draft.attempt_started(attempt, &memory_limit, &place, why);
            draft.select(None);
            None
        }
        Step::StoppedForPressure {
            number,
            message,
            memory_limit,
            shard,
        } => {
            let end = pods::deleted_end(Stop::Pressure);
            draft.select(shard);
            draft.attempt_ended(number, &end, message, None, &memory_limit);
            draft.select(None);
            None
        }
        Step::Published { query, endpoint } => {
            draft.status.endpoint = Some(endpoint);
            draft.published();
            let available = done.all_available();
            if let Done::Shards {
                router_applied: false,
                ..
            } = done
            {
                // The shard Services got their ClusterIPs just now: the router follows shortly.
                let message = "waiting for the shard Services before making the router";
                draft.set_condition(PROGRESSING, true, "WaitingForShardServices", message);
                return Some(REQUEUE_SHORT);
            }
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
            if let Done::Shards { unavailable, .. } = &done {
                shards_serving(draft, &query, unavailable);
            }
            let router_available = match &done {
                Done::Shards {
                    router_available, ..
                } => *router_available,
                other => *other == Done::Available(true),
            };
            if router_available {
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

/// `Degraded` with reason [`SHARD_UNAVAILABLE`] while a shard's query Deployment has no
/// available replica (the router answers without it), cleared once all serve again.
fn shards_serving(draft: &mut StatusDraft, query: &str, unavailable: &[u32]) {
    if !unavailable.is_empty() {
        let names: Vec<String> = unavailable.iter().map(|i| format!("shard {i}")).collect();
        let message = format!(
            "{} not serving (no available replica); {query} answers without {}",
            names.join(", "),
            if unavailable.len() == 1 { "it" } else { "them" }
        );
        if draft.set_condition(DEGRADED, true, SHARD_UNAVAILABLE, &message) {
            draft.note(true, SHARD_UNAVAILABLE, "Serve", message);
        }
    } else if conditions::get(&draft.status.conditions, DEGRADED)
        .is_some_and(|c| c.reason == SHARD_UNAVAILABLE)
    {
        let message = "every shard is serving again".to_string();
        draft.set_condition(DEGRADED, false, ALL_SHARDS_SERVING, &message);
        draft.note(false, ALL_SHARDS_SERVING, "Serve", message);
    }
}

fn served_message(status: &ImageIndexStatus) -> String {
    format!(
        "index generation {} is served at {}",
        status.unit.index_generation.unwrap_or(0),
        status.endpoint.clone().unwrap_or_default()
    )
}
