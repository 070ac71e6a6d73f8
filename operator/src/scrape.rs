//! Reads a build's Prometheus `/metrics` into [`ScrapedMetrics`] (the build pod's in a cluster,
//! the build process's in local mode).
//!
//! The metric names are the contract of DESIGN.md ("Metrics the indexer exposes"). The parser
//! handles the text exposition format as the indexer and the `prometheus` crate write it:
//! `# HELP`/`# TYPE` comments, `name{label="value",…} value [timestamp]`, escaped label values,
//! and `NaN`/`+Inf`. A small hand-written parser keeps the operator free of the regex and
//! date-time crates a general-purpose parser would bring for these eleven series.

use imageindex_crds::metrics as names;
use imageindex_crds::observation::ScrapedMetrics;
use std::collections::BTreeMap;
use std::time::Duration;
use thiserror::Error;

/// One sample of the text format: a metric name, its labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name, e.g. `imageindex_memory_rss_bytes`.
    pub name: String,
    /// Labels by name (sorted: the order they were written in is not kept).
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// Why a line of the text format could not be read.
#[derive(Debug, Error, PartialEq)]
pub enum ParseError {
    /// The line does not look like `name{labels} value`.
    #[error("line {line}: {reason}: {text:?}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
        /// The line.
        text: String,
    },
}

/// Why a scrape failed.
#[derive(Debug, Error)]
pub enum ScrapeError {
    /// The HTTP request failed or answered with an error status.
    #[error("GET {url}: {source}")]
    Http {
        /// The URL scraped.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The body is not the Prometheus text format.
    #[error("GET {url}: {source}")]
    Parse {
        /// The URL scraped.
        url: String,
        /// The parse error.
        #[source]
        source: ParseError,
    },
}

/// Parses the Prometheus text exposition format.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        samples.push(parse_line(line).map_err(|reason| ParseError::BadLine {
            line: i + 1,
            reason,
            text: raw.to_string(),
        })?);
    }
    Ok(samples)
}

fn is_name_char(c: char, first: bool) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':' || (!first && c.is_ascii_digit())
}

fn parse_line(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .char_indices()
        .find(|&(i, c)| !is_name_char(c, i == 0))
        .map_or(line.len(), |(i, _)| i);
    if name_end == 0 {
        return Err("no metric name");
    }
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value_text = fields.next().ok_or("no value")?;
    let value = parse_value(value_text).ok_or("value is not a number")?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| "timestamp is not an integer")?;
    }
    if fields.next().is_some() {
        return Err("text after the timestamp");
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `key="value",…}` and returns what follows the closing brace.
fn parse_labels<'a>(
    mut s: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, &'static str> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let key_end = s
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_alphabetic() || c == '_' || (i > 0 && c.is_ascii_digit())))
            .map_or(s.len(), |(i, _)| i);
        if key_end == 0 {
            return Err("bad label name");
        }
        let key = s[..key_end].to_string();
        s = s[key_end..].trim_start();
        s = s.strip_prefix('=').ok_or("label without '='")?.trim_start();
        s = s.strip_prefix('"').ok_or("label value without quotes")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, other)) => {
                        value.push('\\');
                        value.push(other);
                    }
                    None => return Err("unterminated label value"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.insert(key, value);
        s = s[end + 1..].trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err("labels not separated by ','");
        }
    }
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse::<f64>().ok(),
    }
}

fn as_count(v: f64) -> Option<u64> {
    (v.is_finite() && v >= 0.0).then(|| v.round() as u64)
}

/// Picks the contract's series out of parsed samples.
pub fn metrics_of(samples: &[Sample]) -> ScrapedMetrics {
    let mut m = ScrapedMetrics::default();
    for s in samples {
        let slot = match s.name.as_str() {
            names::MEMORY_RSS_BYTES => &mut m.rss,
            names::MEMORY_PEAK_RSS_BYTES => &mut m.peak_rss,
            names::MEMORY_WORKING_SET_BYTES => &mut m.working_set,
            names::MEMORY_AVAILABLE_BYTES => &mut m.available,
            names::MEMORY_LIMIT_BYTES => &mut m.limit,
            names::IMAGES_TOTAL => &mut m.images_total,
            names::IMAGES_PROCESSED_TOTAL => &mut m.images_processed,
            names::IMAGES_FAILED_TOTAL => &mut m.images_failed,
            names::DESCRIPTORS_TOTAL => &mut m.descriptors,
            names::BUILD_PHASE => {
                if s.value >= 0.5 {
                    m.phase = s.labels.get(names::PHASE_LABEL).cloned();
                }
                continue;
            }
            names::BUILD_INFO => {
                m.preset = s.labels.get(names::PRESET_LABEL).cloned();
                continue;
            }
            _ => continue,
        };
        *slot = as_count(s.value);
    }
    m
}

/// Parses a `/metrics` body.
pub fn parse_metrics(text: &str) -> Result<ScrapedMetrics, ParseError> {
    Ok(metrics_of(&parse(text)?))
}

/// The URL of a build pod's metrics: `http://<podIP>:<port>/metrics` (IPv6 in brackets).
pub fn metrics_url(pod_ip: &str, port: u16) -> String {
    if pod_ip.contains(':') {
        format!("http://[{pod_ip}]:{port}/metrics")
    } else {
        format!("http://{pod_ip}:{port}/metrics")
    }
}

