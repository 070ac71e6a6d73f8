//! The objects the operator makes for an ImageIndex, built as pure functions of the resource,
//! its validated spec and the decisions taken (attempt number, preset).
//!
//! Every object carries the contract labels of `imageindex_crds::labels` and a controller
//! owner reference to its ImageIndex, so deleting the ImageIndex garbage-collects it.

use crate::pods::{BUILD_CONTAINER, METRICS_PORT_NAME, SCAN_CONTAINER};
use crate::settings::{Settings, QUERY_PORT};
use imageindex_crds::labels::{self, Component};
use imageindex_crds::validate::{FieldError, ValidSpec};
use imageindex_crds::{ImageIndexSpec, Preset};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

/// Where the dataset claim is mounted in scan and build pods.
pub const DATASET_MOUNT: &str = "/dataset";
/// Where the index volume is mounted in build and query pods.
pub const INDEX_MOUNT: &str = "/index";
/// Where the query service's token file is mounted.
pub const AUTH_MOUNT: &str = "/etc/imageindex";
/// Size of the index claim the operator makes when `spec.storage.size` is not set.
pub const DEFAULT_INDEX_SIZE: &str = "10Gi";
/// Bytes of [`DEFAULT_INDEX_SIZE`].
pub const DEFAULT_INDEX_BYTES: u64 = 10 << 30;
/// Memory limit of each query pod when `spec.query.memoryLimit` is not set.
pub const DEFAULT_QUERY_MEMORY: &str = "512Mi";
/// CPU limit of each query pod when `spec.query.cpu` is not set.
pub const DEFAULT_QUERY_CPU: &str = "1";
/// Seconds a build gets after SIGTERM to write its checkpoint.
pub const BUILD_GRACE_SECONDS: i64 = 60;
/// Longest ImageIndex name: `<name>-query` must be a DNS label (63 characters) for its Service.
pub const MAX_NAME_LEN: usize = 63 - "-query".len();
/// Longest sharded ImageIndex name: `<name>-shard-<i>` (i < 64) must be a DNS label too.
pub const MAX_SHARDED_NAME_LEN: usize = 63 - "-shard-63".len();
/// How long the router waits for each shard before answering without it.
pub const ROUTER_DEADLINE: &str = "2s";
/// Annotation on shard query pods: the index generation they were rolled to.
pub const GENERATION: &str = "imagematch.dev/generation";
/// The termination-message file the scan writes its report to.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// The user and group scan, build and query pods run as: the indexer image's (`USER` in
/// indexer/Dockerfile), also the group that owns the index volume (`fsGroup`).
pub const INDEXER_UID: i64 = 65532;
/// Where each pod gets a writable scratch directory (an emptyDir): the root filesystem is
/// read-only.
pub const TMP_MOUNT: &str = "/tmp";

/// Non-root, with the index volume's files owned by its group (changed only when the volume's
/// root does not have it yet: the index may be large), the runtime's default seccomp profile.
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(INDEXER_UID),
        run_as_group: Some(INDEXER_UID),
        fs_group: Some(INDEXER_UID),
        fs_group_change_policy: Some("OnRootMismatch".into()),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// No privilege escalation, no capabilities, a read-only root filesystem.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

