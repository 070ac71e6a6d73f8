//! Spec validation shared by the cluster controller and local mode (the 1.20 API server we
//! test against has no CEL, so the controller validates and reports a condition).

use crate::quantity;
use crate::types::ImageIndexSpec;
use std::fmt;

/// Where the spec will run: datasets are claims in a cluster and directories locally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `operator run`: `dataset.claimName` required.
    Cluster,
    /// `operator local`: `dataset.path` is a local directory.
    Local,
}

/// One invalid field and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.memoryLimit`.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Joins field errors into one message for a condition or an error line.
pub fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A spec that passed validation, with its quantities read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidSpec {
    /// `spec.memoryLimit` in bytes.
    pub memory_limit: u64,
    /// `spec.maxAttempts` or its default.
    pub max_attempts: u32,
    /// `spec.storage.size` in bytes, if set.
    pub storage_bytes: Option<u64>,
    /// Extraction threads from `spec.cpu` (whole CPUs, at least 1), if set.
    pub threads: Option<u32>,
    /// Query replicas.
    pub query_replicas: i32,
}

/// Default `spec.maxAttempts`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 6;
/// Smallest memory limit accepted at all (below it not even the process starts).
pub const MIN_MEMORY_LIMIT: u64 = 16 << 20;

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && (s.is_empty()
            || (s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                && s.as_bytes()[0].is_ascii_alphanumeric()
                && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()))
}

fn parse_cpu_millis(text: &str) -> Option<u64> {
    let t = text.trim();
    if let Some(m) = t.strip_suffix('m') {
        return m.parse::<u64>().ok().filter(|v| *v > 0);
    }
    let v: f64 = t.parse().ok()?;
    (v.is_finite() && v > 0.0).then(|| (v * 1000.0).round() as u64)
}

