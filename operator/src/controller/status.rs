//! Write status: the decided status with server-side apply (when it changed), and the Events
//! of the decisions taken.

use super::{Context, MANAGER};
use crate::error::Error;
use imageindex_crds::transitions::StatusDraft;
use imageindex_crds::{ImageIndex, ImageIndexStatus};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

/// Applies the draft's status unless it equals `before` (stamped with the generation it
/// describes).
pub async fn write(
    ctx: &Context,
    ii: &ImageIndex,
    before: &ImageIndexStatus,
    draft: &mut StatusDraft,
) -> Result<(), Error> {
    draft.status.observed_generation = ii.metadata.generation;
    if draft.status == *before {
        return Ok(());
    }
    let name = ii.name_any();
    let api: Api<ImageIndex> =
        Api::namespaced(ctx.client.clone(), &ii.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": ImageIndex::api_version(&()),
        "kind": ImageIndex::kind(&()),
        "status": draft.status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::WriteStatus {
        instance: name.clone(),
        source,
    })?;
    Ok(())
}

fn event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    // The Events API limits notes to 1 kB.
    let note: String = note.chars().take(1000).collect();
    Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_string(),
        secondary: None,
    }
}

/// Logs the draft's notes and publishes them as Events of the ImageIndex (a failure to
/// publish is logged, not an error of the reconcile).
pub async fn publish_events(ctx: &Context, ii: &ImageIndex, draft: &mut StatusDraft) {
    let reference = ii.object_ref(&());
    let (name, ns) = (ii.name_any(), ii.namespace().unwrap_or_default());
    for note in draft.take_notes() {
        info!(imageindex = %name, namespace = %ns, reason = %note.reason, "{}", note.message);
        let type_ = if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        // The Events recorder folds Events of one reason and action into a series: each
        // shard's decisions get their own action (`Build/shard-1`) to stay Events of their own.
        let action = match note.shard {
            Some(shard) => format!("{}/shard-{shard}", note.action),
            None => note.action.to_string(),
        };
        let ev = event(type_, &note.reason, &action, note.message);
        if let Err(error) = ctx.recorder.publish(&ev, &reference).await {
            warn!(imageindex = %name, reason = %ev.reason, %error, "cannot publish event");
        }
    }
}