fn tmp_volume() -> Volume {
    Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

fn tmp_mount() -> VolumeMount {
    VolumeMount {
        name: "tmp".into(),
        mount_path: TMP_MOUNT.into(),
        ..VolumeMount::default()
    }
}

/// One ImageIndex as the builders need it.
#[derive(Clone, Debug)]
pub struct Instance<'a> {
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.namespace`.
    pub namespace: &'a str,
    /// The controller owner reference to the ImageIndex.
    pub owner: OwnerReference,
    /// The spec.
    pub spec: &'a ImageIndexSpec,
    /// The spec's validated quantities.
    pub valid: &'a ValidSpec,
    /// The operator's settings.
    pub settings: &'a Settings,
}

/// Checks that an ImageIndex name leaves room for the names and labels derived from it.
pub fn check_name(name: &str) -> Result<(), FieldError> {
    check_name_for(name, false)
}

/// [`check_name`] for an index that may be `sharded` (`spec.shards` other than 1), whose
/// names `<name>-shard-<i>` are longer.
pub fn check_name_for(name: &str, sharded: bool) -> Result<(), FieldError> {
    if sharded && name.len() > MAX_SHARDED_NAME_LEN {
        return Err(FieldError {
            field: "metadata.name".into(),
            message: format!(
                "{} characters is too long for a sharded index: the Services `<name>-shard-<i>` must be DNS labels, so at most {MAX_SHARDED_NAME_LEN}",
                name.len()
            ),
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(FieldError {
            field: "metadata.name".into(),
            message: format!(
                "{} characters is too long: the query Service `<name>-query` must be a DNS label, so at most {MAX_NAME_LEN}",
                name.len()
            ),
        });
    }
    Ok(())
}

/// The scan pod of the build whose first attempt is `n`.
pub fn scan_pod_name(instance: &str, n: u32) -> String {
    format!("{instance}-scan-{n}")
}

/// The build pod of attempt `n`.
pub fn build_pod_name(instance: &str, n: u32) -> String {
    format!("{instance}-build-{n}")
}

/// The query Deployment and Service.
pub fn query_name(instance: &str) -> String {
    format!("{instance}-query")
}

/// Shard `shard`'s build pod of attempt `n`.
pub fn shard_build_pod_name(instance: &str, shard: u32, n: u32) -> String {
    format!("{instance}-s{shard}-build-{n}")
}

/// Shard `shard`'s query Deployment and Service.
pub fn shard_name(instance: &str, shard: u32) -> String {
    format!("{instance}-shard-{shard}")
}

/// Shard `shard`'s index claim, when the operator makes it.
pub fn shard_claim_name(instance: &str, shard: u32) -> String {
    format!("{instance}-index-{shard}")
}

/// The index claim the operator makes (when `spec.storage.claimName` is not set).
pub fn index_claim_default_name(instance: &str) -> String {
    format!("{instance}-index")
}

/// The query service's in-cluster URL.
pub fn endpoint(instance: &str, namespace: &str) -> String {
    format!(
        "http://{}.{namespace}.svc:{QUERY_PORT}",
        query_name(instance)
    )
}

/// The dataset directory as seen inside scan and build pods.
pub fn dataset_dir(path: &str) -> String {
    let inner = path.trim_matches('/');
    if inner.is_empty() {
        DATASET_MOUNT.to_string()
    } else {
        format!("{DATASET_MOUNT}/{inner}")
    }
}

impl Instance<'_> {
    /// The claim the index lives on: `spec.storage.claimName` or `<name>-index`.
    pub fn index_claim_name(&self) -> String {
        self.spec
            .storage
            .as_ref()
            .and_then(|s| s.claim_name.clone())
            .unwrap_or_else(|| index_claim_default_name(self.name))
    }

    /// Whether the operator makes the index claim (rather than using the user's).
    pub fn makes_index_claim(&self) -> bool {
        self.spec
            .storage
            .as_ref()
            .and_then(|s| s.claim_name.as_ref())
            .is_none()
    }

    /// The disk the index may use: the size of the claim the operator makes, or the size
    /// the user declared for their own claim; unknown otherwise.
    pub fn disk_limit(&self) -> Option<u64> {
        match self.valid.storage_bytes {
            Some(bytes) => Some(bytes),
            None if self.makes_index_claim() => Some(DEFAULT_INDEX_BYTES),
            None => None,
        }
    }

    fn image(&self) -> String {
        self.spec
            .indexer_image
            .clone()
            .unwrap_or_else(|| self.settings.indexer_image.clone())
    }

    fn threads(&self) -> u32 {
        self.valid.threads.unwrap_or(1)
    }

    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_string()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    fn with_rebuild(&self, mut labels: BTreeMap<String, String>) -> BTreeMap<String, String> {
        if let Some(token) = self.spec.rebuild.as_ref() {
            labels.insert(labels::REBUILD.to_string(), token.clone());
        }
        labels
    }

    /// Memory request = limit = `spec.memoryLimit`; CPU request = limit = `spec.cpu` if set.
    fn build_resources(&self) -> ResourceRequirements {
        let mut limits = BTreeMap::from([(
            "memory".to_string(),
            Quantity(self.spec.memory_limit.trim().to_string()),
        )]);
        if let Some(cpu) = self.spec.cpu.as_ref() {
            limits.insert("cpu".to_string(), Quantity(cpu.trim().to_string()));
        }
        ResourceRequirements {
            requests: Some(limits.clone()),
            limits: Some(limits),
            ..ResourceRequirements::default()
        }
    }

    fn dataset_volume(&self) -> Volume {
        Volume {
            name: "dataset".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: self.spec.dataset.claim_name.clone().unwrap_or_default(),
                read_only: Some(true),
            }),
            ..Volume::default()
        }
    }

    fn index_volume(&self) -> Volume {
        self.index_volume_of(None)
    }

    /// The index volume of `shard` (`None`: the unsharded index).
    fn index_volume_of(&self, shard: Option<u32>) -> Volume {
        Volume {
            name: "index".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: self.index_claim_name_of(shard),
                read_only: None,
            }),
            ..Volume::default()
        }
    }

    /// The claim shard `shard`'s index lives on (`None`: the unsharded index's): the
    /// operator makes one claim per shard, `<name>-index-<i>` of `spec.storage.size` each, so
    /// shards can land on different nodes; a user's `spec.storage.claimName` is shared by all
    /// shards, each in its own directory `shard-<i>` ([`Self::index_dir`]).
    pub fn index_claim_name_of(&self, shard: Option<u32>) -> String {
        match shard {
            Some(i) if self.makes_index_claim() => shard_claim_name(self.name, i),
            _ => self.index_claim_name(),
        }
    }

    /// The index directory of `shard` inside build and shard query pods: the mount itself,
    /// or `shard-<i>` under it on a user's shared claim.
    pub fn index_dir(&self, shard: Option<u32>) -> String {
        match shard {
            Some(i) if !self.makes_index_claim() => format!("{INDEX_MOUNT}/shard-{i}"),
            _ => INDEX_MOUNT.to_string(),
        }
    }

    /// The disk each of `n` shards may use: its own claim's size, or its share of a user's
    /// claim (unknown when the user's claim declares no size).
    pub fn shard_disk_limit(&self, n: u32) -> Option<u64> {
        if self.makes_index_claim() {
            self.disk_limit()
        } else {
            self.disk_limit().map(|d| d / u64::from(n.max(1)))
        }
    }

    /// The index claim the operator makes: `<name>-index`, `spec.storage.size` (default 10Gi).
    pub fn index_claim(&self) -> PersistentVolumeClaim {
        self.index_claim_of(None)
    }

    /// The index claim the operator makes for `shard` (`None`: the unsharded index).
    pub fn index_claim_of(&self, shard: Option<u32>) -> PersistentVolumeClaim {
        let storage = self.spec.storage.clone().unwrap_or_default();
        let mut labels = labels::common(self.name, Component::Build);
        labels.remove(labels::COMPONENT);
        if let Some(i) = shard {
            labels.insert(labels::SHARD.to_string(), i.to_string());
        }
        PersistentVolumeClaim {
            metadata: self.meta(self.index_claim_name_of(shard), labels),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(
                    storage
                        .access_modes
                        .unwrap_or_else(|| vec!["ReadWriteOnce".to_string()]),
                ),
                storage_class_name: storage.storage_class_name,
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity(
                            storage
                                .size
                                .unwrap_or_else(|| DEFAULT_INDEX_SIZE.to_string()),
                        ),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }
    }

    /// The scan pod of the build whose first attempt is `n`: `indexer scan --json`, its report
    /// written to the termination message.
    pub fn scan_pod(&self, n: u32) -> Pod {
        let args = vec![
            "scan".to_string(),
            dataset_dir(&self.spec.dataset.path),
            "--json".into(),
            "--json-out".into(),
            TERMINATION_LOG.into(),
            "--memory-limit".into(),
            self.spec.memory_limit.trim().to_string(),
            "--threads".into(),
            self.threads().to_string(),
        ];
        Pod {
            metadata: self.meta(
                scan_pod_name(self.name, n),
                self.with_rebuild(labels::common(self.name, Component::Scan)),
            ),
            spec: Some(PodSpec {
                restart_policy: Some("Never".into()),
                containers: vec![Container {
                    name: SCAN_CONTAINER.into(),
                    image: Some(self.image()),
                    image_pull_policy: Some(self.settings.image_pull_policy.clone()),
                    command: Some(vec!["indexer".into()]),
                    args: Some(args),
                    resources: Some(self.build_resources()),
                    termination_message_path: Some(TERMINATION_LOG.into()),
                    termination_message_policy: Some("File".into()),
                    security_context: Some(container_security()),
                    volume_mounts: Some(vec![
                        VolumeMount {
                            name: "dataset".into(),
                            mount_path: DATASET_MOUNT.into(),
                            read_only: Some(true),
                            ..VolumeMount::default()
                        },
                        tmp_mount(),
                    ]),
                    ..Container::default()
                }],
                security_context: Some(pod_security()),
                volumes: Some(vec![self.dataset_volume(), tmp_volume()]),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    /// The build pod of attempt `attempt` with `preset`.
    pub fn build_pod(&self, attempt: u32, preset: &Preset) -> Pod {
        self.build_pod_of(None, attempt, preset)
    }

    /// The build pod of `unit` (`None`: the unsharded index; `(i, n)`: shard `i` of `n`) for
    /// attempt `attempt` with `preset`: a shard's runs the same command plus `--shard i/N`,
    /// writes to its own index directory and carries its shard label.
    pub fn build_pod_of(&self, unit: Option<(u32, u32)>, attempt: u32, preset: &Preset) -> Pod {
        let port = self.settings.build_metrics_port;
        let shard = unit.map(|(i, _)| i);
        let mut args = vec![
            "build".to_string(),
            dataset_dir(&self.spec.dataset.path),
            "--out".into(),
            self.index_dir(shard),
            "--preset".into(),
            preset.label(),
            "--memory-limit".into(),
            self.spec.memory_limit.trim().to_string(),
            "--threads".into(),
            self.threads().to_string(),
            "--metrics-addr".into(),
            format!("$(POD_IP):{port}"),
            "--log-format".into(),
            "json".into(),
        ];
        let (name, labels) = match unit {
            None => (
                build_pod_name(self.name, attempt),
                labels::build(self.name, &preset.label(), attempt),
            ),
            Some((i, n)) => {
                args.push("--shard".into());
                args.push(format!("{i}/{n}"));
                (
                    shard_build_pod_name(self.name, i, attempt),
                    labels::shard_build(self.name, &preset.label(), attempt, i),
                )
            }
        };
        Pod {
            metadata: self.meta(name, self.with_rebuild(labels)),
            spec: Some(PodSpec {
                restart_policy: Some("Never".into()),
                termination_grace_period_seconds: Some(BUILD_GRACE_SECONDS),
                containers: vec![Container {
                    name: BUILD_CONTAINER.into(),
                    image: Some(self.image()),
                    image_pull_policy: Some(self.settings.image_pull_policy.clone()),
                    command: Some(vec!["indexer".into()]),
                    args: Some(args),
                    env: Some(vec![pod_ip_env()]),
                    ports: Some(vec![ContainerPort {
                        name: Some(METRICS_PORT_NAME.into()),
                        container_port: i32::from(port),
                        protocol: Some("TCP".into()),
                        ..ContainerPort::default()
                    }]),
                    resources: Some(self.build_resources()),
                    security_context: Some(container_security()),
                    volume_mounts: Some(vec![
                        VolumeMount {
                            name: "dataset".into(),
                            mount_path: DATASET_MOUNT.into(),
                            read_only: Some(true),
                            ..VolumeMount::default()
                        },
                        VolumeMount {
                            name: "index".into(),
                            mount_path: INDEX_MOUNT.into(),
                            ..VolumeMount::default()
                        },
                        tmp_mount(),
                    ]),
                    ..Container::default()
                }],
                security_context: Some(pod_security()),
                volumes: Some(vec![
                    self.dataset_volume(),
                    self.index_volume_of(shard),
                    tmp_volume(),
                ]),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    /// The query Deployment: `indexer serve /index --watch`, which swaps in each new
    /// generation by itself. The index volume is mounted read-write because LMDB readers
    /// register in the environment's lock file.
    pub fn query_deployment(&self) -> Deployment {
        let args = vec![
            "serve".to_string(),
            INDEX_MOUNT.into(),
            "--addr".into(),
            format!("$(POD_IP):{QUERY_PORT}"),
            "--watch".into(),
        ];
        self.server_deployment(
            query_name(self.name),
            labels::common(self.name, Component::Query),
            args,
            Some(self.index_volume()),
            true,
            None,
        )
    }

    /// Shard `shard`'s query Deployment `<name>-shard-<i>` (component `shard`): `indexer
    /// serve` on that shard's index, without `--watch` and without auth (only the router, in
    /// the cluster, talks to it). Its pods are rolled to a new generation by the operator (the
    /// template carries `imagematch.dev/generation`) once every shard has published, so the
    /// router never merges answers of two generations.
    ///
    /// One Deployment per shard rather than a StatefulSet: each shard has its own claim,
    /// preset and generation and is rolled alone, and a StatefulSet's pods share one template
    /// and one rollout.
    pub fn shard_deployment(&self, shard: u32, generation: u64) -> Deployment {
        let args = vec![
            "serve".to_string(),
            self.index_dir(Some(shard)),
            "--addr".into(),
            format!("$(POD_IP):{QUERY_PORT}"),
        ];
        self.server_deployment(
            shard_name(self.name, shard),
            labels::shard_query(self.name, shard),
            args,
            Some(self.index_volume_of(Some(shard))),
            false,
            Some(generation),
        )
    }

    /// Shard `shard`'s ClusterIP Service `<name>-shard-<i>`: the router reaches the shard
    /// through its ClusterIP (kube-proxy, no cluster DNS), which follows pod restarts.
    pub fn shard_service(&self, shard: u32) -> Service {
        self.server_service(
            shard_name(self.name, shard),
            labels::shard_query(self.name, shard),
        )
    }

    /// The router Deployment `<name>-query` (component `query`, behind the ImageIndex's
    /// Service and `status.endpoint`, so clients do not change): `indexer route` over the
    /// shards at `shard_ips` (their Services' ClusterIPs, in shard order), with the query
    /// service's auth.
    pub fn router_deployment(&self, shard_ips: &[String]) -> Deployment {
        let mut args = vec![
            "route".to_string(),
            "--listen".into(),
            format!("0.0.0.0:{QUERY_PORT}"),
        ];
        for ip in shard_ips {
            args.push("--shard".into());
            args.push(format!("http://{ip}:{QUERY_PORT}"));
        }
        args.push("--deadline".into());
        args.push(ROUTER_DEADLINE.into());
        self.server_deployment(
            query_name(self.name),
            labels::common(self.name, Component::Query),
            args,
            None,
            true,
            None,
        )
    }

    /// A Deployment of `indexer` serving HTTP on the port named `http` with `args` (plus
    /// `--auth-file` when `auth` and `spec.query.authSecretName` is set), mounting `index` when
    /// given, its template stamped with `generation` when given.
    fn server_deployment(
        &self,
        name: String,
        labels: BTreeMap<String, String>,
        mut args: Vec<String>,
        index: Option<Volume>,
        auth: bool,
        generation: Option<u64>,
    ) -> Deployment {
        let query = self.spec.query.clone().unwrap_or_default();
        let mut mounts = Vec::new();
        let mut volumes = Vec::new();
        let with_index = index.is_some();
        if let Some(index) = index {
            mounts.push(VolumeMount {
                name: "index".into(),
                mount_path: INDEX_MOUNT.into(),
                ..VolumeMount::default()
            });
            volumes.push(index);
        }
        if let Some(secret) = query.auth_secret_name.as_ref().filter(|_| auth) {
            args.push("--auth-file".into());
            args.push(format!("{AUTH_MOUNT}/tokens"));
            mounts.push(VolumeMount {
                name: "auth".into(),
                mount_path: AUTH_MOUNT.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
            volumes.push(Volume {
                name: "auth".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.clone()),
                    items: Some(vec![KeyToPath {
                        key: "tokens".into(),
                        path: "tokens".into(),
                        mode: None,
                    }]),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
        }
        mounts.push(tmp_mount());
        volumes.push(tmp_volume());
        let limits = BTreeMap::from([
            (
                "memory".to_string(),
                Quantity(
                    query
                        .memory_limit
                        .unwrap_or_else(|| DEFAULT_QUERY_MEMORY.into()),
                ),
            ),
            (
                "cpu".to_string(),
                Quantity(query.cpu.unwrap_or_else(|| DEFAULT_QUERY_CPU.into())),
            ),
        ]);
        let probe = |path: &str, period: i32| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::String("http".into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(period),
            ..Probe::default()
        };
        let annotations =
            generation.map(|g| BTreeMap::from([(GENERATION.to_string(), g.to_string())]));
        Deployment {
            metadata: self.meta(name, labels.clone()),
            spec: Some(DeploymentSpec {
                replicas: Some(self.valid.query_replicas),
                selector: LabelSelector {
                    match_labels: Some(labels.clone()),
                    ..LabelSelector::default()
                },
                // Old and new pods may not share a ReadWriteOnce volume across nodes; the
                // router mounts no index and rolls as usual.
                strategy: with_index.then(|| DeploymentStrategy {
                    type_: Some("Recreate".into()),
                    ..DeploymentStrategy::default()
                }),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        annotations,
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "query".into(),
                            image: Some(self.image()),
                            image_pull_policy: Some(self.settings.image_pull_policy.clone()),
                            command: Some(vec!["indexer".into()]),
                            args: Some(args),
                            env: Some(vec![pod_ip_env()]),
                            ports: Some(vec![ContainerPort {
                                name: Some("http".into()),
                                container_port: i32::from(QUERY_PORT),
                                protocol: Some("TCP".into()),
                                ..ContainerPort::default()
                            }]),
                            readiness_probe: Some(probe("/readyz", 5)),
                            liveness_probe: Some(probe("/healthz", 10)),
                            resources: Some(ResourceRequirements {
                                requests: Some(limits.clone()),
                                limits: Some(limits),
                                ..ResourceRequirements::default()
                            }),
                            security_context: Some(container_security()),
                            volume_mounts: Some(mounts),
                            ..Container::default()
                        }],
                        security_context: Some(pod_security()),
                        volumes: Some(volumes),
                        ..PodSpec::default()
                    }),
                },
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        }
    }

    /// The query Service: port 8080 named `http` (explicit TCP, which server-side apply
    /// needs on older API servers), selecting the query pods.
    pub fn query_service(&self) -> Service {
        self.server_service(
            query_name(self.name),
            labels::common(self.name, Component::Query),
        )
    }

    /// A Service `name` on port 8080 (`http`) selecting the pods labelled `labels`.
    fn server_service(&self, name: String, labels: BTreeMap<String, String>) -> Service {
        Service {
            metadata: self.meta(name, labels.clone()),
            spec: Some(ServiceSpec {
                selector: Some(labels),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: i32::from(QUERY_PORT),
                    protocol: Some("TCP".into()),
                    target_port: Some(IntOrString::String("http".into())),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }
}

fn pod_ip_env() -> EnvVar {
    EnvVar {
        name: "POD_IP".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "status.podIP".into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
        value: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imageindex_crds::preset::PresetName;
    use imageindex_crds::validate::{validate, Mode};

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "imagematch.dev/v1alpha1".into(),
            kind: "ImageIndex".into(),
            name: "cats".into(),
            uid: "uid-1".into(),
            controller: Some(true),
            block_owner_deletion: None,
        }
    }

    fn spec(yaml: &str) -> ImageIndexSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn with<T>(spec: &ImageIndexSpec, f: impl FnOnce(&Instance) -> T) -> T {
        let valid = validate(spec, Mode::Cluster).unwrap();
        let settings = Settings::default();
        let i = Instance {
            name: "cats",
            namespace: "pets",
            owner: owner(),
            spec,
            valid: &valid,
            settings: &settings,
        };
        f(&i)
    }

    const SPEC: &str = "dataset: {claimName: photos, path: /catalogue/2024/}\nmemoryLimit: 512Mi\ncpu: '2'\nrebuild: r1\n";

    fn container(p: &Pod) -> &Container {
        &p.spec.as_ref().unwrap().containers[0]
    }

    #[test]
    fn build_pod_runs_the_contract_command_under_the_limit() {
        let s = spec(SPEC);
        let preset = Preset::from_label("xlarge-nf50").unwrap();
        let pod = with(&s, |i| i.build_pod(3, &preset));
        assert_eq!(pod.metadata.name.as_deref(), Some("cats-build-3"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("pets"));
        let l = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(l[labels::COMPONENT], "build");
        assert_eq!(l[labels::PRESET], "xlarge-nf50");
        assert_eq!(l[labels::ATTEMPT], "3");
        assert_eq!(l[labels::INSTANCE], "cats");
        assert_eq!(l[labels::MANAGED_BY], "imageindex-operator");
        assert_eq!(l[labels::REBUILD], "r1");
        let o = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((o.uid.as_str(), o.controller), ("uid-1", Some(true)));
        let ps = pod.spec.as_ref().unwrap();
        assert_eq!(ps.restart_policy.as_deref(), Some("Never"));
        let c = container(&pod);
        assert_eq!(c.command.as_deref(), Some(&["indexer".to_string()][..]));
        assert_eq!(
            c.args.as_ref().unwrap().join(" "),
            "build /dataset/catalogue/2024 --out /index --preset xlarge-nf50 --memory-limit 512Mi --threads 2 --metrics-addr $(POD_IP):9090 --log-format json"
        );
        let r = c.resources.as_ref().unwrap();
        assert_eq!(r.requests, r.limits);
        let limits = r.limits.as_ref().unwrap();
        assert_eq!(limits["memory"], Quantity("512Mi".into()));
        assert_eq!(limits["cpu"], Quantity("2".into()));
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("metrics"), 9090)
        );
        let env = &c.env.as_ref().unwrap()[0];
        assert_eq!(env.name, "POD_IP");
        let field = env.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
        assert_eq!(field.field_path, "status.podIP");
        let vols = ps.volumes.as_ref().unwrap();
        let ds = vols[0].persistent_volume_claim.as_ref().unwrap();
        assert_eq!(
            (ds.claim_name.as_str(), ds.read_only),
            ("photos", Some(true))
        );
        let ix = vols[1].persistent_volume_claim.as_ref().unwrap();
        assert_eq!((ix.claim_name.as_str(), ix.read_only), ("cats-index", None));
        let mounts = c.volume_mounts.as_ref().unwrap();
        assert_eq!(
            (mounts[0].mount_path.as_str(), mounts[0].read_only),
            ("/dataset", Some(true))
        );
        assert_eq!(
            (mounts[1].mount_path.as_str(), mounts[1].read_only),
            ("/index", None)
        );
        assert_eq!(crate::pods::metrics_port(&pod), Some(9090));
    }

    #[test]
    fn scan_pod_writes_its_report_to_the_termination_message() {
        let s = spec("dataset: {claimName: photos, path: ''}\nmemoryLimit: 1Gi\n");
        let pod = with(&s, |i| i.scan_pod(1));
        assert_eq!(pod.metadata.name.as_deref(), Some("cats-scan-1"));
        let l = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(l[labels::COMPONENT], "scan");
        assert!(!l.contains_key(labels::REBUILD));
        let c = container(&pod);
        assert_eq!(
            c.args.as_ref().unwrap().join(" "),
            "scan /dataset --json --json-out /dev/termination-log --memory-limit 1Gi --threads 1"
        );
        assert_eq!(
            c.termination_message_path.as_deref(),
            Some("/dev/termination-log")
        );
        let names: Vec<&str> = pod
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(names, ["dataset", "tmp"]);
        assert!(c
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()
            .get("cpu")
            .is_none());
    }

    #[test]
    fn every_pod_runs_non_root_on_a_read_only_root_with_a_writable_tmp() {
        let s = spec(SPEC);
        let (scan, build, query) = with(&s, |i| {
            (
                i.scan_pod(1).spec.unwrap(),
                i.build_pod(1, &PresetName::Full.preset()).spec.unwrap(),
                i.query_deployment().spec.unwrap().template.spec.unwrap(),
            )
        });
        for pod in [scan, build, query] {
            let ps = pod.security_context.as_ref().unwrap();
            assert_eq!(ps.run_as_non_root, Some(true));
            assert_eq!(ps.run_as_user, Some(INDEXER_UID));
            // The index volume must be writable by that user on any storage.
            assert_eq!(ps.fs_group, Some(INDEXER_UID));
            let c = &pod.containers[0];
            let cs = c.security_context.as_ref().unwrap();
            assert_eq!(cs.read_only_root_filesystem, Some(true));
            assert_eq!(cs.allow_privilege_escalation, Some(false));
            assert_eq!(
                cs.capabilities.as_ref().unwrap().drop.as_deref(),
                Some(&["ALL".to_string()][..])
            );
            let tmp = c
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .find(|m| m.mount_path == TMP_MOUNT)
                .unwrap();
            let vol = pod
                .volumes
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.name == tmp.name)
                .unwrap();
            assert!(vol.empty_dir.is_some());
        }
    }

    #[test]
    fn index_claim_defaults_and_user_claims() {
        let s = spec(SPEC);
        let pvc = with(&s, |i| {
            assert!(i.makes_index_claim());
            assert_eq!(i.disk_limit(), Some(DEFAULT_INDEX_BYTES));
            i.index_claim()
        });
        assert_eq!(pvc.metadata.name.as_deref(), Some("cats-index"));
        let ps = pvc.spec.unwrap();
        assert_eq!(ps.access_modes.unwrap(), ["ReadWriteOnce"]);
        assert_eq!(
            ps.resources.unwrap().requests.unwrap()["storage"],
            Quantity("10Gi".into())
        );
        assert!(!pvc.metadata.labels.unwrap().contains_key(labels::COMPONENT));

        let s = spec("dataset: {claimName: photos}\nmemoryLimit: 1Gi\nstorage: {claimName: shared, size: 2Gi}\n");
        with(&s, |i| {
            assert!(!i.makes_index_claim());
            assert_eq!(i.index_claim_name(), "shared");
            assert_eq!(i.disk_limit(), Some(2 << 30));
        });
        let s =
            spec("dataset: {claimName: photos}\nmemoryLimit: 1Gi\nstorage: {claimName: shared}\n");
        with(&s, |i| assert_eq!(i.disk_limit(), None));
    }

    #[test]
    fn query_objects_select_the_query_pods() {
        let s = spec("dataset: {claimName: photos}\nmemoryLimit: 1Gi\nquery: {replicas: 2, authSecretName: tokens}\n");
        let (dep, svc) = with(&s, |i| (i.query_deployment(), i.query_service()));
        assert_eq!(dep.metadata.name.as_deref(), Some("cats-query"));
        let ds = dep.spec.unwrap();
        assert_eq!(ds.replicas, Some(2));
        let want = labels::common("cats", Component::Query);
        assert_eq!(ds.selector.match_labels.as_ref(), Some(&want));
        assert_eq!(ds.template.metadata.unwrap().labels.as_ref(), Some(&want));
        let pod = ds.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_ref().unwrap().join(" "),
            "serve /index --addr $(POD_IP):8080 --watch --auth-file /etc/imageindex/tokens"
        );
        assert_eq!(c.ports.as_ref().unwrap()[0].name.as_deref(), Some("http"));
        let secret = pod.volumes.as_ref().unwrap()[1].secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("tokens"));
        assert_eq!(secret.items.as_ref().unwrap()[0].key, "tokens");
        let ss = svc.spec.unwrap();
        assert_eq!(ss.selector.as_ref(), Some(&want));
        let port = &ss.ports.unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.port, port.protocol.as_deref()),
            (Some("http"), 8080, Some("TCP"))
        );
        assert_eq!(svc.metadata.labels.unwrap(), want);
    }

    #[test]
    fn serialized_objects_carry_api_version_and_kind_for_apply() {
        let s = spec(SPEC);
        let (dep, svc) = with(&s, |i| (i.query_deployment(), i.query_service()));
        let d = serde_json::to_value(&dep).unwrap();
        assert_eq!(
            (d["apiVersion"].as_str(), d["kind"].as_str()),
            (Some("apps/v1"), Some("Deployment"))
        );
        let v = serde_json::to_value(&svc).unwrap();
        assert_eq!(
            (v["apiVersion"].as_str(), v["kind"].as_str()),
            (Some("v1"), Some("Service"))
        );
        // Preset::label round-trips through the pod's arguments.
        let p = with(&s, |i| i.build_pod(1, &PresetName::Full.preset()));
        assert!(container(&p)
            .args
            .as_ref()
            .unwrap()
            .contains(&"full".to_string()));
    }

    #[test]
    fn names_and_paths() {
        assert_eq!(endpoint("cats", "pets"), "http://cats-query.pets.svc:8080");
        assert_eq!(dataset_dir("/"), "/dataset");
        assert_eq!(dataset_dir("a/b"), "/dataset/a/b");
        assert!(check_name(&"a".repeat(MAX_NAME_LEN)).is_ok());
        let e = check_name(&"a".repeat(MAX_NAME_LEN + 1)).unwrap_err();
        assert_eq!(e.field, "metadata.name");
        assert!(query_name(&"a".repeat(MAX_NAME_LEN)).len() <= 63);
    }

    const SHARDED: &str = "dataset: {claimName: photos, path: /catalogue}\nmemoryLimit: 512Mi\nshards: 3\nquery: {authSecretName: tokens}\n";

    #[test]
    fn shard_build_pods_run_their_shard_on_their_claim() {
        let s = spec(SHARDED);
        let preset = Preset::from_label("medium").unwrap();
        let pod = with(&s, |i| i.build_pod_of(Some((1, 3)), 2, &preset));
        assert_eq!(pod.metadata.name.as_deref(), Some("cats-s1-build-2"));
        let l = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(l[labels::SHARD], "1");
        assert_eq!(l[labels::COMPONENT], "build");
        assert_eq!(
            (l[labels::PRESET].as_str(), l[labels::ATTEMPT].as_str()),
            ("medium", "2")
        );
        let args = container(&pod).args.as_ref().unwrap().join(" ");
        assert!(
            args.starts_with("build /dataset/catalogue --out /index --preset medium"),
            "{args}"
        );
        assert!(args.ends_with("--shard 1/3"), "{args}");
        let vols = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
        let ix = vols[1].persistent_volume_claim.as_ref().unwrap();
        assert_eq!(ix.claim_name, "cats-index-1");
        let claim = with(&s, |i| i.index_claim_of(Some(1)));
        assert_eq!(claim.metadata.name.as_deref(), Some("cats-index-1"));
        assert_eq!(claim.metadata.labels.as_ref().unwrap()[labels::SHARD], "1");
        // The unsharded pod is unchanged by the shard path.
        let whole = with(&s, |i| i.build_pod(2, &preset));
        assert_eq!(whole.metadata.name.as_deref(), Some("cats-build-2"));
        assert!(!whole
            .metadata
            .labels
            .as_ref()
            .unwrap()
            .contains_key(labels::SHARD));
    }

    #[test]
    fn shards_share_a_users_claim_in_their_own_directories() {
        let s = spec("dataset: {claimName: photos}\nmemoryLimit: 512Mi\nshards: 2\nstorage: {claimName: shared, size: 8Gi}\n");
        let (pod, dep, disk) = with(&s, |i| {
            (
                i.build_pod_of(Some((0, 2)), 1, &PresetName::Small.preset()),
                i.shard_deployment(0, 1),
                i.shard_disk_limit(2),
            )
        });
        let args = container(&pod).args.as_ref().unwrap().join(" ");
        assert!(args.contains("--out /index/shard-0"), "{args}");
        let vols = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
        assert_eq!(
            vols[1].persistent_volume_claim.as_ref().unwrap().claim_name,
            "shared"
        );
        let c = &dep.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(
            c.args.as_ref().unwrap().join(" "),
            "serve /index/shard-0 --addr $(POD_IP):8080"
        );
        assert_eq!(disk, Some(4 << 30));
    }

    #[test]
    fn shard_query_objects_and_the_router() {
        let s = spec(SHARDED);
        let ips = ["10.0.0.7".to_string(), "10.0.0.3".into(), "10.0.0.9".into()];
        let (dep, svc, router, front) = with(&s, |i| {
            (
                i.shard_deployment(2, 4),
                i.shard_service(2),
                i.router_deployment(&ips),
                i.query_service(),
            )
        });
        let want = labels::shard_query("cats", 2);
        assert_eq!(dep.metadata.name.as_deref(), Some("cats-shard-2"));
        assert_eq!(
            dep.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        let ds = dep.spec.unwrap();
        assert_eq!(ds.selector.match_labels.as_ref(), Some(&want));
        let tmeta = ds.template.metadata.unwrap();
        assert_eq!(tmeta.labels.as_ref(), Some(&want));
        assert_eq!(tmeta.annotations.unwrap()[GENERATION], "4");
        let pod = ds.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_ref().unwrap().join(" "),
            "serve /index --addr $(POD_IP):8080"
        );
        assert_eq!(c.ports.as_ref().unwrap()[0].name.as_deref(), Some("http"));
        assert_eq!(
            pod.volumes.as_ref().unwrap()[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "cats-index-2"
        );
        assert_eq!(svc.metadata.name.as_deref(), Some("cats-shard-2"));
        assert_eq!(svc.spec.unwrap().selector.as_ref(), Some(&want));
        assert_eq!(router.metadata.name.as_deref(), Some("cats-query"));
        let rs = router.spec.unwrap();
        let query = labels::common("cats", Component::Query);
        assert_eq!(rs.selector.match_labels.as_ref(), Some(&query));
        let pod = rs.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_ref().unwrap().join(" "),
            "route --listen 0.0.0.0:8080 --shard http://10.0.0.7:8080 --shard http://10.0.0.3:8080 --shard http://10.0.0.9:8080 --deadline 2s --auth-file /etc/imageindex/tokens"
        );
        assert_eq!(c.ports.as_ref().unwrap()[0].name.as_deref(), Some("http"));
        let names: Vec<&str> = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(names, ["auth", "tmp"], "the router mounts no index");
        assert_eq!(rs.strategy, None, "the router rolls as usual");
        assert_eq!(front.spec.unwrap().selector.as_ref(), Some(&query));
    }

    #[test]
    fn sharded_names_leave_room_for_the_shard_suffix() {
        let name = "a".repeat(MAX_SHARDED_NAME_LEN);
        assert!(check_name_for(&name, true).is_ok());
        assert!(shard_name(&name, 63).len() <= 63);
        let longer = "a".repeat(MAX_SHARDED_NAME_LEN + 1);
        assert!(check_name_for(&longer, true).is_err());
        assert!(check_name_for(&longer, false).is_ok());
        assert_eq!(shard_build_pod_name("cats", 1, 2), "cats-s1-build-2");
        assert_eq!(shard_claim_name("cats", 0), "cats-index-0");
    }
}
