//! The `ImageIndex` custom resource (group `imagematch.dev`, version `v1alpha1`).

use crate::preset::PresetSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of an ImageIndex: which images, which preset, how much memory.
// Each `printcolumn(..)` repeats `type_ = "string"`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "imagematch.dev",
    version = "v1alpha1",
    kind = "ImageIndex",
    namespaced,
    shortname = "imgidx",
    category = "imagematch",
    status = "ImageIndexStatus",
    derive = "PartialEq",
    doc = "An ORB + ANN image index over a dataset, built under a memory limit and served over HTTP.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Preset", type_ = "string", json_path = ".status.preset"),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress.summary"
    ),
    printcolumn(
        name = "Memory",
        type_ = "string",
        json_path = ".status.memory.summary"
    ),
    printcolumn(name = "Shards", type_ = "string", json_path = ".status.shardsReady"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndexSpec {
    /// Where the images are.
    pub dataset: DatasetSource,
    /// `auto` (default) or one of full, small, medium, large, xlarge.
    #[serde(default)]
    pub preset: PresetSelector,
    /// Memory limit of the build (a Kubernetes quantity such as `512Mi`); the build pod's
    /// request and limit both equal it, and the build plans its memory to fit it.
    pub memory_limit: String,
    /// Container image with the `indexer` binary (default: the operator's configured image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub indexer_image: Option<String>,
    /// The volume the index is written to and served from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<IndexStorage>,
    /// The query service made once the index is Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<QuerySpec>,
    /// CPU request and limit of the build pod (a quantity such as `2`); extraction uses
    /// one thread per whole CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Attempts (builds started) before the index is declared Failed. Default 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Change this token to build a new generation while the current one keeps serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<String>,
    /// Shards the index is split into: a number (1..=64, default 1: one unsharded index) or
    /// `auto` (enough that each shard fits one pod, from the scan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<crate::shards::ShardCount>,
    /// Shard build pods running at once (default: all shards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel_builds: Option<u32>,
}

/// Where a dataset lives: a directory inside a PersistentVolumeClaim (cluster) or a local
/// directory (local mode, `claimName` absent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSource {
    /// The PersistentVolumeClaim holding the images (mounted read-only). Required in a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// Directory of the images: inside the claim in a cluster, a local path in local mode.
    // Not serialized when empty, so the schema carries no `default: ''`, which the v1.20
    // API server rejects ("in body must be of type string: \"null\"").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
}

/// The index volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct IndexStorage {
    /// Use this existing claim instead of making `<name>-index`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// Size of the claim the operator makes (default `10Gi`); also bounds the preset's disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Storage class of the claim the operator makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Access modes of the claim the operator makes (default `ReadWriteOnce`; use
    /// `ReadWriteMany` when build and query pods may land on different nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_modes: Option<Vec<String>>,
}

/// The query service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct QuerySpec {
    /// Replicas of the query Deployment (default 1; 0 builds without serving).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Memory limit of each query pod (default `512Mi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<String>,
    /// CPU limit of each query pod (default `1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Secret with a key `tokens` in the `indexer serve --auth-file` format; without it the
    /// service is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret_name: Option<String>,
}

/// Where an ImageIndex is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum IndexPhase {
    /// Accepted, nothing started yet (or waiting to retry).
    Pending,
    /// The scan pod is counting the dataset.
    Scanning,
    /// A build attempt is running.
    Building,
    /// An index is published and served.
    Ready,
    /// Given up; the conditions say why.
    Failed,
}

/// Observed state of an ImageIndex.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndexStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, MemoryPressure, Degraded and PresetFits, merged by type.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// What the scan found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<ScanSummary>,
    /// URL of the query service once Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The rebuild token the current (or last finished) build was made for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<String>,
    /// The build unit (phase, preset, attempts, progress, memory, index generation), beside
    /// what the whole index shares (conditions, the scan, the endpoint, the rebuild token). An
    /// unsharded index is one unit, kept in `status` itself.
    #[serde(flatten)]
    pub unit: UnitStatus,
    /// Each shard's build unit when `spec.shards` > 1 (the fields above are then their whole).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,
    /// Shards Ready out of all, e.g. `2/3` (sharded indexes only), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards_ready: Option<String>,
}

