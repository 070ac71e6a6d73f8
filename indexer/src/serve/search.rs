//! `POST /v1/search`: admission, upload, header check, then decode + extract + lookup +
//! verify on a blocking thread inside a decode slot, answered with the generation that
//! answered.

use super::api::{MatchOut, QueryImage, SearchResponse, TimingsOut, Warning};
use super::body::{self, UploadKind};
use super::errors::ApiError;
use super::limits;
use super::App;
use crate::features::{Detector, ExtractParams};
use crate::imageguard::{self, Header};
use crate::search::{self, Answer, SearchParams};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::Json;
use std::sync::Arc;
use std::time::Instant;

/// Largest `k` a client may ask for.
pub const MAX_K: usize = 100;

/// Parsed query parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SearchQuery {
    /// Matches to return.
    pub k: usize,
    /// Verify with RANSAC.
    pub verify: bool,
    /// Search the mirrored image too when nothing verifies.
    pub mirror: bool,
}

/// Reads a boolean query parameter.
fn parse_bool(name: &str, value: &str) -> Result<bool, ApiError> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(ApiError::bad_request(
            "bad_parameter",
            format!("{name} must be true or false, not {value:?}"),
        )),
    }
}

impl SearchQuery {
    /// Parses `k`, `verify` and `mirror`; anything else, repeated or malformed is a 400.
    pub fn parse(pairs: &[(String, String)]) -> Result<SearchQuery, ApiError> {
        let defaults = SearchParams::default();
        let mut q = SearchQuery {
            k: defaults.k,
            verify: defaults.verify,
            mirror: defaults.mirror,
        };
        let mut seen = Vec::new();
        for (name, value) in pairs {
            if seen.contains(&name.as_str()) {
                return Err(ApiError::bad_request(
                    "bad_parameter",
                    format!("parameter {name:?} given twice"),
                ));
            }
            seen.push(name.as_str());
            match name.as_str() {
                "k" => {
                    q.k = value
                        .parse::<usize>()
                        .ok()
                        .filter(|k| (1..=MAX_K).contains(k))
                        .ok_or_else(|| {
                            ApiError::bad_request(
                                "bad_parameter",
                                format!(
                                    "k must be a whole number from 1 to {MAX_K}, not {value:?}"
                                ),
                            )
                        })?;
                }
                "verify" => q.verify = parse_bool(name, value)?,
                "mirror" => q.mirror = parse_bool(name, value)?,
                other => {
                    return Err(ApiError::bad_request(
                        "bad_parameter",
                        format!("unknown parameter {other:?} (k, verify, mirror)"),
                    ))
                }
            }
        }
        Ok(q)
    }
}

/// An upload accepted for searching: its parameters, bytes and header, the decode slot it
/// holds, and how long it waited for it.
pub struct Upload {
    /// Parsed query parameters.
    pub q: SearchQuery,
    /// The image bytes.
    pub image: axum::body::Bytes,
    /// Its header.
    pub header: Header,
    /// The decode slot (released when dropped).
    pub slot: super::admission::Slot,
    /// Milliseconds from arrival to holding the slot.
    pub queue_ms: f64,
}

