//! One JSON error type for every route: each variant is one status code and one stable,
//! machine-readable `error` code, so clients (and tests) can act on the kind of failure.

use crate::features::ExtractError;
use crate::imageguard::Refusal;
use crate::search::QueryError;
use crate::IndexError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// Seconds a client is asked to wait (`Retry-After`) when the service is busy or has no
/// index yet.
pub const RETRY_AFTER_SECS: u64 = 2;

/// The JSON body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code (e.g. `not_an_image`, `body_too_large`).
    pub error: String,
    /// What went wrong and what to do about it, for humans.
    pub message: String,
    /// The HTTP status, repeated for clients that only keep the body.
    pub status: u16,
}

/// Why a request failed; converts into a status code and an [`ErrorBody`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A missing or malformed parameter, field or header (400).
    #[error("{message}")]
    BadRequest {
        /// Stable code.
        code: &'static str,
        /// Explanation.
        message: String,
    },
    /// No valid bearer token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The token's role may not use this route (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such resource (404).
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not for this method (405).
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// The client took too long to send its body (408).
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
    /// The request conflicts with the service's state (409).
    #[error("{message}")]
    Conflict {
        /// Stable code.
        code: &'static str,
        /// Explanation.
        message: String,
    },
    /// The body is larger than `--max-body` (413).
    #[error("request body is larger than the {limit}-byte limit (--max-body)")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The body is not an image this service decodes (415).
    #[error("{0}")]
    UnsupportedMedia(String),
    /// An image that cannot be searched: corrupt, too large, unreadable header (422).
    #[error("{message}")]
    Unprocessable {
        /// Stable code.
        code: &'static str,
        /// Explanation.
        message: String,
    },
    /// No index has been published yet (503 with `Retry-After`).
    #[error(
        "no index is loaded yet; build one into the index directory (the service picks it up)"
    )]
    NoIndex,
    /// Every decode slot is taken and the wait queue is full (503 with `Retry-After`).
    #[error("{0}")]
    Busy(String),
    /// No shard of a sharded index answered (503 with `Retry-After`).
    #[error("{0}")]
    NoShard(String),
    /// A fault of the service, not of the request (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// A 422 with a code.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Unprocessable {
            code,
            message: message.into(),
        }
    }

    /// The status code of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMedia(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NoIndex | ApiError::Busy(_) | ApiError::NoShard(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. }
            | ApiError::Conflict { code, .. }
            | ApiError::Unprocessable { code, .. } => code,
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::UnsupportedMedia(_) => "not_an_image",
            ApiError::NoIndex => "no_index",
            ApiError::Busy(_) => "busy",
            ApiError::NoShard(_) => "no_shard_answered",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The error for a query image refused before decoding.
    pub fn from_refusal(r: &Refusal) -> Self {
        match r {
            Refusal::Empty => ApiError::bad_request("empty_image", "the image is empty (0 bytes)"),
            Refusal::NotAnImage => ApiError::UnsupportedMedia(
                "not an image: send a JPEG, PNG, WebP, BMP or TIFF file".to_string(),
            ),
            Refusal::BadHeader(_) => ApiError::unprocessable("bad_header", r.to_string()),
            Refusal::TooLarge { .. } => ApiError::unprocessable("image_too_large", r.to_string()),
            Refusal::ZeroSize { .. } => ApiError::unprocessable("bad_header", r.to_string()),
            Refusal::Degenerate { .. } => {
                ApiError::unprocessable("degenerate_image", r.to_string())
            }
            Refusal::Truncated(_) => ApiError::unprocessable("truncated_image", r.to_string()),
        }
    }

    /// The error for a failed search; `complete` says whether the upload looked complete.
    pub fn from_query(e: QueryError, complete: bool) -> Self {
        match e {
            QueryError::Image(ExtractError::Refused(r)) => Self::from_refusal(&r),
            QueryError::Image(ExtractError::Corrupt(f)) if !complete => ApiError::unprocessable(
                "truncated_image",
                format!("truncated {f:?} data: nothing could be decoded"),
            ),
            QueryError::Image(ExtractError::Corrupt(f)) => ApiError::unprocessable(
                "corrupt_image",
                format!("corrupt {f:?} data: the decoder could not read it"),
            ),
            // OpenCV failing on a decoded query is the image's doing (odd sizes, odd data),
            // never a reason to answer 5xx.
            QueryError::Image(ExtractError::OpenCv(e))
            | QueryError::Index(IndexError::OpenCv(e)) => ApiError::unprocessable(
                "unprocessable_image",
                format!("the image could not be processed: {}", e.message),
            ),
            QueryError::Index(e) => ApiError::Internal(format!("index: {e}")),
            QueryError::Read(p, e) => ApiError::Internal(format!("{}: {e}", p.display())),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %self, "request failed");
        }
        let body = ErrorBody {
            error: self.code().to_string(),
            message: self.to_string(),
            status: status.as_u16(),
        };
        let mut resp = (status, Json(body)).into_response();
        let headers = resp.headers_mut();
        match self {
            ApiError::NoIndex | ApiError::Busy(_) | ApiError::NoShard(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            ApiError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"imageindex\""),
                );
            }
            ApiError::BodyTooLarge { .. } | ApiError::BodyTimeout(_) => {
                // The unread rest of the body makes the connection unusable.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imageguard::Format;

    #[test]
    fn each_refusal_has_its_status() {
        let cases = [
            (Refusal::Empty, 400),
            (Refusal::NotAnImage, 415),
            (Refusal::BadHeader(Format::Png), 422),
            (
                Refusal::TooLarge {
                    width: 50_000,
                    height: 50_000,
                    max: 1,
                },
                422,
            ),
            (Refusal::Truncated(Format::Jpeg), 422),
        ];
        for (r, status) in cases {
            assert_eq!(
                ApiError::from_refusal(&r).status().as_u16(),
                status,
                "{r:?}"
            );
        }
    }

    #[test]
    fn unavailable_answers_carry_retry_after() {
        let r = ApiError::NoIndex.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let r = ApiError::Unauthorized("no token".into()).into_response();
        assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
    }
}
