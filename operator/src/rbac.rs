//! The least-privilege RBAC rules the operator needs, as data: the Helm chart's ClusterRole
//! must match [`RULES`] exactly, and the API-server tests run the operator as a user bound to
//! exactly these rules, so a missing permission fails a test instead of hiding behind an
//! admin token.
//!
//! Why each verb is there:
//! - `imageindexes`: `get` (each reconcile reads the object fresh), `list`/`watch` (the
//!   controller's watch).
//! - `imageindexes/status`: `patch` (status is written with server-side apply).
//! - `pods`: `list`/`watch` (owned pods; the reconcile lists scan and build pods by label),
//!   `create`, `delete` (stop a build on critical memory pressure, clear an earlier build's
//!   pods).
//! - `persistentvolumeclaims`: `get`, `create` (the index claim).
//! - `services`: `create`, `patch` (server-side apply of the query Service and of a sharded
//!   index's shard Services; an apply that creates the object is also authorized as
//!   `create`), `list` (the router is given the shard Services' ClusterIPs).
//! - `deployments`: `list`/`watch` (owned), `create`, `patch` (server-side apply of the query
//!   Deployment, likewise).
//! - `events.k8s.io/events`: `create`, `patch` (kube's `Recorder` uses the events.k8s.io/v1 API
//!   only and patches a repeated event into a series; no core `events` permission is needed).

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// One RBAC rule: an API group, resources and verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// API group (`""` for the core group).
    pub api_group: &'static str,
    /// Resources (subresources as `resource/sub`).
    pub resources: &'static [&'static str],
    /// Verbs.
    pub verbs: &'static [&'static str],
}

/// Every permission the operator uses, and nothing else (no wildcards).
pub const RULES: &[Rule] = &[
    Rule {
        api_group: "imagematch.dev",
        resources: &["imageindexes"],
        verbs: &["get", "list", "watch"],
    },
    Rule {
        api_group: "imagematch.dev",
        resources: &["imageindexes/status"],
        verbs: &["patch"],
    },
    Rule {
        api_group: "",
        resources: &["pods"],
        verbs: &["list", "watch", "create", "delete"],
    },
    Rule {
        api_group: "",
        resources: &["persistentvolumeclaims"],
        verbs: &["get", "create"],
    },
    Rule {
        api_group: "",
        resources: &["services"],
        verbs: &["list", "create", "patch"],
    },
    Rule {
        api_group: "apps",
        resources: &["deployments"],
        verbs: &["list", "watch", "create", "patch"],
    },
    Rule {
        api_group: "events.k8s.io",
        resources: &["events"],
        verbs: &["create", "patch"],
    },
];

/// The rules as Kubernetes `PolicyRule`s.
pub fn policy_rules() -> Vec<PolicyRule> {
    RULES
        .iter()
        .map(|r| PolicyRule {
            api_groups: Some(vec![r.api_group.to_string()]),
            resources: Some(r.resources.iter().map(|s| s.to_string()).collect()),
            verbs: r.verbs.iter().map(|s| s.to_string()).collect(),
            ..PolicyRule::default()
        })
        .collect()
}

/// A ClusterRole named `name` with exactly [`RULES`].
pub fn cluster_role(name: &str) -> ClusterRole {
    ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        rules: Some(policy_rules()),
        ..ClusterRole::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_wildcards_and_no_duplicates() {
        let mut seen = std::collections::BTreeSet::new();
        for r in RULES {
            assert!(!r.api_group.contains('*'));
            for res in r.resources {
                assert!(!res.contains('*'), "{res}");
                assert!(seen.insert((r.api_group, *res)), "{res} listed twice");
            }
            assert!(r.verbs.iter().all(|v| *v != "*"));
        }
    }

    #[test]
    fn nothing_writes_what_the_operator_only_reads() {
        let verbs = |group: &str, res: &str| -> Vec<&str> {
            RULES
                .iter()
                .filter(|r| r.api_group == group && r.resources.contains(&res))
                .flat_map(|r| r.verbs.iter().copied())
                .collect()
        };
        assert_eq!(
            verbs("imagematch.dev", "imageindexes"),
            ["get", "list", "watch"]
        );
        assert_eq!(verbs("imagematch.dev", "imageindexes/status"), ["patch"]);
        assert!(!verbs("", "persistentvolumeclaims").contains(&"delete"));
        assert!(verbs("", "secrets").is_empty());
        assert!(verbs("", "events").is_empty());
        let role = cluster_role("imageindex-operator");
        assert_eq!(role.rules.as_ref().map(Vec::len), Some(RULES.len()));
    }
}
