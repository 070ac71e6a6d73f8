//! `POST /v1/shard/search`: a router's query to one shard. The body carries the query's
//! features (the router decoded and extracted the image once); the shard looks them up,
//! verifies its leading candidates and answers them unordered with their rank keys, plus its
//! nearest layouts, from the generation the router pinned.

use super::errors::ApiError;
use super::App;
use crate::route::wire::{ShardAnswer, ShardQuery};
use crate::search::SearchParams;
use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use std::sync::Arc;

/// Answers a router's [`ShardQuery`].
pub async fn search(
    State(app): State<Arc<App>>,
    body: Bytes,
) -> Result<Json<ShardAnswer>, ApiError> {
    let q: ShardQuery = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("bad_shard_query", format!("shard query: {e}")))?;
    if q.k == 0 || q.k > super::search::MAX_K {
        return Err(ApiError::bad_request(
            "bad_parameter",
            format!("k must be from 1 to {}", super::search::MAX_K),
        ));
    }
    let f = q
        .features
        .decode()
        .map_err(|e| ApiError::bad_request("bad_shard_query", e.to_string()))?;
    let loaded = match q.generation {
        None => app.index.get().ok_or(ApiError::NoIndex)?,
        Some(g) => app
            .index
            .get_generation(g)
            .ok_or_else(|| ApiError::Conflict {
                code: "generation_gone",
                message: format!(
                    "generation {g} is not served here (serving {:?})",
                    app.index.generations()
                ),
            })?,
    };
    let ticket = app.admission.enter()?;
    let reserved = ticket.reserve_body(body.len() as u64).await?;
    let slot = ticket.slot(reserved).await?;
    let answer = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let index = &loaded.index;
        let params = SearchParams {
            k: q.k,
            verify: q.verify,
            ..SearchParams::for_index(&index.meta)
        };
        let (candidates, lookup_ms, verify_ms) = index.candidates(&f, &params)?;
        let layouts = match (&f.global, q.global) {
            (Some(g), true) => index.near_layouts(g, 2)?,
            _ => Vec::new(),
        };
        Ok::<_, crate::IndexError>(ShardAnswer {
            generation: index.generation,
            shard: index.meta.shard,
            candidates,
            layouts,
            lookup_ms,
            verify_ms,
        })
    })
    .await
    .map_err(|e| ApiError::Internal(format!("shard search task: {e}")))?
    .map_err(|e| ApiError::Internal(format!("shard search: {e}")))?;
    app.metrics
        .observe_stages(&[("lookup", answer.lookup_ms), ("verify", answer.verify_ms)]);
    Ok(Json(answer))
}
