//! `GET /v1/images/{id}` and `GET /v1/index`: what the served generation holds.

use super::api::{FailedImage, ImageInfo, IndexInfo, PresetInfo, ServingInfo};
use super::errors::ApiError;
use super::App;
use axum::extract::{Path, State};
use axum::Json;
use std::sync::Arc;
use std::time::SystemTime;

/// Failed images listed by `GET /v1/index`.
pub const FAILED_LISTED: usize = 1000;

/// Metadata of one catalogue image.
#[utoipa::path(
    get,
    path = "/v1/images/{id}",
    tag = "catalogue",
    params(("id" = u32, Path, description = "Catalogue image id (from a search match)")),
    responses(
        (status = 200, description = "The image's record", body = ImageInfo),
        (status = 400, description = "The id is not a number", body = super::errors::ErrorBody),
        (status = 404, description = "No such image", body = super::errors::ErrorBody),
        (status = 503, description = "No index loaded yet", body = super::errors::ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn image(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<ImageInfo>, ApiError> {
    let id: u32 = id.parse().map_err(|_| {
        ApiError::bad_request("bad_parameter", format!("image id {id:?} is not a number"))
    })?;
    let loaded = app.index.get().ok_or(ApiError::NoIndex)?;
    let rec = tokio::task::spawn_blocking({
        let loaded = loaded.clone();
        move || loaded.index.image(id)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("image lookup: {e}")))?
    .map_err(|e| ApiError::Internal(format!("index: {e}")))?
    .ok_or_else(|| {
        ApiError::NotFound(format!(
            "no image {id} in generation {} ({} images)",
            loaded.index.generation,
            loaded.index.image_count()
        ))
    })?;
    Ok(Json(ImageInfo {
        id,
        path: rec.path,
        bytes: rec.bytes,
        width: rec.width,
        height: rec.height,
        work_width: rec.work_width,
        work_height: rec.work_height,
        descriptors_extracted: rec.count,
        descriptors_indexed: loaded.index.kept(id),
        adapted: rec.adaptation.is_some_and(|a| a.adapted()),
        adaptation: rec.adaptation.and_then(|a| serde_json::to_value(a).ok()),
        error: rec.error,
    }))
}

/// The index being served: generation, preset, counts, build times, failures.
#[utoipa::path(
    get,
    path = "/v1/index",
    tag = "catalogue",
    responses(
        (status = 200, description = "The served generation", body = IndexInfo),
        (status = 503, description = "No index loaded yet", body = super::errors::ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn index(State(app): State<Arc<App>>) -> Result<Json<IndexInfo>, ApiError> {
    let loaded = app.index.get().ok_or(ApiError::NoIndex)?;
    let failed = tokio::task::spawn_blocking({
        let loaded = loaded.clone();
        move || loaded.index.failed_images(FAILED_LISTED)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("index listing: {e}")))?
    .map_err(|e| ApiError::Internal(format!("index: {e}")))?;
    let idx = &loaded.index;
    let m = &idx.meta;
    let l = &app.limits;
    Ok(Json(IndexInfo {
        generation: idx.generation,
        generations: app.index.generations(),
        shard: m.shard.map(|s| s.to_string()),
        loaded_at: rfc3339(loaded.loaded_at),
        path: idx.dir.display().to_string(),
        disk_bytes: idx.disk_bytes(),
        preset: PresetInfo {
            name: m.preset.label(),
            nfeatures: m.preset.nfeatures,
            n_trees: m.preset.n_trees,
            search_k: m.preset.search_k,
            max_side: m.preset.max_side,
        },
        dataset: m.dataset.clone(),
        fingerprint: m.fingerprint.clone(),
        images_total: m.images_total,
        images_indexed: m.images_indexed,
        images_failed: m.images_failed,
        descriptors: m.descriptors,
        build_started_at: m.started_at.clone(),
        build_finished_at: m.finished_at.clone(),
        build_timings: serde_json::to_value(&m.timings).unwrap_or_default(),
        build_memory_budget: m.memory_budget,
        build_peak_working_set: m.peak_working_set,
        indexer_version: m.indexer_version.clone(),
        failed_images: failed
            .into_iter()
            .map(|(path, reason)| FailedImage { path, reason })
            .collect(),
        serving: ServingInfo {
            memory_limit: l.limit,
            slots: l.slots,
            slot_bytes: l.slot_bytes,
            queue: l.queue,
            max_body: l.max_body,
            waiting: app.admission.waiting(),
            busy_slots: app.admission.busy_slots(),
        },
    }))
}

/// Formats a time as RFC 3339 (UTC, seconds).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
