//! Reading an ImageIndex manifest for local mode: the same YAML a user would `kubectl apply`,
//! checked with the controller's validation (`Mode::Local`), with `spec.dataset.path`
//! resolved against the manifest's directory when it is relative.

use crate::resources;
use imageindex_crds::validate::{self, FieldError, Mode, ValidSpec};
use imageindex_crds::ImageIndex;
use kube::Resource;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why a manifest cannot be used.
#[derive(Debug, Error)]
pub enum ManifestError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The manifest.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is not an ImageIndex (syntax, a missing required field, a wrong type).
    #[error("{path}: not an ImageIndex: {message}")]
    Yaml {
        /// The manifest.
        path: PathBuf,
        /// serde's message, naming the field and the line.
        message: String,
    },
    /// Fields with invalid values, each named.
    #[error("{path}: invalid ImageIndex: {}", validate::describe(.errors))]
    Invalid {
        /// The manifest.
        path: PathBuf,
        /// Every problem found.
        errors: Vec<FieldError>,
        /// The resource as read (for a status saying why), when it could be read.
        index: Box<ImageIndex>,
    },
}

/// A manifest ready to run.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// Where it was read from.
    pub path: PathBuf,
    /// The resource as written.
    pub index: ImageIndex,
    /// Its name (`metadata.name`).
    pub name: String,
    /// The spec's quantities, read.
    pub valid: ValidSpec,
    /// The dataset directory, resolved.
    pub dataset: PathBuf,
}

fn field(field: &str, message: String) -> FieldError {
    FieldError {
        field: field.to_string(),
        message,
    }
}

/// Local names become cgroup and file names: lowercase letters, digits, `-` and `.`.
fn check_local_name(name: &str) -> Option<FieldError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && !name.starts_with('.');
    (!ok).then(|| {
        field(
            "metadata.name",
            format!("{name:?} must be lowercase letters, digits, '-' or '.', starting with a letter or digit"),
        )
    })
}

/// Resolves `spec.dataset.path` against the manifest's directory when it is relative.
pub fn resolve_dataset(path: &str, manifest_dir: &Path) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        manifest_dir.join(p)
    }
}

/// Parses and validates manifest text (`path` names it in errors; relative dataset paths
/// resolve against its directory). Does not look at the file system.
pub fn parse(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
    let yaml_err = |message: String| ManifestError::Yaml {
        path: path.to_path_buf(),
        message,
    };
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| yaml_err(e.to_string()))?;
    let mut errors = Vec::new();
    let want_api = ImageIndex::api_version(&());
    let want_kind = ImageIndex::kind(&());
    match value.get("apiVersion").and_then(serde_yaml::Value::as_str) {
        Some(v) if v == want_api => {}
        other => errors.push(field(
            "apiVersion",
            format!("must be {want_api}, not {other:?}"),
        )),
    }
    match value.get("kind").and_then(serde_yaml::Value::as_str) {
        Some(k) if k == want_kind => {}
        other => errors.push(field("kind", format!("must be {want_kind}, not {other:?}"))),
    }
    if !errors.is_empty() {
        return Err(yaml_err(validate::describe(&errors)));
    }
    // From the text (not the value) so that serde's message names the field and the line.
    let index: ImageIndex = serde_yaml::from_str(text).map_err(|e| yaml_err(e.to_string()))?;
    let name = index.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        errors.push(field("metadata.name", "required".into()));
    } else {
        errors.extend(check_local_name(&name));
        errors.extend(resources::check_name(&name).err());
    }
    let valid = match validate::validate(&index.spec, Mode::Local) {
        Ok(valid) if errors.is_empty() => Some(valid),
        Ok(_) => None,
        Err(spec_errors) => {
            errors.extend(spec_errors);
            None
        }
    };
    let Some(valid) = valid else {
        return Err(ManifestError::Invalid {
            path: path.to_path_buf(),
            errors,
            index: Box::new(index),
        });
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let dataset = resolve_dataset(&index.spec.dataset.path, dir);
    Ok(Manifest {
        path: path.to_path_buf(),
        name,
        valid,
        dataset,
        index,
    })
}

/// Reads, parses and validates a manifest, and checks that its dataset is a directory.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let manifest = parse(&text, path)?;
    if !manifest.dataset.is_dir() {
        let message = format!(
            "{} is not a directory (a relative path is resolved against the manifest's directory)",
            manifest.dataset.display()
        );
        return Err(ManifestError::Invalid {
            path: path.to_path_buf(),
            errors: vec![field("spec.dataset.path", message)],
            index: Box::new(manifest.index),
        });
    }
    // Absolute, so that logs, status and the query service name it unambiguously.
    let mut manifest = manifest;
    if let Ok(abs) = std::fs::canonicalize(&manifest.dataset) {
        manifest.dataset = abs;
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: imagematch.dev/v1alpha1\nkind: ImageIndex\nmetadata:\n  name: catalogue\nspec:\n  dataset:\n    path: catalogue\n  memoryLimit: 256Mi\n";

    #[test]
    fn relative_dataset_paths_resolve_next_to_the_manifest() {
        let m = parse(GOOD, Path::new("/work/samples/imageindex.yaml")).unwrap();
        assert_eq!(m.name, "catalogue");
        assert_eq!(m.dataset, Path::new("/work/samples/catalogue"));
        assert_eq!(m.valid.memory_limit, 256 << 20);
        let abs = GOOD.replace("path: catalogue", "path: /data/photos");
        let m = parse(&abs, Path::new("/work/samples/imageindex.yaml")).unwrap();
        assert_eq!(m.dataset, Path::new("/data/photos"));
        let m = parse(GOOD, Path::new("imageindex.yaml")).unwrap();
        assert_eq!(m.dataset, Path::new("catalogue"));
    }

    #[test]
    fn invalid_fields_are_named() {
        let bad = GOOD
            .replace("256Mi", "lots")
            .replace("name: catalogue", "name: Cats/1");
        match parse(&bad, Path::new("m.yaml")) {
            Err(e @ ManifestError::Invalid { .. }) => {
                let text = e.to_string();
                assert!(text.contains("metadata.name"), "{text}");
                assert!(text.contains("spec.memoryLimit"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        let no_path = GOOD.replace("path: catalogue", "claimName: photos");
        let err = parse(&no_path, Path::new("m.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.dataset.path"), "{err}");
    }

    #[test]
    fn not_an_imageindex() {
        let err = parse(&GOOD.replace("ImageIndex", "Pod"), Path::new("m.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kind: must be ImageIndex"), "{err}");
        let err = parse(
            &GOOD.replace("  memoryLimit: 256Mi\n", ""),
            Path::new("m.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("memoryLimit"), "{err}");
        let err = parse(
            &GOOD.replace("256Mi\n", "256Mi\n  preset: huge\n"),
            Path::new("m.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("spec.preset") && err.contains("huge"), "{err}");
        assert!(parse("{{", Path::new("m.yaml")).is_err());
    }

    #[test]
    fn a_missing_dataset_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("spec.dataset.path") && err.contains("not a directory"),
            "{err}"
        );
        std::fs::create_dir(dir.path().join("catalogue")).unwrap();
        assert!(load(&path).is_ok());
        assert!(matches!(
            load(&dir.path().join("nope.yaml")),
            Err(ManifestError::Read { .. })
        ));
    }
}
