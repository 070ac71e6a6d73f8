//! Label keys and values every object made for an ImageIndex carries (a contract: dashboards,
//! tests and users select by them).

use std::collections::BTreeMap;

/// `app.kubernetes.io/name`, always `imageindex`.
pub const NAME: &str = "app.kubernetes.io/name";
/// `app.kubernetes.io/instance`: the ImageIndex name.
pub const INSTANCE: &str = "app.kubernetes.io/instance";
/// `app.kubernetes.io/managed-by`, always `imageindex-operator`.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// `app.kubernetes.io/component`: `scan`, `build`, `query` or `shard`.
pub const COMPONENT: &str = "app.kubernetes.io/component";
/// `imagematch.dev/preset` on build pods: the preset label of the attempt.
pub const PRESET: &str = "imagematch.dev/preset";
/// `imagematch.dev/attempt` on build pods: the attempt number (1-based).
pub const ATTEMPT: &str = "imagematch.dev/attempt";
/// `imagematch.dev/rebuild` on scan and build pods: the rebuild token they work for.
pub const REBUILD: &str = "imagematch.dev/rebuild";
/// `imagematch.dev/shard` on a sharded index's build pods and shard query pods: the 0-based
/// shard number.
pub const SHARD: &str = "imagematch.dev/shard";
/// Value of [`NAME`].
pub const APP: &str = "imageindex";
/// Value of [`MANAGED_BY`].
pub const MANAGER: &str = "imageindex-operator";

/// Which part of an ImageIndex an object belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// The scan pod.
    Scan,
    /// A build pod.
    Build,
    /// The query Deployment, its pods and Service (with shards: the router).
    Query,
    /// A sharded index's per-shard query Deployment, its pods and Service.
    Shard,
}

impl Component {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Scan => "scan",
            Component::Build => "build",
            Component::Query => "query",
            Component::Shard => "shard",
        }
    }
}

/// The labels shared by every object of one ImageIndex and component.
pub fn common(instance: &str, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME.to_string(), APP.to_string()),
        (INSTANCE.to_string(), instance.to_string()),
        (MANAGED_BY.to_string(), MANAGER.to_string()),
        (COMPONENT.to_string(), component.as_str().to_string()),
    ])
}

/// The labels of a build pod: the common ones plus preset and attempt.
pub fn build(instance: &str, preset_label: &str, attempt: u32) -> BTreeMap<String, String> {
    let mut labels = common(instance, Component::Build);
    labels.insert(PRESET.to_string(), preset_label.to_string());
    labels.insert(ATTEMPT.to_string(), attempt.to_string());
    labels
}

/// The labels of shard `shard`'s build pod: [`build`]'s plus [`SHARD`].
pub fn shard_build(
    instance: &str,
    preset_label: &str,
    attempt: u32,
    shard: u32,
) -> BTreeMap<String, String> {
    let mut labels = build(instance, preset_label, attempt);
    labels.insert(SHARD.to_string(), shard.to_string());
    labels
}

/// The labels of shard `shard`'s query Deployment, pods and Service.
pub fn shard_query(instance: &str, shard: u32) -> BTreeMap<String, String> {
    let mut labels = common(instance, Component::Shard);
    labels.insert(SHARD.to_string(), shard.to_string());
    labels
}

/// A label selector string matching every object of one ImageIndex.
pub fn instance_selector(instance: &str) -> String {
    format!("{NAME}={APP},{INSTANCE}={instance}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_pods_carry_every_contract_label() {
        let l = build("cats", "xlarge-nf50", 3);
        assert_eq!(l[NAME], "imageindex");
        assert_eq!(l[INSTANCE], "cats");
        assert_eq!(l[MANAGED_BY], "imageindex-operator");
        assert_eq!(l[COMPONENT], "build");
        assert_eq!(l[PRESET], "xlarge-nf50");
        assert_eq!(l[ATTEMPT], "3");
        assert_eq!(
            instance_selector("cats"),
            "app.kubernetes.io/name=imageindex,app.kubernetes.io/instance=cats"
        );
    }

    #[test]
    fn shard_objects_carry_their_shard() {
        let b = shard_build("cats", "full", 2, 1);
        assert_eq!((b[COMPONENT].as_str(), b[SHARD].as_str()), ("build", "1"));
        assert_eq!(b[ATTEMPT], "2");
        let q = shard_query("cats", 0);
        assert_eq!((q[COMPONENT].as_str(), q[SHARD].as_str()), ("shard", "0"));
        assert_eq!(q[INSTANCE], "cats");
    }
}
