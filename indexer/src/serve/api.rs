//! The JSON shapes of the HTTP API (documented in `/openapi.json`). They are the service's
//! contract, kept apart from the index's internal types.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Query parameters of `POST /v1/search`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchQueryDoc {
    /// Matches to return (1–100, default 5).
    pub k: Option<u32>,
    /// Verify candidates with RANSAC (default true).
    pub verify: Option<bool>,
    /// When no candidate verifies, also search the image mirrored left to right (default
    /// true; needs `verify`).
    pub mirror: Option<bool>,
}

/// The multipart form of `POST /v1/search`.
#[derive(Debug, ToSchema)]
pub struct SearchUpload {
    /// The query image (JPEG, PNG, WebP, BMP or TIFF).
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
}

/// One catalogue image found by a query.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MatchOut {
    /// 1-based rank.
    pub rank: usize,
    /// Catalogue image id (see `GET /v1/images/{id}`).
    pub id: u32,
    /// Path relative to the dataset root.
    pub path: String,
    /// Votes: query descriptors whose best unambiguous match is in this image.
    pub score: u32,
    /// RANSAC inliers (only when verified).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inliers: Option<u32>,
    /// Whether RANSAC found a consistent geometry (only when verified).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// What found it: `features` (votes, and inliers when verified) or `layout` (an image
    /// with few or no local features, found by its global layout descriptor).
    #[serde(default)]
    pub matched_by: crate::search::MatchedBy,
    /// Cosine distance between the query's layout and this image's (when layout found it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout_distance: Option<f32>,
    /// The shard holding the image (answers of a sharded index's router; `id` is the
    /// image's id within that shard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
}

/// Which shards answered a query (answers of a sharded index's router).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Coverage {
    /// Shards asked.
    pub asked: u32,
    /// Shards that answered within the deadline.
    pub answered: u32,
    /// Per shard.
    pub shards: Vec<ShardCoverage>,
}

/// One shard's part in an answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ShardCoverage {
    /// The shard (0-based).
    pub shard: u32,
    /// Whether it answered in time.
    pub answered: bool,
    /// The generation that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Milliseconds the router waited for it.
    pub ms: f64,
    /// Why it did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Time spent per step of one query, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TimingsOut {
    /// Waiting for a decode slot (includes receiving the upload).
    pub queue_ms: f64,
    /// Decoding the image.
    pub decode_ms: f64,
    /// ORB extraction.
    pub extract_ms: f64,
    /// Descriptor lookups and voting.
    pub lookup_ms: f64,
    /// RANSAC verification.
    pub verify_ms: f64,
    /// From the request's arrival to the answer.
    pub total_ms: f64,
}

/// What the header of the query image said.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueryImage {
    /// Container format.
    pub format: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Size of the upload in bytes.
    pub bytes: u64,
}

/// Something the client should know about an answer (truncated upload, no features, …).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Warning {
    /// Stable code: `truncated`, `no_features`, `few_features`, `no_match`.
    pub code: String,
    /// Explanation.
    pub message: String,
}

/// The answer to `POST /v1/search`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchResponse {
    /// The index generation that answered.
    pub generation: u64,
    /// Matches asked for.
    pub k: usize,
    /// Whether candidates were verified.
    pub verify: bool,
    /// Matches in rank order.
    pub matches: Vec<MatchOut>,
    /// Query descriptors extracted.
    pub features: usize,
    /// What the detector adapted for the query (ladder step, contrast, resize, …).
    #[schema(value_type = Object)]
    pub adaptation: serde_json::Value,
    /// Per-step times.
    pub timings: TimingsOut,
    /// Whether the matches were found for the query mirrored left to right.
    #[serde(default)]
    pub mirrored: bool,
    /// The query image's header.
    pub image: QueryImage,
    /// Notes about the answer; empty when there is nothing to say.
    pub warnings: Vec<Warning>,
    /// Shards asked and answered (answers of a sharded index's router only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage: Option<Coverage>,
}

/// Metadata of one catalogue image (`GET /v1/images/{id}`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    /// Catalogue image id.
    pub id: u32,
    /// Path relative to the dataset root.
    pub path: String,
    /// File size in bytes.
    pub bytes: u64,
    /// Width in pixels (0 when it could not be read).
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Working-image width ORB ran on.
    pub work_width: u32,
    /// Working-image height.
    pub work_height: u32,
    /// Descriptors extracted.
    pub descriptors_extracted: u32,
    /// Descriptors kept in the index.
    pub descriptors_indexed: u64,
    /// Whether the detector had to adapt (lower thresholds, contrast normalisation).
    pub adapted: bool,
    /// What the detector did (ladder step, FAST threshold, contrast, resize, stretch).
    #[schema(value_type = Option<Object>)]
    pub adaptation: Option<serde_json::Value>,
    /// Why the image could not be indexed, if it could not.
    pub error: Option<String>,
}