/// Everything `POST /v1/search` does before decoding, shared by the query service and the
/// router: parameters, `ready` (the index or shards to answer from, else a 503), upload
/// kind and declared length (refused at once, before the body is read), admission, the body
/// within `--max-body`, the header check, the memory cost of decoding it under the
/// `preset_of` that index, and a decode slot.
pub async fn receive<T>(
    plan: &limits::ServeLimits,
    admission: &super::admission::Admission,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    request: Request,
    ready: impl FnOnce() -> Result<T, ApiError>,
    preset_of: impl Fn(&T) -> imageindex_crds::Preset,
) -> Result<(Upload, T), ApiError> {
    let started = Instant::now();
    let max_body = plan.max_body;
    // Everything that can refuse the request before its body is read; a refusal is answered
    // at once (a 413 from the declared length before a byte of the body).
    let checked = (|| {
        let Query(pairs) =
            query.map_err(|e| ApiError::bad_request("bad_parameter", e.body_text()))?;
        let q = SearchQuery::parse(&pairs)?;
        let loaded = ready()?;
        let kind = body::upload_kind(request.headers())?;
        let declared = body::declared_length(request.headers(), max_body)?;
        Ok((q, loaded, kind, declared))
    })();
    let (q, loaded, kind, declared) = match checked {
        Ok(c) => c,
        Err(e) => return Err(body::refuse(request, e, max_body)),
    };
    let ticket = match admission.enter() {
        Ok(t) => t,
        Err(e) => return Err(body::refuse(request, e, max_body)),
    };
    let reserved = match ticket.reserve_body(declared.unwrap_or(max_body)).await {
        Ok(r) => r,
        Err(e) => return Err(body::refuse(request, e, max_body)),
    };
    let (parts, raw) = request.into_parts();
    let bytes = body::read_limited(raw, max_body, declared).await?;
    let image = match kind {
        UploadKind::Raw => bytes,
        UploadKind::Multipart => body::image_field(parts, bytes).await?,
    };
    let header = imageguard::header(&image).map_err(|r| ApiError::from_refusal(&r))?;
    let preset = preset_of(&loaded);
    let cost = limits::query_bytes(&preset, &header, image.len() as u64);
    if cost > plan.slot_bytes {
        return Err(ApiError::unprocessable(
            "too_large_for_memory",
            format!(
                "a {}x{} {:?} image needs about {} MiB to search, above the {} MiB one query may use here",
                header.width,
                header.height,
                header.format,
                cost >> 20,
                plan.slot_bytes >> 20
            ),
        ));
    }
    let slot = ticket.slot(reserved).await?;
    let queue_ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok((
        Upload {
            q,
            image,
            header,
            slot,
            queue_ms,
        },
        loaded,
    ))
}

/// Search the catalogue with an image.
#[utoipa::path(
    post,
    path = "/v1/search",
    tag = "search",
    params(super::api::SearchQueryDoc),
    request_body(
        description = "The query image: a multipart form with the field `image`, or the raw image as the body",
        content(
            (super::api::SearchUpload = "multipart/form-data"),
            ("image/jpeg"),
            ("image/png"),
            ("image/webp"),
            ("application/octet-stream")
        )
    ),
    responses(
        (status = 200, description = "Matches in rank order (none, with a warning, when the image has no features)", body = SearchResponse),
        (status = 400, description = "Bad parameter, missing field or empty image", body = super::errors::ErrorBody),
        (status = 401, description = "No valid token", body = super::errors::ErrorBody),
        (status = 413, description = "Body over --max-body (checked before reading it)", body = super::errors::ErrorBody),
        (status = 415, description = "Not an image", body = super::errors::ErrorBody),
        (status = 422, description = "Corrupt, truncated beyond decoding, or too large (e.g. a header claiming 50,000 × 50,000)", body = super::errors::ErrorBody),
        (status = 503, description = "No index loaded yet, or the wait queue is full (Retry-After)", body = super::errors::ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn search(
    State(app): State<Arc<App>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    request: Request,
) -> Result<Json<SearchResponse>, ApiError> {
    let started = Instant::now();
    let (upload, loaded) = receive(
        &app.limits,
        &app.admission,
        query,
        request,
        || app.index.get().ok_or(ApiError::NoIndex),
        |l| l.index.meta.preset,
    )
    .await?;
    let Upload {
        q,
        image,
        header,
        slot,
        queue_ms,
    } = upload;
    let preset = loaded.index.meta.preset;

    // The same settings as `indexer search` on this index (the HTTP answer equals the CLI's).
    let params = SearchParams {
        k: q.k,
        verify: q.verify,
        mirror: q.mirror,
        ..SearchParams::for_index(&loaded.index.meta)
    };
    let worker_index = loaded.clone();
    let worker_image = image.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let mut detector =
            Detector::for_queries(ExtractParams::for_query(&worker_index.index.meta.preset))
                .map_err(|e| ApiError::Internal(format!("ORB detector: {e}")))?;
        let complete = imageguard::looks_complete(header.format, &worker_image);
        search::search_bytes(&worker_index.index, &mut detector, &worker_image, &params)
            .map(|a| (a, complete))
            .map_err(|e| ApiError::from_query(e, complete))
    })
    .await;
    let (answer, complete) =
        outcome.map_err(|e| ApiError::Internal(format!("search task: {e}")))??;

    let response = respond(
        loaded.index.generation,
        &q,
        &answer,
        &header,
        image.len() as u64,
        complete,
        queue_ms,
        started,
        preset.nfeatures,
    );
    let t = &answer.timings;
    app.metrics.observe_stages(&[
        ("queue", queue_ms),
        ("decode", t.decode_ms),
        ("extract", t.extract_ms),
        ("lookup", t.lookup_ms),
        ("verify", t.verify_ms),
    ]);
    tracing::debug!(
        generation = response.generation,
        matches = response.matches.len(),
        features = response.features,
        total_ms = response.timings.total_ms,
        "search"
    );
    Ok(Json(response))
}

