//! Apply: carries a [`Plan`] out against the API server, in order, recording each [`Step`]
//! into status once the effects before it succeeded. The first failure ends the reconcile with
//! the error of its step.

use super::plan::{self, Done, Effect, Plan};
use super::{Context, MANAGER};
use crate::error::Error;
use imageindex_crds::labels::Component;
use imageindex_crds::transitions::StatusDraft;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

/// Carries out `plan` in namespace `ns`; the requeue is the plan's unless a step set one.
pub async fn apply(
    ctx: &Context,
    ns: &str,
    draft: &mut StatusDraft,
    plan: Plan,
) -> Result<Action, Error> {
    let mut requeue = plan.requeue;
    let mut done = Done::Nothing;
    for effect in plan.effects {
        match effect {
            Effect::DeletePod(pod) => {
                delete_pod(ctx, ns, &pod).await?;
                done = Done::Nothing;
            }
            Effect::EnsureIndexClaim(claim) => {
                ensure_index_claim(ctx, ns, &claim).await?;
                done = Done::Nothing;
            }
            Effect::CreatePod { pod, component } => {
                done = Done::Created(create_pod(ctx, ns, &pod, component).await?);
            }
            Effect::ApplyQuery {
                deployment,
                service,
                replicas,
            } => {
                let available = apply_query(ctx, ns, &deployment, &service).await?;
                done = Done::Available(replicas == 0 || available);
            }
            Effect::ApplyShards {
                shards,
                router,
                replicas,
            } => {
                let mut unavailable = Vec::new();
                for (i, (deployment, service)) in (0u32..).zip(&shards) {
                    if !apply_query(ctx, ns, deployment, service).await? && replicas > 0 {
                        unavailable.push(i);
                    }
                }
                let (router_applied, router_available) = match router {
                    Some(r) => (
                        true,
                        apply_query(ctx, ns, &r.0, &r.1).await? || replicas == 0,
                    ),
                    None => (false, false),
                };
                done = Done::Shards {
                    router_applied,
                    router_available,
                    unavailable,
                };
            }
            Effect::Record(step) => {
                if let Some(r) = plan::record(draft, step, done.clone()) {
                    requeue = r;
                }
            }
        }
    }
    Ok(Action::requeue(requeue))
}

fn already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_already_exists())
}

fn gone(e: &kube::Error) -> bool {
    // 404: already deleted; 409: the uid precondition failed, so our pod is gone.
    matches!(e, kube::Error::Api(s) if s.is_not_found() || s.code == 409)
}

/// Creates a pod; `Ok(false)` when it already exists (it is adopted).
async fn create_pod(
    ctx: &Context,
    ns: &str,
    pod: &Pod,
    component: Component,
) -> Result<bool, Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    match api.create(&PostParams::default(), pod).await {
        Ok(_) => Ok(true),
        Err(e) if already_exists(&e) => Ok(false),
        Err(source) => {
            let pod = pod.name_any();
            Err(match component {
                Component::Scan => Error::CreateScanPod { pod, source },
                _ => Error::CreateBuildPod { pod, source },
            })
        }
    }
}

/// Deletes a pod if it is still the one observed (its uid); gone already is fine.
async fn delete_pod(ctx: &Context, ns: &str, pod: &Pod) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&pod.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(e) if gone(&e) => Ok(()),
        Err(source) => Err(Error::DeletePod {
            pod: pod.name_any(),
            source,
        }),
    }
}

async fn ensure_index_claim(
    ctx: &Context,
    ns: &str,
    claim: &PersistentVolumeClaim,
) -> Result<(), Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let name = claim.name_any();
    let err = |source| Error::EnsureIndexClaim {
        claim: name.clone(),
        source,
    };
    if api.get_opt(&name).await.map_err(err)?.is_some() {
        return Ok(());
    }
    match api.create(&PostParams::default(), claim).await {
        Ok(_) => Ok(()),
        Err(e) if already_exists(&e) => Ok(()),
        Err(source) => Err(err(source)),
    }
}

/// Applies the query Deployment and Service; returns whether the Deployment has an available
/// replica.
async fn apply_query(
    ctx: &Context,
    ns: &str,
    deployment: &Deployment,
    service: &Service,
) -> Result<bool, Error> {
    let params = PatchParams::apply(MANAGER).force();
    let name = deployment.name_any();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let applied = deployments
        .patch(&name, &params, &Patch::Apply(deployment))
        .await
        .map_err(|source| Error::ApplyDeployment {
            name: name.clone(),
            source,
        })?;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let service_name = service.name_any();
    services
        .patch(&service_name, &params, &Patch::Apply(service))
        .await
        .map_err(|source| Error::ApplyService {
            name: service_name.clone(),
            source,
        })?;
    let available = applied
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    Ok(available > 0)
}
