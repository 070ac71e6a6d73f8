//! Readiness and liveness probes (HTTP GET and TCP socket), with the kubelet's defaults and
//! thresholds.

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::time::Duration;

/// How a probe checks the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// `httpGet`: success is a status in 200..400.
    Http {
        /// `http://host:port/path`.
        url: String,
        /// Extra headers.
        headers: Vec<(String, String)>,
    },
    /// `tcpSocket`: success is an accepted connection.
    Tcp {
        /// `host:port`.
        addr: String,
    },
    /// A probe the agent cannot run (`exec`, `grpc`): always fails, with this reason.
    Unsupported(String),
}

/// A probe, resolved against the pod's address and the container's ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    /// What it checks.
    pub check: Check,
    /// `initialDelaySeconds`.
    pub initial_delay: Duration,
    /// `periodSeconds` (default 10).
    pub period: Duration,
    /// `timeoutSeconds` (default 1).
    pub timeout: Duration,
    /// `successThreshold` (default 1).
    pub success_threshold: u32,
    /// `failureThreshold` (default 3).
    pub failure_threshold: u32,
}

fn port_of(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

fn secs(v: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(v.map_or(default, |s| s.max(0) as u64))
}

impl ProbeSpec {
    /// Resolves `probe` of `container` for a pod at `pod_ip`.
    pub fn new(probe: &Probe, container: &Container, pod_ip: &str) -> ProbeSpec {
        let check = if let Some(h) = &probe.http_get {
            let host = h.host.clone().unwrap_or_else(|| pod_ip.to_string());
            match port_of(container, &h.port) {
                Some(port) => {
                    let scheme = h.scheme.as_deref().unwrap_or("HTTP").to_ascii_lowercase();
                    let path = h.path.clone().unwrap_or_else(|| "/".into());
                    let path = if path.starts_with('/') {
                        path
                    } else {
                        format!("/{path}")
                    };
                    Check::Http {
                        url: format!("{scheme}://{host}:{port}{path}"),
                        headers: h
                            .http_headers
                            .iter()
                            .flatten()
                            .map(|hh| (hh.name.clone(), hh.value.clone()))
                            .collect(),
                    }
                }
                None => {
                    Check::Unsupported(format!("httpGet port {:?} is not a container port", h.port))
                }
            }
        } else if let Some(t) = &probe.tcp_socket {
            let host = t.host.clone().unwrap_or_else(|| pod_ip.to_string());
            match port_of(container, &t.port) {
                Some(port) => Check::Tcp {
                    addr: format!("{host}:{port}"),
                },
                None => Check::Unsupported(format!(
                    "tcpSocket port {:?} is not a container port",
                    t.port
                )),
            }
        } else {
            Check::Unsupported(
                "only httpGet and tcpSocket probes are run by the test node agent".into(),
            )
        };
        ProbeSpec {
            check,
            initial_delay: secs(probe.initial_delay_seconds, 0),
            period: secs(probe.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: probe.success_threshold.map_or(1, |v| v.max(1) as u32),
            failure_threshold: probe.failure_threshold.map_or(3, |v| v.max(1) as u32),
        }
    }

    /// Runs the probe once: `Ok(())` on success, else why it failed.
    pub async fn run(&self, http: &reqwest::Client) -> Result<(), String> {
        match &self.check {
            Check::Http { url, headers } => {
                let mut req = http.get(url).timeout(self.timeout);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                match req.send().await {
                    Ok(r) if (200..400).contains(&r.status().as_u16()) => Ok(()),
                    Ok(r) => Err(format!(
                        "HTTP probe failed with statuscode: {}",
                        r.status().as_u16()
                    )),
                    Err(e) => Err(format!("Get {url:?}: {e}")),
                }
            }
            Check::Tcp { addr } => {
                match tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(addr)).await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
                    Err(_) => Err(format!("dial tcp {addr}: timeout")),
                }
            }
            Check::Unsupported(why) => Err(why.clone()),
        }
    }
}

/// Consecutive results of a probe, turned into a verdict with its thresholds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeState {
    successes: u32,
    failures: u32,
    /// The verdict so far (`None` before the thresholds were first reached).
    pub healthy: Option<bool>,
}

impl ProbeState {
    /// Records one result; returns whether the verdict changed.
    pub fn record(&mut self, spec: &ProbeSpec, ok: bool) -> bool {
        let before = self.healthy;
        if ok {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= spec.success_threshold {
                self.healthy = Some(true);
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= spec.failure_threshold {
                self.healthy = Some(false);
            }
        }
        before != self.healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> Container {
        serde_json::from_value(serde_json::json!({
            "name": "query",
            "ports": [{"name": "http", "containerPort": 8080}],
        }))
        .unwrap()
    }

    #[test]
    fn named_ports_and_defaults() {
        let probe: Probe = serde_json::from_value(serde_json::json!({
            "httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5
        }))
        .unwrap();
        let p = ProbeSpec::new(&probe, &container(), "10.244.9.3");
        assert_eq!(
            p.check,
            Check::Http {
                url: "http://10.244.9.3:8080/readyz".into(),
                headers: vec![]
            }
        );
        assert_eq!(p.period, Duration::from_secs(5));
        assert_eq!(p.timeout, Duration::from_secs(1));
        assert_eq!((p.success_threshold, p.failure_threshold), (1, 3));
        let bad: Probe =
            serde_json::from_value(serde_json::json!({"tcpSocket": {"port": "nope"}})).unwrap();
        assert!(matches!(
            ProbeSpec::new(&bad, &container(), "x").check,
            Check::Unsupported(_)
        ));
    }

    #[test]
    fn thresholds_decide_the_verdict() {
        let probe: Probe = serde_json::from_value(serde_json::json!({
            "tcpSocket": {"port": 8080}, "failureThreshold": 2
        }))
        .unwrap();
        let spec = ProbeSpec::new(&probe, &container(), "10.244.9.3");
        let mut s = ProbeState::default();
        assert!(!s.record(&spec, false));
        assert_eq!(s.healthy, None);
        assert!(s.record(&spec, false));
        assert_eq!(s.healthy, Some(false));
        assert!(s.record(&spec, true));
        assert_eq!(s.healthy, Some(true));
        assert!(!s.record(&spec, false));
        assert_eq!(s.healthy, Some(true));
    }
}
