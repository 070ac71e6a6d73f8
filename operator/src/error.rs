//! The controller's errors: one variant per reconcile step, naming the object it failed on.

use thiserror::Error;

/// Why a reconcile failed. The step name labels `imageindex_operator_reconcile_errors_total`.
#[derive(Debug, Error)]
pub enum Error {
    /// The ImageIndex lacks a field every stored object has (namespace, uid).
    #[error("ImageIndex {instance} has no {field}")]
    MissingField {
        /// The ImageIndex.
        instance: String,
        /// The missing field.
        field: &'static str,
    },
    /// Reading the ImageIndex failed.
    #[error("reading ImageIndex {instance}: {source}")]
    Fetch {
        /// The ImageIndex.
        instance: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Listing the scan and build pods failed.
    #[error("listing the pods of ImageIndex {instance}: {source}")]
    ListPods {
        /// The ImageIndex.
        instance: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Listing a sharded index's shard Services failed.
    #[error("listing the shard Services of ImageIndex {instance}: {source}")]
    ListServices {
        /// The ImageIndex.
        instance: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Making the index claim failed.
    #[error("making index claim {claim}: {source}")]
    EnsureIndexClaim {
        /// The claim.
        claim: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Making the scan pod failed.
    #[error("creating scan pod {pod}: {source}")]
    CreateScanPod {
        /// The pod.
        pod: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Making a build pod failed.
    #[error("creating build pod {pod}: {source}")]
    CreateBuildPod {
        /// The pod.
        pod: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting a pod failed.
    #[error("deleting pod {pod}: {source}")]
    DeletePod {
        /// The pod.
        pod: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Applying the query Deployment failed.
    #[error("applying query Deployment {name}: {source}")]
    ApplyDeployment {
        /// The Deployment.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Applying the query Service failed.
    #[error("applying query Service {name}: {source}")]
    ApplyService {
        /// The Service.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("writing the status of ImageIndex {instance}: {source}")]
    WriteStatus {
        /// The ImageIndex.
        instance: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// Every step name [`Error::step`] returns: the metrics start each at 0, so dashboards
    /// and alerts see the series before the first error.
    pub const STEPS: [&'static str; 11] = [
        "read_object",
        "fetch",
        "list_pods",
        "list_services",
        "ensure_index_claim",
        "create_scan_pod",
        "create_build_pod",
        "delete_pod",
        "apply_query_deployment",
        "apply_query_service",
        "write_status",
    ];

    /// The step that failed, as a metric label.
    pub fn step(&self) -> &'static str {
        match self {
            Error::MissingField { .. } => "read_object",
            Error::Fetch { .. } => "fetch",
            Error::ListPods { .. } => "list_pods",
            Error::ListServices { .. } => "list_services",
            Error::EnsureIndexClaim { .. } => "ensure_index_claim",
            Error::CreateScanPod { .. } => "create_scan_pod",
            Error::CreateBuildPod { .. } => "create_build_pod",
            Error::DeletePod { .. } => "delete_pod",
            Error::ApplyDeployment { .. } => "apply_query_deployment",
            Error::ApplyService { .. } => "apply_query_service",
            Error::WriteStatus { .. } => "write_status",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_object_and_steps_are_labels() {
        let e = Error::MissingField {
            instance: "cats".into(),
            field: "metadata.uid",
        };
        assert_eq!(e.to_string(), "ImageIndex cats has no metadata.uid");
        assert_eq!(e.step(), "read_object");
        let e = Error::CreateBuildPod {
            pod: "cats-build-2".into(),
            source: kube::Error::LinesCodecMaxLineLengthExceeded,
        };
        assert!(e
            .to_string()
            .starts_with("creating build pod cats-build-2: "));
        assert_eq!(e.step(), "create_build_pod");
    }

    #[test]
    fn steps_lists_every_variants_step_once() {
        let api = || kube::Error::LinesCodecMaxLineLengthExceeded;
        let s = || "x".to_string();
        let all = [
            Error::MissingField {
                instance: s(),
                field: "f",
            },
            Error::Fetch {
                instance: s(),
                source: api(),
            },
            Error::ListPods {
                instance: s(),
                source: api(),
            },
            Error::ListServices {
                instance: s(),
                source: api(),
            },
            Error::EnsureIndexClaim {
                claim: s(),
                source: api(),
            },
            Error::CreateScanPod {
                pod: s(),
                source: api(),
            },
            Error::CreateBuildPod {
                pod: s(),
                source: api(),
            },
            Error::DeletePod {
                pod: s(),
                source: api(),
            },
            Error::ApplyDeployment {
                name: s(),
                source: api(),
            },
            Error::ApplyService {
                name: s(),
                source: api(),
            },
            Error::WriteStatus {
                instance: s(),
                source: api(),
            },
        ];
        let steps: Vec<&str> = all.iter().map(Error::step).collect();
        assert_eq!(steps, Error::STEPS);
    }
}
