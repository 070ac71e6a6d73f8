//! Receiving the query image: the declared size is checked before a byte is read, the
//! streamed body is capped while it arrives, and multipart uploads yield their `image` field.

use super::errors::ApiError;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, request::Parts, HeaderMap};
use futures::StreamExt;
use std::time::Duration;

/// Longest time a client may take to send its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// After refusing a body as too large, at most this much more of it is read and discarded
/// (never kept) so the client, still sending, receives the 413 instead of a reset. (Other
/// refusals drain at most `--max-body`.)
pub const DRAIN_BYTES: u64 = 256 << 20;
/// ... and for at most this long.
pub const DRAIN_TIME: Duration = Duration::from_secs(10);

/// How the image is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadKind {
    /// The body is the image, whatever it is labelled (`image/*`, `application/octet-stream`,
    /// curl's default `application/x-www-form-urlencoded`, none): the bytes themselves say
    /// whether it is an image, and a non-image is refused with 415 by its content.
    Raw,
    /// A `multipart/form-data` form with an `image` field.
    Multipart,
}

/// The upload kind from the `Content-Type` header.
pub fn upload_kind(headers: &HeaderMap) -> Result<UploadKind, ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(UploadKind::Raw);
    };
    let ct = ct
        .to_str()
        .map_err(|_| ApiError::bad_request("bad_header", "Content-Type is not ASCII"))?
        .trim()
        .to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence == "multipart/form-data" {
        Ok(UploadKind::Multipart)
    } else {
        Ok(UploadKind::Raw)
    }
}

/// Reads and discards the rest of a refused body in the background (at most `cap` bytes and
/// [`DRAIN_TIME`]): a client that is still sending then reads the error answer instead of
/// losing it to a connection reset. Nothing is kept in memory.
pub fn drain_later(body: Body, cap: u64) {
    tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        let mut seen = 0u64;
        let drain = async {
            while let Some(Ok(chunk)) = stream.next().await {
                seen += chunk.len() as u64;
                if seen > cap {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    });
}

/// Whether the client waits for `100 Continue` before sending its body (then a refusal
/// needs no draining: the body never comes).
pub fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// Refuses a request whose body has not been read: answers `error` at once and, unless the
/// client waits for `100 Continue`, drains what it keeps sending (see [`drain_later`]).
pub fn refuse(request: Request, error: ApiError, max_body: u64) -> ApiError {
    if !expects_continue(request.headers()) {
        let cap = if matches!(error, ApiError::BodyTooLarge { .. }) {
            DRAIN_BYTES
        } else {
            max_body
        };
        drain_later(request.into_body(), cap);
    }
    error
}

/// The declared `Content-Length`, refused with 413 above `max` (before reading the body).
pub fn declared_length(headers: &HeaderMap, max: u64) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::CONTENT_LENGTH) else {
        return Ok(None);
    };
    let n: u64 = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| ApiError::bad_request("bad_header", "Content-Length is not a number"))?;
    if n > max {
        return Err(ApiError::BodyTooLarge { limit: max });
    }
    Ok(Some(n))
}

/// Reads a body of at most `max` bytes: 413 as soon as more arrives, 408 when it takes
/// longer than [`BODY_TIMEOUT`].
pub async fn read_limited(body: Body, max: u64, expected: Option<u64>) -> Result<Bytes, ApiError> {
    let read = async move {
        let mut stream = body.into_data_stream();
        let mut buf = Vec::with_capacity(expected.unwrap_or(64 * 1024).min(max) as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request("body_read", format!("the request body broke off: {e}"))
            })?;
            if (buf.len() + chunk.len()) as u64 > max {
                drop(buf);
                drain_later(Body::from_stream(stream), DRAIN_BYTES);
                return Err(ApiError::BodyTooLarge { limit: max });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .map_err(|_| ApiError::BodyTimeout(BODY_TIMEOUT.as_secs()))?
}

/// The `image` field of a buffered multipart body.
pub async fn image_field(parts: Parts, body: Bytes) -> Result<Bytes, ApiError> {
    let request = Request::from_parts(parts, Body::from(body));
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::bad_request("bad_multipart", e.body_text()))?;
    loop {
        let field = form
            .next_field()
            .await
            .map_err(|e| ApiError::bad_request("bad_multipart", e.body_text()))?;
        let Some(field) = field else {
            return Err(ApiError::bad_request(
                "missing_field",
                "the multipart form has no `image` field",
            ));
        };
        if field.name() == Some("image") {
            return field
                .bytes()
                .await
                .map_err(|e| ApiError::bad_request("bad_multipart", e.body_text()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn content_types() {
        let kind = |ct: &str| upload_kind(&headers(&[(header::CONTENT_TYPE, ct)]));
        assert_eq!(kind("image/jpeg").unwrap(), UploadKind::Raw);
        assert_eq!(
            kind("multipart/form-data; boundary=x").unwrap(),
            UploadKind::Multipart
        );
        assert_eq!(kind("application/octet-stream").unwrap(), UploadKind::Raw);
        assert_eq!(
            kind("application/x-www-form-urlencoded").unwrap(),
            UploadKind::Raw
        );
        assert_eq!(upload_kind(&HeaderMap::new()).unwrap(), UploadKind::Raw);
    }

    #[test]
    fn declared_length_is_checked_first() {
        let h = headers(&[(header::CONTENT_LENGTH, "100000000")]);
        assert_eq!(
            declared_length(&h, 1000).unwrap_err().status().as_u16(),
            413
        );
        let h = headers(&[(header::CONTENT_LENGTH, "10")]);
        assert_eq!(declared_length(&h, 1000).unwrap(), Some(10));
        let h = headers(&[(header::CONTENT_LENGTH, "ten")]);
        assert_eq!(
            declared_length(&h, 1000).unwrap_err().status().as_u16(),
            400
        );
    }

    #[tokio::test]
    async fn streamed_bodies_are_capped() {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            (0..10).map(|_| Ok(Bytes::from(vec![0u8; 300]))).collect();
        let body = Body::from_stream(futures::stream::iter(chunks));
        let e = read_limited(body, 1000, None).await.unwrap_err();
        assert_eq!(e.status().as_u16(), 413);
        let ok = read_limited(Body::from(vec![1u8; 1000]), 1000, None)
            .await
            .unwrap();
        assert_eq!(ok.len(), 1000);
    }
}