/// An HTTP client for scraping with a short timeout (a scrape must not stall a reconcile).
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .no_proxy()
        .build()
        // Building only fails when the TLS backend cannot start; plain-HTTP scraping still
        // works with the default client (whose requests then have no timeout).
        .unwrap_or_default()
}

/// Scrapes one build's `/metrics`.
pub async fn scrape(http: &reqwest::Client, url: &str) -> Result<ScrapedMetrics, ScrapeError> {
    let http_err = |source| ScrapeError::Http {
        url: url.to_string(),
        source,
    };
    let body = http
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(http_err)?
        .text()
        .await
        .map_err(http_err)?;
    parse_metrics(&body).map_err(|source| ScrapeError::Parse {
        url: url.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the indexer's `/metrics` looks like mid-extraction (prometheus crate output).
    pub(crate) const EXTRACTING: &str = r#"# HELP imageindex_build_info Build parameters.
# TYPE imageindex_build_info gauge
imageindex_build_info{n_trees="20",nfeatures="1000",preset="full",search_k="100",version="0.1.0"} 1
# HELP imageindex_build_phase Current build phase (1 for the current one).
# TYPE imageindex_build_phase gauge
imageindex_build_phase{phase="done"} 0
imageindex_build_phase{phase="extract"} 1
imageindex_build_phase{phase="index"} 0
imageindex_build_phase{phase="publish"} 0
imageindex_build_phase{phase="scan"} 0
# TYPE imageindex_descriptors_total counter
imageindex_descriptors_total 901234
imageindex_images_failed_total 2
imageindex_images_processed_total 1200
imageindex_images_total 4000
imageindex_memory_available_bytes 52428800
imageindex_memory_limit_bytes 536870912
imageindex_memory_peak_rss_bytes 5.0331648e+08
imageindex_memory_rss_bytes 471859200
imageindex_memory_working_set_bytes 484442112
process_open_fds 12
"#;

    #[test]
    fn reads_every_contract_series() {
        let m = parse_metrics(EXTRACTING).unwrap();
        assert_eq!(m.rss, Some(471_859_200));
        assert_eq!(m.peak_rss, Some(503_316_480));
        assert_eq!(m.working_set, Some(484_442_112));
        assert_eq!(m.available, Some(52_428_800));
        assert_eq!(m.limit, Some(512 << 20));
        assert_eq!(m.images_total, Some(4000));
        assert_eq!(m.images_processed, Some(1200));
        assert_eq!(m.images_failed, Some(2));
        assert_eq!(m.descriptors, Some(901_234));
        assert_eq!(m.phase.as_deref(), Some("extract"));
        assert_eq!(m.preset.as_deref(), Some("full"));
    }

    #[test]
    fn missing_series_stay_absent_and_rss_stands_in_for_working_set() {
        let m = parse_metrics("imageindex_memory_rss_bytes 100\n").unwrap();
        assert_eq!(m.working_set, None);
        assert_eq!(m.working_set_or_rss(), Some(100));
        assert_eq!(m.working_set_and_limit(512), (100, 512));
        assert_eq!(m.phase, None);
        assert_eq!(parse_metrics("").unwrap(), ScrapedMetrics::default());
    }

    #[test]
    fn label_values_with_escapes_commas_and_braces() {
        let s =
            parse("x{a=\"1,2}\",b=\"say \\\"hi\\\"\\n\",c=\"back\\\\slash\",} 3 1700000000000\n")
                .unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].labels["a"], "1,2}");
        assert_eq!(s[0].labels["b"], "say \"hi\"\n");
        assert_eq!(s[0].labels["c"], "back\\slash");
        assert_eq!(s[0].value, 3.0);
    }

    #[test]
    fn special_values() {
        let s = parse("a NaN\nb +Inf\nc -Inf\nd 1e3\n").unwrap();
        assert!(s[0].value.is_nan());
        assert_eq!(s[1].value, f64::INFINITY);
        assert_eq!(s[2].value, f64::NEG_INFINITY);
        assert_eq!(s[3].value, 1000.0);
        // Non-finite or negative values are not counts.
        let m =
            parse_metrics("imageindex_memory_rss_bytes NaN\nimageindex_images_total -1\n").unwrap();
        assert_eq!((m.rss, m.images_total), (None, None));
    }

    #[test]
    fn garbage_is_rejected_with_its_line() {
        for (text, reason) in [
            ("ok 1\n{a=\"b\"} 1\n", "no metric name"),
            ("x{a=\"b} 1\n", "unterminated label value"),
            ("x{a=b} 1\n", "label value without quotes"),
            ("x{a=\"b\" c=\"d\"} 1\n", "labels not separated by ','"),
            ("x\n", "no value"),
            ("x one\n", "value is not a number"),
            ("x 1 2 3\n", "text after the timestamp"),
            ("x 1 soon\n", "timestamp is not an integer"),
            ("<html>\n", "no metric name"),
        ] {
            match parse(text) {
                Err(ParseError::BadLine {
                    reason: r, line, ..
                }) => {
                    assert_eq!(r, reason, "{text:?}");
                    assert_eq!(line, if text.starts_with("ok") { 2 } else { 1 });
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn urls_for_v4_and_v6_pods() {
        assert_eq!(
            metrics_url("10.1.2.3", 9090),
            "http://10.1.2.3:9090/metrics"
        );
        assert_eq!(
            metrics_url("fd00::7", 9090),
            "http://[fd00::7]:9090/metrics"
        );
    }
}
