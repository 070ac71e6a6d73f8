//! Pod volumes as local directories, and a local-path provisioner for the claims no volume
//! was made for (as rancher's local-path-provisioner does on a one-node cluster).
//!
//! A claim resolves to the directory of the PersistentVolume it is bound to (`hostPath` or
//! `local`); until it is bound the pod waits in `ContainerCreating`, as with a kubelet.

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The provisioner name on the PersistentVolumes the agent makes.
pub const PROVISIONER: &str = "imageindex.dev/test-node-agent";
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";

/// A pod volume on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalVolume {
    /// The volume's name in the pod spec.
    pub name: String,
    /// Its directory.
    pub path: PathBuf,
    /// Whether the volume itself is read-only (a mount may also ask for it).
    pub read_only: bool,
}

/// Why a pod's volumes are not ready.
#[derive(Debug)]
pub enum VolumeError {
    /// Waiting for something (a claim to be bound): retry.
    NotReady(String),
    /// The agent cannot provide this volume.
    Unsupported(String),
}

impl std::fmt::Display for VolumeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VolumeError::NotReady(m) | VolumeError::Unsupported(m) => f.write_str(m),
        }
    }
}

fn api_error(what: String) -> impl FnOnce(kube::Error) -> VolumeError {
    move |e| VolumeError::NotReady(format!("{what}: {e}"))
}

fn write_items(
    dir: &Path,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    default_mode: Option<i32>,
) -> Result<(), VolumeError> {
    let io = |e: std::io::Error| VolumeError::Unsupported(format!("{}: {e}", dir.display()));
    fs::create_dir_all(dir).map_err(io)?;
    let files: Vec<(String, Vec<u8>, Option<i32>)> = match items {
        Some(items) => items
            .iter()
            .filter_map(|i| {
                data.get(&i.key)
                    .map(|v| (i.path.clone(), v.clone(), i.mode))
            })
            .collect(),
        None => data.into_iter().map(|(k, v)| (k, v, None)).collect(),
    };
    for (path, bytes, mode) in files {
        if path.split('/').any(|c| c == "..") {
            return Err(VolumeError::Unsupported(format!(
                "item path {path:?} leaves the volume"
            )));
        }
        let file = dir.join(&path);
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent).map_err(io)?;
        }
        fs::write(&file, bytes).map_err(io)?;
        let mode = mode.or(default_mode).unwrap_or(0o644) as u32;
        fs::set_permissions(&file, fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    Ok(())
}

