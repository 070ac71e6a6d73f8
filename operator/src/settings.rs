//! The operator's own configuration (command-line flags of `operator run`).

use std::time::Duration;

/// The indexer image used when `spec.indexerImage` is not set.
pub const DEFAULT_INDEXER_IMAGE: &str = concat!("imageindex/indexer:", env!("CARGO_PKG_VERSION"));
/// The port build pods serve `/metrics` on.
pub const DEFAULT_BUILD_METRICS_PORT: u16 = 9090;
/// The port query pods serve the HTTP API on.
pub const QUERY_PORT: u16 = 8080;
/// How often a running build's metrics are scraped.
pub const DEFAULT_SCRAPE_INTERVAL: Duration = Duration::from_secs(5);

/// How the operator makes and watches the objects of an ImageIndex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Image with the `indexer` binary for scan, build and query pods.
    pub indexer_image: String,
    /// `imagePullPolicy` of those pods.
    pub image_pull_policy: String,
    /// How often a running build's `/metrics` is scraped.
    pub scrape_interval: Duration,
    /// The build pods' metrics port (written into the pod spec as the port named `metrics`;
    /// scraping reads the port back from each pod, so changing it never loses a running build).
    pub build_metrics_port: u16,
    /// Watch only this namespace (all namespaces when absent).
    pub namespace: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            indexer_image: DEFAULT_INDEXER_IMAGE.to_string(),
            image_pull_policy: "IfNotPresent".to_string(),
            scrape_interval: DEFAULT_SCRAPE_INTERVAL,
            build_metrics_port: DEFAULT_BUILD_METRICS_PORT,
            namespace: None,
        }
    }
}

/// Parses a positive duration such as `5s`, `500ms`, `2m` or `1h` (a bare number is seconds;
/// the workspace's one duration syntax, [`imageindex_crds::duration`]).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    match imageindex_crds::duration::parse(text) {
        Ok(d) if d.is_zero() => Err(format!("{text:?} must be positive")),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn default_image_carries_the_version() {
        assert!(Settings::default()
            .indexer_image
            .ends_with(env!("CARGO_PKG_VERSION")));
        assert_eq!(Settings::default().build_metrics_port, 9090);
    }
}
