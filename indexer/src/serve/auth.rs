//! Bearer-token auth from `--auth-file`: one `<token> <role>` per line (`read` or `admin`),
//! `#` comments and blank lines ignored. Read tokens may search and read the catalogue and
//! the index; admin tokens may also rebuild. Without an auth file every route is open.

use super::errors::ApiError;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Search, images, index information.
    Read,
    /// Everything `Read` may, plus rebuilds.
    Admin,
}

impl Role {
    fn parse(text: &str) -> Option<Role> {
        match text {
            "read" => Some(Role::Read),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }
}

/// Why an auth file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// The file could not be read.
    #[error("cannot read auth file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `<token> <role>`.
    #[error("auth file {path} line {line}: {reason}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// No token at all: the file would lock everyone out.
    #[error("auth file {0} holds no token")]
    Empty(PathBuf),
}

/// The tokens the service accepts.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    entries: Vec<(String, Role)>,
}

impl Tokens {
    /// Reads an auth file.
    pub fn load(path: &Path) -> Result<Tokens, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the text of an auth file (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Tokens, AuthFileError> {
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |reason: &str| AuthFileError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                reason: reason.to_string(),
            };
            let mut words = line.split_whitespace();
            let (Some(token), Some(role), None) = (words.next(), words.next(), words.next()) else {
                return Err(bad("expected `<token> <role>`"));
            };
            let role = Role::parse(role).ok_or_else(|| bad("role must be `read` or `admin`"))?;
            if token.len() < 8 {
                return Err(bad("token shorter than 8 characters"));
            }
            entries.push((token.to_string(), role));
        }
        if entries.is_empty() {
            return Err(AuthFileError::Empty(path.to_path_buf()));
        }
        Ok(Tokens { entries })
    }

    /// The role of a presented token. Every entry is compared in full, so the time taken
    /// does not tell how much of a token matched.
    pub fn role_of(&self, presented: &str) -> Option<Role> {
        let mut found = None;
        for (token, role) in &self.entries {
            if constant_time_eq(token.as_bytes(), presented.as_bytes()) {
                found = Some(*role);
            }
        }
        found
    }

    /// A token that may read (the first in the file): what a router presents to its
    /// shards when they share its auth file.
    pub fn reader(&self) -> Option<&str> {
        self.entries.first().map(|(t, _)| t.as_str())
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

/// What a route group requires: the tokens (none = open) and the least role.
#[derive(Clone)]
pub struct Requirement {
    /// Accepted tokens, or `None` when auth is off.
    pub tokens: Option<Arc<Tokens>>,
    /// The least role the routes need.
    pub role: Role,
    /// Bytes of a refused request's body read and discarded so the client gets the answer.
    pub drain_cap: u64,
}

/// Checks the request's bearer token against a [`Requirement`]: 401 without a known token,
/// 403 when its role is too weak.
pub async fn require(
    State(req_role): State<Requirement>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(tokens) = &req_role.tokens {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let refusal = match presented.map(|p| tokens.role_of(p)) {
            None => Some(ApiError::Unauthorized(
                "missing bearer token (Authorization: Bearer <token>)".to_string(),
            )),
            Some(None) => Some(ApiError::Unauthorized("unknown token".to_string())),
            Some(Some(role)) if role < req_role.role => Some(ApiError::Forbidden(format!(
                "this route needs the {} role; the token has {}",
                req_role.role.as_str(),
                role.as_str()
            ))),
            Some(Some(_)) => None,
        };
        if let Some(e) = refusal {
            return Err(super::body::refuse(request, e, req_role.drain_cap));
        }
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tokens_roles_and_comments() {
        let t = Tokens::parse(
            "# who may do what\nreader-token-1 read\n\nadmin-token-1 admin # ops\n",
            Path::new("auth"),
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.role_of("reader-token-1"), Some(Role::Read));
        assert_eq!(t.role_of("admin-token-1"), Some(Role::Admin));
        assert_eq!(t.role_of("admin-token-"), None);
        assert_eq!(t.role_of(""), None);
    }

    #[test]
    fn refuses_bad_lines_and_empty_files() {
        for text in [
            "tok-12345",
            "tok-12345 root",
            "tok-12345 read extra",
            "short read",
        ] {
            assert!(
                matches!(
                    Tokens::parse(text, Path::new("a")),
                    Err(AuthFileError::Line { line: 1, .. })
                ),
                "{text}"
            );
        }
        assert!(matches!(
            Tokens::parse("# nothing\n", Path::new("a")),
            Err(AuthFileError::Empty(_))
        ));
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Read < Role::Admin);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
