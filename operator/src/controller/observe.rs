//! Observe: what the controller reads before it decides — the ImageIndex's scan and build
//! pods, a scrape of the running build's `/metrics` when one is due (with shards: of each
//! running shard build), and a sharded index's shard Services. Kubernetes and HTTP I/O only;
//! which pods are scraped is [`decide::scrape_target`]'s and [`decide::shard_scrape_targets`]'s
//! call.

use super::{decide, Context};
use crate::error::Error;
use crate::history::BuildKey;
use crate::resources::Instance;
use crate::scrape;
use imageindex_crds::labels::{self, Component};
use imageindex_crds::observation::ScrapedMetrics;
use imageindex_crds::pressure::MemorySample;
use imageindex_crds::ImageIndexStatus;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::ListParams;
use kube::Api;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::warn;

/// What one reconcile observed.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The ImageIndex's scan and build pods.
    pub pods: Vec<Pod>,
    /// The running build's metrics, when it runs with an address to scrape.
    pub scrape: Option<Scrape>,
    /// With shards: each running shard build's metrics, by shard.
    pub shard_scrapes: BTreeMap<u32, Scrape>,
    /// With shards: their query Services (the router needs their ClusterIPs).
    pub shard_services: Vec<Service>,
}

/// One look at the running build's metrics.
#[derive(Clone, Debug, PartialEq)]
pub enum Scrape {
    /// Scraped less than an interval ago: look again after this long.
    NotDue(Duration),
    /// The scrape failed (logged and counted); the build is left alone.
    Failed,
    /// What it reported, and the build's recent memory samples (oldest first, this one last).
    Read {
        /// The metrics.
        metrics: ScrapedMetrics,
        /// The recent samples.
        samples: Vec<MemorySample>,
    },
}

/// Lists the pods and scrapes the running build when due.
pub async fn observe(
    ctx: &Context,
    inst: &Instance<'_>,
    status: &ImageIndexStatus,
) -> Result<Observed, Error> {
    let pods = list_pods(ctx, inst).await?;
    let scrape = match decide::scrape_target(inst, status, &pods) {
        Some(target) => Some(scrape_build(ctx, inst, &target, None).await),
        None => None,
    };
    let mut shard_scrapes = BTreeMap::new();
    for (shard, target) in decide::shard_scrape_targets(inst, status, &pods) {
        shard_scrapes.insert(shard, scrape_build(ctx, inst, &target, Some(shard)).await);
    }
    let shard_services = if status.shards.is_empty() {
        Vec::new()
    } else {
        list_shard_services(ctx, inst).await?
    };
    Ok(Observed {
        pods,
        scrape,
        shard_scrapes,
        shard_services,
    })
}

async fn list_shard_services(ctx: &Context, inst: &Instance<'_>) -> Result<Vec<Service>, Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), inst.namespace);
    let selector = format!(
        "{},{}={}",
        labels::instance_selector(inst.name),
        labels::COMPONENT,
        Component::Shard.as_str()
    );
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::ListServices {
            instance: inst.name.to_string(),
            source,
        })?;
    Ok(list.items)
}

/// The memory history's key of a build attempt (a shard's carries `/s<i>` after the uid).
pub fn build_key(uid: &str, shard: Option<u32>, attempt: u32) -> BuildKey {
    BuildKey {
        uid: match shard {
            Some(i) => format!("{uid}/s{i}"),
            None => uid.to_string(),
        },
        attempt,
    }
}

async fn list_pods(ctx: &Context, inst: &Instance<'_>) -> Result<Vec<Pod>, Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), inst.namespace);
    let selector = format!(
        "{},{} in ({},{})",
        labels::instance_selector(inst.name),
        labels::COMPONENT,
        Component::Scan.as_str(),
        Component::Build.as_str()
    );
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::ListPods {
            instance: inst.name.to_string(),
            source,
        })?;
    Ok(list.items)
}

/// Scrapes the running build once its interval has passed, and records the sample.
async fn scrape_build(
    ctx: &Context,
    inst: &Instance<'_>,
    target: &decide::ScrapeTarget,
    shard: Option<u32>,
) -> Scrape {
    let interval = ctx.settings.scrape_interval;
    let key = build_key(&inst.owner.uid, shard, target.attempt);
    let now = Instant::now();
    if let Some(wait) = ctx.history.wait_before_scrape(&key, interval, now) {
        return Scrape::NotDue(wait);
    }
    let url = scrape::metrics_url(&target.ip, target.port);
    match scrape::scrape(&ctx.http, &url).await {
        Ok(metrics) => {
            let (working_set, limit) = metrics.working_set_and_limit(inst.valid.memory_limit);
            let samples = ctx.history.record(&key, now, working_set, limit);
            Scrape::Read { metrics, samples }
        }
        Err(error) => {
            ctx.history.mark_scraped(&key, now);
            ctx.metrics.scrape_errors.inc();
            warn!(imageindex = %inst.name, ?shard, %error, "cannot scrape the build's metrics");
            Scrape::Failed
        }
    }
}