/// One shard's build unit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// The shard's 0-based number (`--shard <shard>/<N>`, label `imagematch.dev/shard`).
    pub shard: u32,
    /// Its phase, preset, attempts, progress, memory and index generation.
    #[serde(flatten)]
    pub unit: UnitStatus,
}

/// One build unit: an attempt ladder (attempts, each with its preset) that ends in a published
/// index generation. An unsharded ImageIndex is one unit (its fields sit directly in
/// `status`); a sharded one will keep one per shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct UnitStatus {
    /// Pending, Scanning, Building, Ready or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<IndexPhase>,
    /// The preset of the current or last attempt (`full`, …, `xlarge-nf50`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Every build attempt, oldest first.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// Progress of the current build (or the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Memory of the current build as scraped from its metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStatus>,
    /// Builds that published an index (1 after the first, 2 after a rebuild, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_generation: Option<u64>,
}

/// The scan's findings, as kept in status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ScanSummary {
    /// Images found.
    pub images: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files skipped by the scan.
    pub skipped: u64,
    /// Dataset fingerprint.
    pub fingerprint: String,
    /// Largest sampled image width.
    pub max_width: u32,
    /// Largest sampled image height.
    pub max_height: u32,
    /// Whether the largest sampled image is a JPEG.
    pub max_is_jpeg: bool,
    /// The scan pod (or local run) whose report this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The scan's largest sampled images, largest first (each shard's estimates use its own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub largest: Vec<crate::scan::LargeImage>,
    /// Number of the first build attempt made from this scan: attempts numbered below it
    /// belong to earlier builds (a rebuild continues the numbering and gets its own
    /// `maxAttempts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_attempt: Option<u32>,
}

impl ScanSummary {
    /// The summary kept in status for a scan report (without pod and first attempt).
    pub fn from_report(report: &crate::scan::ScanReport) -> Self {
        ScanSummary {
            images: report.images,
            bytes: report.bytes,
            skipped: report.skipped,
            fingerprint: report.fingerprint.clone(),
            max_width: report.shape.max_width,
            max_height: report.shape.max_height,
            max_is_jpeg: report.shape.max_is_jpeg,
            largest: report.largest.clone(),
            pod: None,
            first_attempt: None,
        }
    }

    /// The dataset shape the policy decides on.
    pub fn shape(&self) -> crate::estimate::DatasetShape {
        crate::estimate::DatasetShape {
            images: self.images,
            bytes: self.bytes,
            max_width: self.max_width,
            max_height: self.max_height,
            max_is_jpeg: self.max_is_jpeg,
        }
    }
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AttemptOutcome {
    /// The build published an index.
    Succeeded,
    /// The kernel killed the build for exceeding its memory limit.
    #[serde(rename = "OOMKilled")]
    OomKilled,
    /// The operator stopped the build on sustained critical memory pressure.
    MemoryPressureRestart,
    /// The build exited with an error.
    Failed,
    /// The build was killed (SIGKILL, exit 137) with no sign of the OOM killer: neither the
    /// kernel nor the kubelet reported one and its memory was not near the limit. Retried
    /// with the same preset.
    Killed,
    /// The build pod disappeared or was stopped from outside (not counted as a failure).
    Interrupted,
}

impl AttemptOutcome {
    /// The name used in status, events and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "Succeeded",
            Self::OomKilled => "OOMKilled",
            Self::MemoryPressureRestart => "MemoryPressureRestart",
            Self::Failed => "Failed",
            Self::Killed => "Killed",
            Self::Interrupted => "Interrupted",
        }
    }
}

/// One build attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// 1-based attempt number (also the pod's `imagematch.dev/attempt` label).
    pub number: u32,
    /// Preset label of the attempt.
    pub preset: String,
    /// Name of the build pod (or local process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// When it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// How it ended (absent while running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<AttemptOutcome>,
    /// Highest process RSS scraped during the attempt (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss: Option<u64>,
    /// Highest working set scraped during the attempt (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_working_set: Option<u64>,
    /// Exit code, when the build exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// What happened, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Progress of a build, from its metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Images extracted (including failed ones).
    pub processed: u64,
    /// Images in the dataset.
    pub total: u64,
    /// Images skipped as unreadable or not images.
    pub failed: u64,
    /// Descriptors stored.
    pub descriptors: u64,
    /// Build phase: scan, extract, index, publish, done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_phase: Option<String>,
    /// `processed/total (pct%)` for `kubectl get`.
    pub summary: String,
}

