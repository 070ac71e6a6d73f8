//! Storage for a one-node test cluster: a local-path provisioner, as rancher's
//! local-path-provisioner (k3s's default) does it. Every pending claim that names neither a
//! volume nor a storage class gets a `hostPath` PersistentVolume over a fresh directory,
//! pre-bound to it; a volume it made is deleted, with its directory, once its claim is gone.
//!
//! Directories are made `0777`, as local-path-provisioner makes them, so a non-root pod can
//! write its volume: the kubelet applies a pod's `fsGroup` to many volume types, but never to
//! `hostPath`. Test-only code, not shipped.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use serde_json::json;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The provisioner's name on the volumes it makes (`pv.kubernetes.io/provisioned-by`).
pub const PROVISIONER: &str = "imageindex.dev/test-local-path";
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";

/// A running provisioner (a thread of the test process); stops when dropped.
pub struct LocalPathProvisioner {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LocalPathProvisioner {
    /// Starts provisioning under `dir`, talking to the API server of `kubeconfig`.
    pub fn start(kubeconfig: &Path, dir: &Path) -> Result<LocalPathProvisioner, String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (kubeconfig, dir) = (kubeconfig.to_path_buf(), dir.to_path_buf());
        let (thread_stop, thread_log) = (stop.clone(), log.clone());
        let thread = std::thread::Builder::new()
            .name("local-path-provisioner".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => return push(&thread_log, format!("no runtime: {e}")),
                };
                runtime.block_on(async move {
                    let client = match client_for(&kubeconfig).await {
                        Ok(c) => c,
                        Err(e) => return push(&thread_log, e),
                    };
                    while !thread_stop.load(Ordering::Relaxed) {
                        match provision(&client, &dir).await {
                            Ok(done) => done.into_iter().for_each(|d| push(&thread_log, d)),
                            Err(e) => push(&thread_log, format!("provisioner: {e}")),
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                });
            })
            .map_err(|e| format!("cannot start the provisioner's thread: {e}"))?;
        Ok(LocalPathProvisioner {
            stop,
            log,
            thread: Some(thread),
        })
    }

    /// What it did so far, one line per volume made or deleted (and errors).
    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for LocalPathProvisioner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn push(log: &Mutex<Vec<String>>, line: String) {
    if let Ok(mut l) = log.lock() {
        l.push(line);
    }
}

/// A client for the API server of `kubeconfig`.
pub(crate) async fn client_for(kubeconfig: &Path) -> Result<Client, String> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .map_err(|e| format!("reading {}: {e}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("kubeconfig {}: {e}", kubeconfig.display()))?;
    Client::try_from(config).map_err(|e| format!("client: {e}"))
}

/// One pass: a volume for each claim waiting for one, and deletes the released volumes it
/// made (with their directories). Returns what it did.
pub async fn provision(client: &Client, dir: &Path) -> Result<Vec<String>, kube::Error> {
    let mut done = Vec::new();
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let claims = claims.list(&ListParams::default()).await?.items;
    let volumes = pvs.list(&ListParams::default()).await?.items;
    for claim in &claims {
        let spec = claim.spec.clone().unwrap_or_default();
        let pending = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
        let uid = claim.uid().unwrap_or_default();
        let taken = volumes.iter().any(|pv| {
            pv.spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| r.uid.as_deref())
                == Some(uid.as_str())
        });
        if !pending
            || claim.metadata.deletion_timestamp.is_some()
            || spec.volume_name.is_some_and(|v| !v.is_empty())
            || spec.storage_class_name.is_some()
            || taken
        {
            continue;
        }
        let name = format!("pvc-{uid}");
        let path = dir.join(&name);
        if let Err(e) = fs::create_dir_all(&path)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o777)))
        {
            done.push(format!("cannot make {}: {e}", path.display()));
            continue;
        }
        let size = spec
            .resources
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").map(|q| q.0.clone()))
            .unwrap_or_else(|| "1Gi".into());
        let pv: PersistentVolume = match serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "annotations": {PROVISIONED_BY: PROVISIONER}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": spec.access_modes.unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "",
                "hostPath": {"path": path.to_string_lossy(), "type": "Directory"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": claim.namespace(),
                    "name": claim.name_any(),
                    "uid": uid,
                },
            },
        })) {
            Ok(pv) => pv,
            Err(e) => {
                done.push(format!("volume for claim {}: {e}", claim.name_any()));
                continue;
            }
        };
        match pvs.create(&PostParams::default(), &pv).await {
            Ok(_) => done.push(format!(
                "provisioned {name} at {} for claim {}/{}",
                path.display(),
                claim.namespace().unwrap_or_default(),
                claim.name_any()
            )),
            Err(kube::Error::Api(s)) if s.is_already_exists() => {}
            Err(e) => return Err(e),
        }
    }
    for pv in &volumes {
        let ours = pv.annotations().get(PROVISIONED_BY).map(String::as_str) == Some(PROVISIONER);
        let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
        if !ours || !released || pv.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pv.name_any();
        match pvs.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => continue,
            Err(e) => return Err(e),
        }
        let path = pv
            .spec
            .as_ref()
            .and_then(|s| s.host_path.as_ref())
            .map(|h| PathBuf::from(&h.path));
        if let Some(path) = path.filter(|p| p.starts_with(dir)) {
            let _ = fs::remove_dir_all(&path);
        }
        done.push(format!("deleted released volume {name} and its directory"));
    }
    Ok(done)
}
