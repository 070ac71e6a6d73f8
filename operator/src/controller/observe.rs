//! Observe: what the controller reads before it decides — the ImageIndex's scan and build
//! pods, and a scrape of the running build's `/metrics` when one is due. Kubernetes and HTTP
//! I/O only; which pod is scraped is [`decide::scrape_target`]'s call.

use super::{decide, Context};
use crate::error::Error;
use crate::history::BuildKey;
use crate::resources::Instance;
use crate::scrape;
use imageindex_crds::labels::{self, Component};
use imageindex_crds::observation::ScrapedMetrics;
use imageindex_crds::pressure::MemorySample;
use imageindex_crds::ImageIndexStatus;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::Api;
use std::time::{Duration, Instant};
use tracing::warn;

/// What one reconcile observed.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The ImageIndex's scan and build pods.
    pub pods: Vec<Pod>,
    /// The running build's metrics, when it runs with an address to scrape.
    pub scrape: Option<Scrape>,
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
        Some(target) => Some(scrape_build(ctx, inst, &target).await),
        None => None,
    };
    Ok(Observed { pods, scrape })
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
async fn scrape_build(ctx: &Context, inst: &Instance<'_>, target: &decide::ScrapeTarget) -> Scrape {
    let interval = ctx.settings.scrape_interval;
    let key = BuildKey {
        uid: inst.owner.uid.clone(),
        attempt: target.attempt,
    };
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
            warn!(imageindex = %inst.name, %error, "cannot scrape the build's metrics");
            Scrape::Failed
        }
    }
}