/// The preset an index was built with.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PresetInfo {
    /// Label (`full`, `small`, …, `xlarge-nf50`).
    pub name: String,
    /// ORB features per catalogue image.
    pub nfeatures: u32,
    /// arroy trees.
    pub n_trees: u32,
    /// arroy search effort.
    pub search_k: u32,
    /// Longest side of the working image.
    pub max_side: u32,
}

/// A catalogue image that could not be indexed.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct FailedImage {
    /// Path relative to the dataset root.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// How this service bounds its work (see `serve::limits`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ServingInfo {
    /// Memory limit planned for, in bytes.
    pub memory_limit: u64,
    /// Queries decoding at once.
    pub slots: usize,
    /// Bytes one slot may use.
    pub slot_bytes: u64,
    /// Requests allowed to wait for a slot.
    pub queue: usize,
    /// Largest request body in bytes.
    pub max_body: u64,
    /// Requests waiting now.
    pub waiting: usize,
    /// Slots busy now.
    pub busy_slots: usize,
}

/// The index being served (`GET /v1/index`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct IndexInfo {
    /// Generation number.
    pub generation: u64,
    /// The generations this service answers from, current first (a shard keeps the one
    /// before it for routers still pinned to it).
    #[serde(default)]
    pub generations: Vec<u64>,
    /// The shard this index holds (`I/N`), absent for an unsharded index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// When this service loaded it (RFC 3339).
    pub loaded_at: String,
    /// Generation directory.
    pub path: String,
    /// Size on disk in bytes.
    pub disk_bytes: u64,
    /// The preset it was built with.
    pub preset: PresetInfo,
    /// The dataset directory it was built from.
    pub dataset: String,
    /// Dataset fingerprint (paths, sizes, modification times).
    pub fingerprint: String,
    /// Image files in the dataset.
    pub images_total: u64,
    /// Images indexed.
    pub images_indexed: u64,
    /// Images that could not be indexed.
    pub images_failed: u64,
    /// Descriptors indexed.
    pub descriptors: u64,
    /// Build start (RFC 3339).
    pub build_started_at: String,
    /// Build end (RFC 3339).
    pub build_finished_at: String,
    /// Seconds per build phase.
    #[schema(value_type = Object)]
    pub build_timings: serde_json::Value,
    /// The memory budget the build planned for, in bytes.
    pub build_memory_budget: u64,
    /// Highest working set during the build, in bytes.
    pub build_peak_working_set: u64,
    /// Version of the indexer that built it.
    pub indexer_version: String,
    /// Images that could not be indexed, with reasons (at most 1000).
    pub failed_images: Vec<FailedImage>,
    /// How this service bounds its work.
    pub serving: ServingInfo,
}

/// Options of `POST /v1/index/rebuild` (the body is optional).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct RebuildRequest {
    /// `auto` or a preset label; default: the preset of the index being served, else `auto`.
    pub preset: Option<String>,
}

/// Progress of a rebuild.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RebuildProgressOut {
    /// Build phase (scan, extract, index, publish, done).
    pub phase: String,
    /// Images in the dataset.
    pub images_total: u64,
    /// Images extracted or skipped so far.
    pub images_processed: u64,
    /// Images that could not be indexed so far.
    pub images_failed: u64,
    /// Descriptors so far.
    pub descriptors: u64,
}

/// A rebuild (`GET /v1/index/rebuild/{id}`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RebuildStatus {
    /// Rebuild id.
    pub id: u64,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    /// The preset asked for.
    pub preset: String,
    /// Start (RFC 3339).
    pub started_at: String,
    /// End (RFC 3339), once finished.
    pub finished_at: Option<String>,
    /// The generation it published, once succeeded.
    pub generation: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Progress.
    pub progress: RebuildProgressOut,
}

/// `/healthz`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` while the process serves.
    pub status: String,
}

/// `/readyz`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// Whether an index is loaded.
    pub ready: bool,
    /// The generation loaded, if any.
    pub generation: Option<u64>,
    /// Why not ready.
    pub reason: Option<String>,
}