/// The pod's volumes as directories; `pod_dir` holds those that live with the pod
/// (emptyDir, secret, configMap).
pub async fn resolve(
    client: &Client,
    pod: &Pod,
    pod_dir: &Path,
) -> Result<Vec<LocalVolume>, VolumeError> {
    let ns = pod.namespace().unwrap_or_default();
    let mut out = Vec::new();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in volumes {
        let own_dir = pod_dir.join("volumes").join(&v.name);
        let io = |e: std::io::Error| VolumeError::Unsupported(format!("volume {}: {e}", v.name));
        let (path, read_only) = if let Some(pvc) = &v.persistent_volume_claim {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
            let claim = claims
                .get_opt(&pvc.claim_name)
                .await
                .map_err(api_error(format!(
                    "persistentvolumeclaim {:?}",
                    pvc.claim_name
                )))?
                .ok_or_else(|| {
                    VolumeError::NotReady(format!(
                        "persistentvolumeclaim {:?} not found",
                        pvc.claim_name
                    ))
                })?;
            let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
            let volume_name = claim
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.clone())
                .unwrap_or_default();
            if !bound || volume_name.is_empty() {
                return Err(VolumeError::NotReady(format!(
                    "waiting for persistentvolumeclaim {:?} to be bound",
                    pvc.claim_name
                )));
            }
            let pvs: Api<PersistentVolume> = Api::all(client.clone());
            let pv = pvs
                .get(&volume_name)
                .await
                .map_err(api_error(format!("persistentvolume {volume_name:?}")))?;
            let spec = pv.spec.unwrap_or_default();
            let path = spec
                .host_path
                .map(|h| h.path)
                .or(spec.local.map(|l| l.path))
                .ok_or_else(|| {
                    VolumeError::Unsupported(format!(
                        "persistentvolume {volume_name:?} is neither hostPath nor local"
                    ))
                })?;
            let path = PathBuf::from(path);
            fs::create_dir_all(&path).map_err(io)?;
            (path, pvc.read_only.unwrap_or(false))
        } else if let Some(h) = &v.host_path {
            let path = PathBuf::from(&h.path);
            match h.type_.as_deref().unwrap_or("") {
                "DirectoryOrCreate" => fs::create_dir_all(&path).map_err(io)?,
                "" => {}
                _ if path.exists() => {}
                t => {
                    return Err(VolumeError::NotReady(format!(
                        "hostPath {} ({t}) does not exist",
                        h.path
                    )))
                }
            }
            (path, false)
        } else if v.empty_dir.is_some() {
            fs::create_dir_all(&own_dir).map_err(io)?;
            (own_dir, false)
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
            let data = match secrets
                .get_opt(&name)
                .await
                .map_err(api_error(format!("secret {name:?}")))?
            {
                Some(secret) => secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, ByteString(v))| (k, v))
                    .collect(),
                None if s.optional == Some(true) => BTreeMap::new(),
                None => return Err(VolumeError::NotReady(format!("secret {name:?} not found"))),
            };
            write_items(&own_dir, data, s.items.as_ref(), s.default_mode)?;
            (own_dir, true)
        } else if let Some(c) = &v.config_map {
            let name = c.name.clone();
            let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
            let data = match maps
                .get_opt(&name)
                .await
                .map_err(api_error(format!("configmap {name:?}")))?
            {
                Some(map) => map
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect(),
                None if c.optional == Some(true) => BTreeMap::new(),
                None => {
                    return Err(VolumeError::NotReady(format!(
                        "configmap {name:?} not found"
                    )))
                }
            };
            write_items(&own_dir, data, c.items.as_ref(), c.default_mode)?;
            (own_dir, true)
        } else {
            return Err(VolumeError::Unsupported(format!(
                "volume {:?}: only persistentVolumeClaim, hostPath, emptyDir, secret and configMap \
                 volumes are supported by the test node agent",
                v.name
            )));
        };
        out.push(LocalVolume {
            name: v.name.clone(),
            path,
            read_only,
        });
    }
    Ok(out)
}

/// Makes a hostPath PersistentVolume under `volumes_dir` for every pending claim that names no
/// volume and no storage class, and deletes the volumes it made once released (with their
/// directories). One pass; the agent runs it every second.
pub async fn provision(client: &Client, volumes_dir: &Path) -> Result<Vec<String>, kube::Error> {
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
        let dir = volumes_dir.join(&name);
        if let Err(e) = fs::create_dir_all(&dir) {
            done.push(format!("cannot make {}: {e}", dir.display()));
            continue;
        }
        let size = spec
            .resources
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").map(|q| q.0.clone()))
            .unwrap_or_else(|| "1Gi".into());
        let pv: PersistentVolume = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "annotations": {PROVISIONED_BY: PROVISIONER}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": spec.access_modes.unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "",
                "hostPath": {"path": dir.to_string_lossy(), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": claim.namespace(),
                    "name": claim.name_any(),
                    "uid": uid,
                },
            },
        }))
        .expect("a valid PersistentVolume");
        match pvs.create(&PostParams::default(), &pv).await {
            Ok(_) => done.push(format!(
                "provisioned {name} at {} for claim {}/{}",
                dir.display(),
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
        if let Some(path) = path.filter(|p| p.starts_with(volumes_dir)) {
            let _ = fs::remove_dir_all(&path);
        }
        done.push(format!("deleted released volume {name} and its directory"));
    }
    Ok(done)
}
