//! The Node object and its heartbeats (node status and the `kube-node-lease` Lease), so that
//! the node lifecycle controller keeps the node Ready and never evicts its pods.

use crate::node::status::rfc3339;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use std::time::SystemTime;

/// Where kubelets keep their leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// How long a lease holds (the kubelet's default).
pub const LEASE_SECONDS: i32 = 40;

fn mem_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn first_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn conditions(now: &str, since: &str) -> Value {
    let c = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": since})
    };
    json!([
        c(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available"
        ),
        c(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure"
        ),
        c(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available"
        ),
        c(
            "Ready",
            "True",
            "KubeletReady",
            "the imageindex test node agent is posting ready status"
        ),
    ])
}

/// The node's status: capacity of this machine, Ready since `since`, its address.
pub fn node_status(name: &str, now: &str, since: &str) -> Value {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let capacity = json!({
        "cpu": cpus.to_string(),
        "memory": format!("{}Ki", mem_total_bytes() / 1024),
        "pods": "110",
        "ephemeral-storage": "100Gi",
    });
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": conditions(now, since),
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": first_line("/etc/machine-id"),
            "systemUUID": first_line("/etc/machine-id"),
            "bootID": first_line("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": first_line("/proc/sys/kernel/osrelease"),
            "osImage": "imageindex test node",
            "containerRuntimeVersion": "imageindex-agent://0.1.0",
            "kubeletVersion": "v1.20.2",
            "kubeProxyVersion": "v1.20.2",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    })
}

fn micro_time(t: SystemTime) -> String {
    let s = rfc3339(t);
    format!("{}.000000Z", s.trim_end_matches('Z'))
}

/// Creates the Node (replacing a stale one of the same name) with its status, and its Lease.
pub async fn register(client: &Client, name: &str) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "imageindex-test-node-agent",
        }},
        "spec": {},
    }))
    .expect("a valid Node");
    let created = match nodes.create(&PostParams::default(), &node).await {
        Ok(n) => n,
        Err(kube::Error::Api(s)) if s.is_already_exists() => nodes.get(name).await?,
        Err(e) => return Err(e),
    };
    heartbeat(client, name, SystemTime::now()).await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "ownerReferences": [{
            "apiVersion": "v1", "kind": "Node", "name": name,
            "uid": created.metadata.uid.unwrap_or_default(),
        }]},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS,
                 "renewTime": micro_time(SystemTime::now())},
    }))
    .expect("a valid Lease");
    match leases.create(&PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Renews the Lease and posts the node's status, Ready since `since` (every 10 s, as the
/// kubelet does).
pub async fn heartbeat(client: &Client, name: &str, since: SystemTime) -> Result<(), kube::Error> {
    let now = SystemTime::now();
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": node_status(name, &rfc3339(now), &rfc3339(since))})),
        )
        .await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    match leases
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"renewTime": micro_time(now)}})),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Not made yet (first heartbeat) — register creates it.
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}