impl Progress {
    /// Progress with its summary filled in.
    pub fn new(
        processed: u64,
        total: u64,
        failed: u64,
        descriptors: u64,
        build_phase: Option<String>,
    ) -> Self {
        let pct = if total == 0 {
            0.0
        } else {
            processed as f64 * 100.0 / total as f64
        };
        Progress {
            processed,
            total,
            failed,
            descriptors,
            build_phase,
            summary: format!("{processed}/{total} ({pct:.0}%)"),
        }
    }
}

/// Memory of the build, from its metrics (bytes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct MemoryStatus {
    /// Process resident set size.
    pub rss: u64,
    /// cgroup working set (usage minus inactive file cache): what the OOM killer counts.
    pub working_set: u64,
    /// Limit minus working set.
    pub available: u64,
    /// The memory limit.
    pub limit: u64,
    /// Highest working set of the current attempt.
    pub peak: u64,
    /// `working set / limit` for `kubectl get`, e.g. `212Mi/512Mi`.
    pub summary: String,
}

impl MemoryStatus {
    /// Memory status with its summary filled in.
    pub fn new(rss: u64, working_set: u64, available: u64, limit: u64, peak: u64) -> Self {
        let summary = format!(
            "{}/{}",
            crate::quantity::format_mebibytes_ceil(working_set),
            crate::quantity::format_mebibytes_ceil(limit)
        );
        MemoryStatus {
            rss,
            working_set,
            available,
            limit,
            peak,
            summary,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_match_the_contract() {
        assert_eq!(
            serde_json::to_string(&AttemptOutcome::OomKilled).unwrap(),
            "\"OOMKilled\""
        );
        assert_eq!(AttemptOutcome::OomKilled.as_str(), "OOMKilled");
        assert_eq!(
            serde_json::to_string(&AttemptOutcome::MemoryPressureRestart).unwrap(),
            "\"MemoryPressureRestart\""
        );
    }

    #[test]
    fn summaries_read_well_in_kubectl() {
        assert_eq!(Progress::new(12, 24, 1, 9000, None).summary, "12/24 (50%)");
        assert_eq!(Progress::new(0, 0, 0, 0, None).summary, "0/0 (0%)");
        assert_eq!(
            MemoryStatus::new(1, 212 << 20, 0, 512 << 20, 0).summary,
            "212Mi/512Mi"
        );
    }

    #[test]
    fn scan_summary_keeps_the_shape_of_its_report() {
        let shape = crate::DatasetShape {
            images: 42,
            bytes: 4200,
            max_width: 4000,
            max_height: 3000,
            max_is_jpeg: true,
        };
        let report = crate::ScanReport::new(shape, 3, 42, "f00d".into(), Some(256 << 20), 2);
        let s = ScanSummary::from_report(&report);
        assert_eq!(s.shape(), shape);
        assert_eq!(
            (
                s.skipped,
                s.fingerprint.as_str(),
                s.pod.as_deref(),
                s.first_attempt
            ),
            (3, "f00d", None, None)
        );
        let json = serde_json::to_value(&s).unwrap();
        assert!(
            json.get("pod").is_none() && json.get("firstAttempt").is_none(),
            "{json}"
        );
    }

    #[test]
    fn minimal_manifest_parses_with_defaults() {
        let yaml = "dataset: {claimName: photos, path: /catalogue}\nmemoryLimit: 512Mi\n";
        let spec: ImageIndexSpec = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(spec.preset, PresetSelector::Auto);
        assert_eq!(spec.dataset.claim_name.as_deref(), Some("photos"));
        assert_eq!(spec.rebuild, None);
    }

    #[test]
    fn the_unit_sits_in_status_itself() {
        let mut s = ImageIndexStatus {
            observed_generation: Some(2),
            ..ImageIndexStatus::default()
        };
        s.unit.phase = Some(IndexPhase::Building);
        s.unit.preset = Some("medium".into());
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"observedGeneration": 2, "conditions": [], "phase": "Building",
                "preset": "medium", "attempts": []})
        );
        let back: ImageIndexStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
        let empty: ImageIndexStatus = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, ImageIndexStatus::default());
    }
}