/// The JSON answer to one search.
#[allow(clippy::too_many_arguments)]
pub fn respond(
    generation: u64,
    q: &SearchQuery,
    answer: &Answer,
    header: &Header,
    bytes: u64,
    complete: bool,
    queue_ms: f64,
    started: Instant,
    nfeatures: u32,
) -> SearchResponse {
    let matches: Vec<MatchOut> = answer
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| MatchOut {
            rank: i + 1,
            id: m.id,
            path: m.path.clone(),
            score: m.score,
            inliers: if q.verify { m.inliers } else { None },
            verified: q.verify.then_some(m.verified),
            matched_by: m.matched_by,
            layout_distance: m.layout_distance,
            shard: m.shard,
        })
        .collect();
    let mut warnings = Vec::new();
    let warn = |code: &str, message: String| Warning {
        code: code.to_string(),
        message,
    };
    if !complete {
        warnings.push(warn(
            "truncated",
            format!(
                "the {:?} data is truncated: searched with the part that decoded",
                header.format
            ),
        ));
    }
    if answer.features == 0 {
        warnings.push(warn(
            "no_features",
            "no ORB features were found in the image (blank, flat or too small to describe), so nothing can match it".to_string(),
        ));
    } else {
        if (answer.features as u32) < (nfeatures / 10).max(16) {
            warnings.push(warn(
                "few_features",
                format!(
                    "only {} features were found; matches may be unreliable",
                    answer.features
                ),
            ));
        }
        if matches.is_empty() {
            warnings.push(warn(
                "no_match",
                "no catalogue image shares enough features with the query".to_string(),
            ));
        }
    }
    let t = &answer.timings;
    SearchResponse {
        generation,
        k: q.k,
        verify: q.verify,
        mirrored: answer.mirrored,
        matches,
        features: answer.features,
        adaptation: serde_json::to_value(answer.adaptation).unwrap_or_default(),
        timings: TimingsOut {
            queue_ms,
            decode_ms: t.decode_ms,
            extract_ms: t.extract_ms,
            lookup_ms: t.lookup_ms,
            verify_ms: t.verify_ms,
            total_ms: started.elapsed().as_secs_f64() * 1000.0,
        },
        image: QueryImage {
            format: format!("{:?}", header.format).to_lowercase(),
            width: header.width,
            height: header.height,
            bytes,
        },
        warnings,
        coverage: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn parameters_are_validated() {
        assert_eq!(
            SearchQuery::parse(&[]).unwrap(),
            SearchQuery {
                k: 5,
                verify: true,
                mirror: true
            }
        );
        assert_eq!(
            SearchQuery::parse(&pairs(&[("k", "12"), ("verify", "false"), ("mirror", "0")]))
                .unwrap(),
            SearchQuery {
                k: 12,
                verify: false,
                mirror: false
            }
        );
        for bad in [
            vec![("k", "0")],
            vec![("k", "abc")],
            vec![("k", "101")],
            vec![("k", "-1")],
            vec![("verify", "maybe")],
            vec![("mirror", "yes")],
            vec![("kk", "1")],
            vec![("k", "1"), ("k", "2")],
        ] {
            let e = SearchQuery::parse(&pairs(&bad)).unwrap_err();
            assert_eq!(e.status().as_u16(), 400, "{bad:?}");
        }
    }
}