/// Validates a spec; every problem is reported, not just the first.
pub fn validate(spec: &ImageIndexSpec, mode: Mode) -> Result<ValidSpec, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut err = |field: &str, message: String| {
        errors.push(FieldError {
            field: field.to_string(),
            message,
        })
    };

    let memory_limit = match quantity::parse_bytes(&spec.memory_limit) {
        Ok(v) if v < MIN_MEMORY_LIMIT => {
            err(
                "spec.memoryLimit",
                format!(
                    "{} is below the smallest accepted limit of 16Mi",
                    spec.memory_limit
                ),
            );
            0
        }
        Ok(v) => v,
        Err(e) => {
            err("spec.memoryLimit", e.to_string());
            0
        }
    };

    match mode {
        Mode::Cluster => {
            match spec.dataset.claim_name.as_deref() {
                None | Some("") => err(
                    "spec.dataset.claimName",
                    "required: the PersistentVolumeClaim holding the images".into(),
                ),
                Some(c) if !is_dns_label(c) => err(
                    "spec.dataset.claimName",
                    format!("{c:?} is not a valid claim name"),
                ),
                _ => {}
            }
            if spec.dataset.path.split('/').any(|part| part == "..") {
                err(
                    "spec.dataset.path",
                    "must stay inside the claim (no `..`)".into(),
                );
            }
        }
        Mode::Local => {
            if spec.dataset.path.trim().is_empty() {
                err(
                    "spec.dataset.path",
                    "required: the local directory holding the images".into(),
                );
            }
        }
    }

    let max_attempts = spec.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
    if !(1..=50).contains(&max_attempts) {
        err(
            "spec.maxAttempts",
            format!("{max_attempts} is outside 1..=50"),
        );
    }

    let storage_bytes = match spec.storage.as_ref().and_then(|s| s.size.as_deref()) {
        Some(size) => match quantity::parse_bytes(size) {
            Ok(v) if v > 0 => Some(v),
            Ok(_) => {
                err("spec.storage.size", "must be positive".into());
                None
            }
            Err(e) => {
                err("spec.storage.size", e.to_string());
                None
            }
        },
        None => None,
    };
    if let Some(claim) = spec.storage.as_ref().and_then(|s| s.claim_name.as_deref()) {
        if !is_dns_label(claim) {
            err(
                "spec.storage.claimName",
                format!("{claim:?} is not a valid claim name"),
            );
        }
    }
    if let Some(modes) = spec.storage.as_ref().and_then(|s| s.access_modes.as_ref()) {
        for m in modes {
            if !["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"].contains(&m.as_str()) {
                err(
                    "spec.storage.accessModes",
                    format!("{m:?} is not ReadWriteOnce, ReadWriteMany or ReadWriteOncePod"),
                );
            }
        }
    }

    let threads = match spec.cpu.as_deref() {
        Some(cpu) => match parse_cpu_millis(cpu) {
            Some(m) => Some(((m / 1000) as u32).max(1)),
            None => {
                err(
                    "spec.cpu",
                    format!("{cpu:?} is not a CPU quantity such as 2 or 500m"),
                );
                None
            }
        },
        None => None,
    };

    let query = spec.query.clone().unwrap_or_default();
    let query_replicas = query.replicas.unwrap_or(1);
    if !(0..=100).contains(&query_replicas) {
        err(
            "spec.query.replicas",
            format!("{query_replicas} is outside 0..=100"),
        );
    }
    if let Some(m) = query.memory_limit.as_deref() {
        if let Err(e) = quantity::parse_bytes(m) {
            err("spec.query.memoryLimit", e.to_string());
        }
    }
    if let Some(c) = query.cpu.as_deref() {
        if parse_cpu_millis(c).is_none() {
            err("spec.query.cpu", format!("{c:?} is not a CPU quantity"));
        }
    }
    if let Some(token) = spec.rebuild.as_deref() {
        if !is_label_value(token) {
            err("spec.rebuild", "must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit".into());
        }
    }

    if let Some(crate::shards::ShardCount::Count(n)) = spec.shards {
        if !(1..=crate::shards::MAX_SHARDS).contains(&n) {
            err(
                "spec.shards",
                format!(
                    "{n} is outside 1..={} (or use auto)",
                    crate::shards::MAX_SHARDS
                ),
            );
        }
    }
    if spec.max_parallel_builds == Some(0) {
        err("spec.maxParallelBuilds", "must be at least 1".into());
    }

    if errors.is_empty() {
        Ok(ValidSpec {
            memory_limit,
            max_attempts,
            storage_bytes,
            threads,
            query_replicas,
        })
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ImageIndexSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn good_cluster_spec_is_read() {
        let s = spec("dataset: {claimName: photos, path: /cat}\nmemoryLimit: 1Gi\ncpu: '2'\nstorage: {size: 5Gi}\n");
        let v = validate(&s, Mode::Cluster).unwrap();
        assert_eq!(v.memory_limit, 1 << 30);
        assert_eq!(v.threads, Some(2));
        assert_eq!(v.storage_bytes, Some(5 << 30));
        assert_eq!(v.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(v.query_replicas, 1);
    }

    #[test]
    fn every_problem_is_named_by_field() {
        let s = spec("dataset: {path: ../etc}\nmemoryLimit: lots\nmaxAttempts: 0\ncpu: fast\nrebuild: 'not ok!'\nstorage: {size: -1Gi}\n");
        let errs = validate(&s, Mode::Cluster).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.memoryLimit",
                "spec.dataset.claimName",
                "spec.dataset.path",
                "spec.maxAttempts",
                "spec.storage.size",
                "spec.cpu",
                "spec.rebuild"
            ]
        );
        assert!(describe(&errs).contains("spec.memoryLimit: quantity \"lots\""));
    }

    #[test]
    fn local_mode_needs_a_path_not_a_claim() {
        let s = spec("dataset: {path: /data/photos}\nmemoryLimit: 256Mi\n");
        assert!(validate(&s, Mode::Local).is_ok());
        assert!(validate(&s, Mode::Cluster).is_err());
        let s = spec("dataset: {path: ''}\nmemoryLimit: 256Mi\n");
        assert_eq!(
            validate(&s, Mode::Local).unwrap_err()[0].field,
            "spec.dataset.path"
        );
    }

    #[test]
    fn absurdly_small_limit_is_invalid() {
        let s = spec("dataset: {path: /x}\nmemoryLimit: 1Mi\n");
        assert_eq!(
            validate(&s, Mode::Local).unwrap_err()[0].field,
            "spec.memoryLimit"
        );
    }

    #[test]
    fn shards_and_parallel_builds_are_bounded() {
        let ok = spec(
            "dataset: {claimName: photos}\nmemoryLimit: 1Gi\nshards: 3\nmaxParallelBuilds: 2\n",
        );
        assert!(validate(&ok, Mode::Cluster).is_ok());
        let auto = spec("dataset: {claimName: photos}\nmemoryLimit: 1Gi\nshards: auto\n");
        assert_eq!(auto.shards, Some(crate::shards::ShardCount::Auto));
        assert!(validate(&auto, Mode::Cluster).is_ok());
        for bad in ["shards: 0", "shards: 65", "maxParallelBuilds: 0"] {
            let s = spec(&format!(
                "dataset: {{claimName: photos}}\nmemoryLimit: 1Gi\n{bad}\n"
            ));
            let errs = validate(&s, Mode::Cluster).unwrap_err();
            let want = bad.split(':').next().unwrap();
            assert_eq!(errs[0].field, format!("spec.{want}"), "{bad}");
        }
    }

    #[test]
    fn cpu_quantities() {
        assert_eq!(parse_cpu_millis("500m"), Some(500));
        assert_eq!(parse_cpu_millis("1.5"), Some(1500));
        assert_eq!(parse_cpu_millis("0"), None);
        assert_eq!(parse_cpu_millis("x"), None);
    }
}
