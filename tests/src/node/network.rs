//! Pod addresses: each pod gets its own IPv4 address from a /24 of 10.244.0.0/16, added to the
//! loopback interface (`ip addr add A/32 dev lo`), so several pods can listen on the same port
//! and every process on the machine (API server clients, probes, the tests) reaches them.
//!
//! Why not 127.0.0.x: the API server refuses loopback addresses in Endpoints ("may not be in
//! the loopback range"), so Services would never get endpoints. Addresses on `lo` outside
//! 127/8 are local all the same and need no network namespace or bridge.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

/// The label of the addresses the agent adds: `lo:ii<pid of the agent's process>`
/// (`ip addr show dev lo label 'lo:ii*'`).
pub const LABEL_PREFIX: &str = "lo:ii";

/// The /24 the agent hands pod addresses out of, and which of them are in use.
#[derive(Debug)]
pub struct PodNetwork {
    prefix: [u8; 3],
    label: String,
    used: BTreeSet<u8>,
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl PodNetwork {
    /// Picks a 10.244.N.0/24 that no address on `lo` uses yet (`seed` chooses where to
    /// start looking, e.g. the process id, so that concurrent agents differ).
    pub fn choose(seed: u32) -> Result<PodNetwork, String> {
        let existing = ip(&["-4", "-o", "addr", "show", "dev", "lo"])?;
        for i in 0..254u32 {
            let n = ((seed + i) % 254 + 1) as u8;
            let prefix = format!("10.244.{n}.");
            if !existing.contains(&prefix) {
                return Ok(PodNetwork {
                    prefix: [10, 244, n],
                    label: format!("{LABEL_PREFIX}{}", std::process::id()),
                    used: BTreeSet::new(),
                });
            }
        }
        Err("every 10.244.N.0/24 is in use on lo".into())
    }

    /// Removes the addresses earlier agents left on `lo` when their process was killed (their
    /// label names a process that no longer exists); returns them.
    pub fn remove_stale() -> Vec<String> {
        let Ok(existing) = ip(&["-4", "-o", "addr", "show", "dev", "lo"]) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for line in existing.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(addr), Some(label)) = (
                fields
                    .iter()
                    .position(|f| *f == "inet")
                    .and_then(|i| fields.get(i + 1)),
                fields.iter().find(|f| f.starts_with(LABEL_PREFIX)),
            ) else {
                continue;
            };
            let pid = label
                .trim_start_matches(LABEL_PREFIX)
                .trim_end_matches('\\');
            let alive = pid
                .parse::<u32>()
                .is_ok_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
            if !alive && ip(&["addr", "del", addr, "dev", "lo"]).is_ok() {
                removed.push(addr.to_string());
            }
        }
        removed
    }

    /// The network, e.g. `10.244.7.0/24`.
    pub fn cidr(&self) -> String {
        let [a, b, c] = self.prefix;
        format!("{a}.{b}.{c}.0/24")
    }

    /// Allocates an address and adds it to `lo`.
    pub fn allocate(&mut self) -> Result<Ipv4Addr, String> {
        let host = (2..=254u8)
            .find(|h| !self.used.contains(h))
            .ok_or_else(|| format!("no free address left in {}", self.cidr()))?;
        let [a, b, c] = self.prefix;
        let addr = Ipv4Addr::new(a, b, c, host);
        ip(&[
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "lo",
            "label",
            &self.label,
        ])?;
        self.used.insert(host);
        Ok(addr)
    }

    /// Removes an address from `lo` and makes it available again.
    pub fn release(&mut self, addr: Ipv4Addr) {
        let [a, b, c, host] = addr.octets();
        if [a, b, c] != self.prefix || !self.used.remove(&host) {
            return;
        }
        let _ = ip(&["addr", "del", &format!("{addr}/32"), "dev", "lo"]);
    }

    /// Removes every address still allocated.
    pub fn release_all(&mut self) {
        let [a, b, c] = self.prefix;
        for host in std::mem::take(&mut self.used) {
            let _ = ip(&[
                "addr",
                "del",
                &format!("{a}.{b}.{c}.{host}/32"),
                "dev",
                "lo",
            ]);
        }
    }

    /// The addresses in use.
    pub fn in_use(&self) -> Vec<Ipv4Addr> {
        let [a, b, c] = self.prefix;
        self.used
            .iter()
            .map(|h| Ipv4Addr::new(a, b, c, *h))
            .collect()
    }
}
