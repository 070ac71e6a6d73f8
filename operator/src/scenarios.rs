//! Reconcile scenarios against a mocked API server: each test is the story of one reconcile
//! (or two), asserting the exact requests it makes, in order.

use crate::controller::{reconcile, Context, REQUEUE_SHORT};
use crate::fixtures::*;
use crate::settings::Settings;
use http::{Method, StatusCode};
use imageindex_crds::conditions::{
    self, DEGRADED, MEMORY_PRESSURE, PRESET_FITS, PROGRESSING, READY,
};
use imageindex_crds::first_preset::{self, PresetFit};
use imageindex_crds::labels;
use imageindex_crds::ladder::{self, NextStep};
use imageindex_crds::types::{AttemptOutcome, IndexPhase};
use imageindex_crds::{ImageIndex, ImageIndexStatus, Preset, PresetSelector};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Action;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Runs one reconcile against a verifier scenario; returns the reconcile's action and what
/// the scenario returned (the verifier's own assertion failures are reported first).
async fn run<T: Send + 'static>(
    ctx: Arc<Context>,
    ii: &ImageIndex,
    scenario: impl Future<Output = T> + Send + 'static,
) -> (Action, T) {
    let verifier = tokio::spawn(scenario);
    let (action, verdict) = tokio::join!(reconcile(Arc::new(ii.clone()), ctx), verifier);
    let seen = verdict.expect("the API server scenario failed");
    (action.expect("reconcile failed"), seen)
}

fn condition<'a>(s: &'a ImageIndexStatus, type_: &str) -> (&'a str, &'a str, &'a str) {
    let c = conditions::get(&s.conditions, type_).unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

fn args(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().containers[0]
        .args
        .as_ref()
        .unwrap()
        .join(" ")
}

fn label(pod: &Pod, key: &str) -> String {
    pod.metadata.labels.as_ref().unwrap()[key].clone()
}

fn started(n: u32, preset: &str) -> imageindex_crds::types::Attempt {
    imageindex_crds::attempts::started(n, preset, &format!("cats-build-{n}"), at(10))
}

#[tokio::test]
async fn invalid_spec_is_reported_and_nothing_is_made() {
    let (ctx, mut api) = Context::test();
    let ii = ImageIndex::test_with_spec("dataset: {path: /catalogue}\nmemoryLimit: lots\n");
    let obj = ii.clone();
    let (action, (status, events)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        // No pod list, no pod: straight to status.
        let status = api.apply_status(&obj).await;
        let events = api.events(&["InvalidSpec"]).await;
        api.done().await;
        (status, events)
    })
    .await;
    assert_eq!(status.unit.phase, Some(IndexPhase::Failed));
    assert_eq!(status.observed_generation, Some(1));
    let (s, reason, message) = condition(&status, DEGRADED);
    assert_eq!((s, reason), ("True", "InvalidSpec"));
    assert!(
        message.contains("spec.memoryLimit") && message.contains("spec.dataset.claimName"),
        "{message}"
    );
    assert_eq!(condition(&status, READY).0, "False");
    assert!(status.unit.attempts.is_empty());
    assert_eq!(events[0].0, "Warning");
    assert_eq!(action, Action::requeue(crate::controller::REQUEUE_IDLE));
}

#[tokio::test]
async fn new_resource_gets_an_index_claim_and_a_scan_pod() {
    let (ctx, mut api) = Context::test();
    let ii = ImageIndex::test();
    let obj = ii.clone();
    let (_, (claim, pod, status)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(vec![]).await;
        api.expect(
            Method::GET,
            "/api/v1/namespaces/testns/persistentvolumeclaims/cats-index",
        )
        .await
        .fail(StatusCode::NOT_FOUND, "NotFound");
        let call = api
            .expect(
                Method::POST,
                "/api/v1/namespaces/testns/persistentvolumeclaims",
            )
            .await;
        let claim = call.body.clone();
        call.echo();
        let pod = api.create_pod().await;
        let status = api.apply_status(&obj).await;
        api.events(&["ScanStarted"]).await;
        api.done().await;
        (claim, pod, status)
    })
    .await;
    assert_eq!(claim["metadata"]["name"], "cats-index");
    assert_eq!(claim["metadata"]["ownerReferences"][0]["uid"], UID);
    assert_eq!(claim["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "10Gi");
    assert_eq!(pod.metadata.name.as_deref(), Some("cats-scan-1"));
    assert_eq!(label(&pod, labels::COMPONENT), "scan");
    assert_eq!(label(&pod, labels::INSTANCE), "cats");
    assert!(
        args(&pod).starts_with("scan /dataset/catalogue --json --json-out /dev/termination-log")
    );
    assert_eq!(pod.metadata.owner_references.as_ref().unwrap()[0].uid, UID);
    assert_eq!(status.unit.phase, Some(IndexPhase::Scanning));
    assert_eq!(condition(&status, PROGRESSING).0, "True");
    assert_eq!(
        condition(&status, READY),
        ("False", "NotBuilt", "no index has been published yet")
    );
    assert_eq!(condition(&status, DEGRADED).0, "False");
}

#[tokio::test]
async fn finished_scan_starts_a_build_with_the_chosen_preset() {
    let (ctx, mut api) = Context::test();
    let ii = ImageIndex::test().with_status(scanning());
    let want = match first_preset::choose_preset(
        PresetSelector::Auto,
        &shape(),
        512 << 20,
        Some(10 << 30),
    ) {
        PresetFit::Fits { preset, .. } => preset,
        other => panic!("the fixture dataset should fit 512Mi: {other:?}"),
    };
    let obj = ii.clone();
    let scan = scan_pod_succeeded(&ii);
    let (action, (pod, status)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(vec![scan]).await;
        let pod = api.create_pod().await;
        let status = api.apply_status(&obj).await;
        api.events(&["ScanComplete", "PresetChosen", "BuildStarted"])
            .await;
        api.done().await;
        (pod, status)
    })
    .await;
    assert_eq!(pod.metadata.name.as_deref(), Some("cats-build-1"));
    assert_eq!(label(&pod, labels::COMPONENT), "build");
    assert_eq!(label(&pod, labels::PRESET), want.label());
    assert_eq!(label(&pod, labels::ATTEMPT), "1");
    assert_eq!(label(&pod, labels::MANAGED_BY), "imageindex-operator");
    let c = &pod.spec.as_ref().unwrap().containers[0];
    let r = c.resources.as_ref().unwrap();
    assert_eq!(r.limits.as_ref().unwrap()["memory"].0, "512Mi");
    assert_eq!(r.requests, r.limits);
    assert!(
        args(&pod).starts_with(&format!(
            "build /dataset/catalogue --out /index --preset {} --memory-limit 512Mi",
            want.label()
        )),
        "{}",
        args(&pod)
    );
    assert_eq!(
        pod.spec.as_ref().unwrap().restart_policy.as_deref(),
        Some("Never")
    );

    assert_eq!(status.unit.phase, Some(IndexPhase::Building));
    assert_eq!(status.unit.preset.as_deref(), Some(want.label().as_str()));
    let scan = status.scan.as_ref().unwrap();
    assert_eq!(
        (scan.images, scan.first_attempt, scan.pod.as_deref()),
        (4000, Some(1), Some("cats-scan-1"))
    );
    assert_eq!(status.unit.attempts.len(), 1);
    assert_eq!(status.unit.attempts[0].number, 1);
    assert_eq!(status.unit.attempts[0].pod.as_deref(), Some("cats-build-1"));
    assert_eq!(status.unit.attempts[0].outcome, None);
    assert_eq!(condition(&status, PRESET_FITS).0, "True");
    assert_eq!(action, Action::requeue(Settings::default().scrape_interval));
}

#[tokio::test]
async fn oom_killed_build_in_last_state_is_recorded_and_downgraded() {
    let (ctx, mut api) = Context::test();
    let ii = ImageIndex::test().with_status(building(vec![started(1, "full")]));
    // What the policy says after `full` was OOM-killed under 512Mi.
    let full = Preset::from_label("full").unwrap();
    let next = match ladder::after_attempt(
        &full,
        AttemptOutcome::OomKilled,
        Some(137),
        &[started(1, "full")],
        6,
        512 << 20,
        &shape(),
    ) {
        NextStep::Start { preset, .. } => preset,
        other => panic!("{other:?}"),
    };
    let oom = build_pod(
        &ii,
        &Settings::default(),
        1,
        "full",
        build_ended(
            "Failed",
            terminated(1, "Error", ""),
            terminated(137, "OOMKilled", ""),
        ),
    );
    let obj = ii.clone();
    let pods = vec![scan_pod_succeeded(&ii), oom];
    let (_, (pod, status, events)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(pods).await;
        let pod = api.create_pod().await;
        let status = api.apply_status(&obj).await;
        let events = api
            .events(&["OOMKilled", "DowngradeAfterOOMKill", "BuildStarted"])
            .await;
        api.done().await;
        (pod, status, events)
    })
    .await;
    assert_eq!(pod.metadata.name.as_deref(), Some("cats-build-2"));
    assert_eq!(label(&pod, labels::ATTEMPT), "2");
    assert_eq!(label(&pod, labels::PRESET), next.label());
    assert_ne!(next.label(), "full");
    let first = &status.unit.attempts[0];
    assert_eq!(first.outcome, Some(AttemptOutcome::OomKilled));
    assert_eq!(first.exit_code, Some(137));
    assert!(first.end_time.is_some());
    assert_eq!(status.unit.attempts[1].number, 2);
    assert_eq!(status.unit.attempts[1].preset, next.label());
    assert_eq!(status.unit.attempts[1].outcome, None);
    assert_eq!(status.unit.preset.as_deref(), Some(next.label().as_str()));
    assert_eq!(status.unit.phase, Some(IndexPhase::Building));
    assert_eq!(condition(&status, DEGRADED).1, "DowngradeAfterOOMKill");
    assert_eq!(events[0].0, "Warning");
    assert!(
        events[0]
            .1
            .contains("attempt 1 with preset full under 512Mi"),
        "{}",
        events[0].1
    );
}

/// A build pod's `/metrics` served on a loopback port: returns the port.
async fn serve_metrics(text: String) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(text.clone())),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

fn metrics_text(working_set: u64, limit: u64) -> String {
    format!(
        "imageindex_memory_rss_bytes {rss}\nimageindex_memory_peak_rss_bytes {rss}\nimageindex_memory_working_set_bytes {working_set}\n\
         imageindex_memory_limit_bytes {limit}\nimageindex_images_total 4000\nimageindex_images_processed_total 1500\n\
         imageindex_descriptors_total 600000\nimageindex_build_phase{{phase=\"extract\"}} 1\n",
        rss = working_set - (1 << 20)
    )
}

#[tokio::test]
async fn critical_pressure_stops_the_build_and_the_next_attempt_starts_poorer() {
    let limit: u64 = 512 << 20;
    let port = serve_metrics(metrics_text(limit / 100 * 95, limit)).await;
    let settings = Settings {
        build_metrics_port: port,
        ..Settings::default()
    };
    let history = history_started_before(Duration::from_secs(60));
    // Two earlier scrapes, 12 s and 6 s ago, already above 90%.
    let key = crate::history::BuildKey {
        uid: UID.into(),
        attempt: 1,
    };
    let now = std::time::Instant::now();
    history.record(&key, now - Duration::from_secs(12), limit / 100 * 93, limit);
    history.record(&key, now - Duration::from_secs(6), limit / 100 * 94, limit);
    let (ctx, mut api) = Context::test_with(settings.clone(), history);
    let ii = ImageIndex::test().with_status(building(vec![started(1, "small")]));
    let running = build_pod(
        &ii,
        &settings,
        1,
        "small",
        json!({"phase": "Running", "podIP": "127.0.0.1"}),
    );
    let obj = ii.clone();
    let pods = vec![scan_pod_succeeded(&ii), running.clone()];
    let (action, (options, status, events)) = run(ctx.clone(), &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(pods).await;
        let options = api.delete_pod("cats-build-1").await;
        let status = api.apply_status(&obj).await;
        let events = api.events(&["MemoryPressureRestart"]).await;
        api.done().await;
        (options, status, events)
    })
    .await;
    assert_eq!(options["preconditions"]["uid"], "uid-cats-build-1");
    assert_eq!(action, Action::requeue(REQUEUE_SHORT));
    let a = &status.unit.attempts[0];
    assert_eq!(a.outcome, Some(AttemptOutcome::MemoryPressureRestart));
    assert_eq!(a.peak_working_set, Some(limit / 100 * 95));
    let (s, reason, _) = condition(&status, MEMORY_PRESSURE);
    assert_eq!((s, reason), ("True", "CriticalPressure"));
    let memory = status.unit.memory.as_ref().unwrap();
    assert_eq!(
        (memory.working_set, memory.limit),
        (limit / 100 * 95, limit)
    );
    assert_eq!(memory.summary, "487Mi/512Mi");
    let progress = status.unit.progress.as_ref().unwrap();
    assert_eq!(
        (
            progress.processed,
            progress.total,
            progress.build_phase.as_deref()
        ),
        (1500, 4000, Some("extract"))
    );
    assert_eq!(events[0].0, "Warning");
    assert!(
        ctx.history.is_empty(),
        "the ended attempt's samples are dropped"
    );

    // Next reconcile: the pod is gone, the next attempt starts with a poorer preset.
    let (ctx2, mut api2) =
        Context::test_with(settings.clone(), crate::history::MemoryHistory::default());
    let ii2 = ii.clone().with_status(status);
    let obj = ii2.clone();
    let scan = scan_pod_succeeded(&ii2);
    let (_, (pod, status)) = run(ctx2, &ii2, async move {
        api2.get_imageindex(&obj).await;
        api2.list_pods(vec![scan]).await;
        let pod = api2.create_pod().await;
        let status = api2.apply_status(&obj).await;
        api2.events(&["DowngradeAfterPressure", "BuildStarted"])
            .await;
        api2.done().await;
        (pod, status)
    })
    .await;
    assert_eq!(pod.metadata.name.as_deref(), Some("cats-build-2"));
    assert_eq!(label(&pod, labels::PRESET), "medium");
    assert_eq!(status.unit.attempts.len(), 2);
    assert_eq!(condition(&status, MEMORY_PRESSURE).1, "NoSamples");
    assert_eq!(status.unit.memory, None);
}

#[tokio::test]
async fn successful_build_is_served_and_ready() {
    let (ctx, mut api) = Context::test();
    let ii = ImageIndex::test().with_status(building(vec![started(1, "small")]));
    let done = build_pod(
        &ii,
        &Settings::default(),
        1,
        "small",
        build_ended("Succeeded", terminated(0, "Completed", ""), Value::Null),
    );
    let obj = ii.clone();
    let pods = vec![scan_pod_succeeded(&ii), done];
    let (_, (deployment, service, status, events)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(pods).await;
        let call = api
            .expect(
                Method::PATCH,
                "/apis/apps/v1/namespaces/testns/deployments/cats-query",
            )
            .await;
        assert_apply(&call);
        let deployment = call.body.clone();
        let mut answer = deployment.clone();
        answer["status"] = json!({"replicas": 1, "availableReplicas": 1});
        call.respond(answer);
        let call = api
            .expect(
                Method::PATCH,
                "/api/v1/namespaces/testns/services/cats-query",
            )
            .await;
        assert_apply(&call);
        let service = call.body.clone();
        call.echo();
        let status = api.apply_status(&obj).await;
        let events = api.events(&["BuildSucceeded", "Ready"]).await;
        api.done().await;
        (deployment, service, status, events)
    })
    .await;
    let component = labels::COMPONENT;
    assert_eq!(deployment["kind"], "Deployment");
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"][component],
        "query"
    );
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"][component],
        "query"
    );
    assert_eq!(deployment["metadata"]["ownerReferences"][0]["uid"], UID);
    assert_eq!(deployment["spec"]["replicas"], 1);
    let port = &service["spec"]["ports"][0];
    assert_eq!(
        (&port["name"], &port["port"], &port["protocol"]),
        (&json!("http"), &json!(8080), &json!("TCP"))
    );
    assert_eq!(service["spec"]["selector"][component], "query");

    assert_eq!(status.unit.phase, Some(IndexPhase::Ready));
    assert_eq!(
        status.endpoint.as_deref(),
        Some("http://cats-query.testns.svc:8080")
    );
    assert_eq!(status.unit.index_generation, Some(1));
    assert_eq!(
        status.unit.attempts[0].outcome,
        Some(AttemptOutcome::Succeeded)
    );
    assert_eq!(status.unit.attempts[0].exit_code, Some(0));
    assert_eq!(condition(&status, READY).0, "True");
    assert_eq!(condition(&status, PROGRESSING).0, "False");
    assert_eq!(condition(&status, DEGRADED).0, "False");
    assert!(events[1].1.contains("http://cats-query.testns.svc:8080"));
}

#[tokio::test]
async fn restarted_operator_adopts_the_pod_it_made_before_the_crash() {
    // Attempt 1 was OOM-killed and recorded, pod 2 was created, then the operator died before
    // writing attempt 2 into status.
    let (ctx, mut api) = Context::test();
    let mut first = started(1, "full");
    imageindex_crds::attempts::finish(
        &mut first,
        AttemptOutcome::OomKilled,
        Some(137),
        "oom".into(),
        at(20),
    );
    let ii = ImageIndex::test().with_status(building(vec![first]));
    let existing = build_pod(
        &ii,
        &Settings::default(),
        2,
        "small",
        json!({"phase": "Pending"}),
    );
    let obj = ii.clone();
    let pods = vec![scan_pod_succeeded(&ii), existing];
    let (_, status) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(pods).await;
        // No POST: the existing pod is adopted.
        let status = api.apply_status(&obj).await;
        api.events(&["DowngradeAfterOOMKill", "BuildStarted"]).await;
        api.done().await;
        status
    })
    .await;
    assert_eq!(status.unit.attempts.len(), 2);
    assert_eq!(status.unit.attempts[1].pod.as_deref(), Some("cats-build-2"));
    assert_eq!(
        status.unit.attempts[1].preset, "small",
        "the adopted pod's preset label wins"
    );
    assert_eq!(
        status.unit.attempts[1].start_time,
        Some(at(0)),
        "start is the pod's creation"
    );
    assert!(condition(&status, PROGRESSING).2.contains("(adopted)"));
}

#[tokio::test]
async fn a_second_pod_is_never_started_while_one_still_runs() {
    let (ctx, mut api) = Context::test();
    let mut first = started(1, "full");
    imageindex_crds::attempts::finish(
        &mut first,
        AttemptOutcome::MemoryPressureRestart,
        None,
        "stopped".into(),
        at(20),
    );
    let ii = ImageIndex::test().with_status(building(vec![first]));
    let mut stopping = build_pod(
        &ii,
        &Settings::default(),
        1,
        "full",
        json!({"phase": "Running", "podIP": "10.0.0.3"}),
    );
    stopping.metadata.deletion_timestamp = Some(at(21));
    let obj = ii.clone();
    let (action, status) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(vec![stopping]).await;
        let status = api.apply_status(&obj).await;
        api.done().await;
        status
    })
    .await;
    assert_eq!(action, Action::requeue(REQUEUE_SHORT));
    assert_eq!(status.unit.attempts.len(), 1);
    assert_eq!(condition(&status, PROGRESSING).1, "WaitingForPreviousPod");
}

#[tokio::test]
async fn nothing_fits_fails_without_a_build_pod() {
    let (ctx, mut api) = Context::test();
    let ii = ImageIndex::test_with_spec(
        "dataset: {claimName: photos, path: /catalogue}\nmemoryLimit: 20Mi\n",
    )
    .with_status(scanning());
    let obj = ii.clone();
    let scan = scan_pod_succeeded(&ii);
    let (_, (status, events)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(vec![scan]).await;
        let status = api.apply_status(&obj).await;
        let events = api.events(&["ScanComplete", "NothingFits"]).await;
        api.done().await;
        (status, events)
    })
    .await;
    assert_eq!(status.unit.phase, Some(IndexPhase::Failed));
    let (s, reason, message) = condition(&status, DEGRADED);
    assert_eq!((s, reason), ("True", "NothingFits"));
    assert!(
        message.contains("20Mi") && message.contains("smallest limit that would fit"),
        "{message}"
    );
    assert_eq!(condition(&status, PRESET_FITS).0, "False");
    assert!(status.unit.attempts.is_empty());
    assert_eq!(events[1].0, "Warning");
}

#[tokio::test]
async fn rebuild_clears_the_old_pods_and_scans_again_while_ready() {
    let mut done = started(1, "small");
    imageindex_crds::attempts::finish(
        &mut done,
        AttemptOutcome::Succeeded,
        Some(0),
        "ok".into(),
        at(30),
    );
    let mut ready = building(vec![done]);
    ready.unit.phase = Some(IndexPhase::Ready);
    ready.unit.index_generation = Some(1);
    ready.endpoint = Some("http://cats-query.testns.svc:8080".into());
    ready.conditions.clear();
    conditions::set(
        &mut ready.conditions,
        READY,
        true,
        "IndexServed",
        "gen 1",
        Some(1),
        &at(30),
    );
    let mut ii = ImageIndex::test_with_spec(
        "dataset: {claimName: photos, path: /catalogue}\nmemoryLimit: 512Mi\nrebuild: r2\n",
    )
    .with_status(ready);
    ii.metadata.generation = Some(2);
    let old_build = build_pod(
        &ii,
        &Settings::default(),
        1,
        "small",
        build_ended("Succeeded", terminated(0, "Completed", ""), Value::Null),
    );
    let pods = vec![scan_pod_succeeded(&ii), old_build];

    // First reconcile: delete the earlier build's pods, phase Pending.
    let (ctx, mut api) = Context::test();
    let obj = ii.clone();
    let (action, status) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(pods).await;
        api.delete_pod("cats-scan-1").await;
        api.delete_pod("cats-build-1").await;
        let status = api.apply_status(&obj).await;
        api.done().await;
        status
    })
    .await;
    assert_eq!(action, Action::requeue(REQUEUE_SHORT));
    assert_eq!(status.unit.phase, Some(IndexPhase::Pending));
    assert_eq!(status.rebuild.as_deref(), Some("r2"));
    assert_eq!(
        condition(&status, READY).0,
        "True",
        "the old index keeps serving"
    );
    assert_eq!(condition(&status, PROGRESSING).0, "True");

    // Second reconcile: the pods are gone; scan pod 2 (numbering continues).
    let (ctx, mut api) = Context::test();
    let ii = ii.with_status(status);
    let obj = ii.clone();
    let (_, (pod, status)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(vec![]).await;
        api.expect(Method::GET, "/api/v1/namespaces/testns/persistentvolumeclaims/cats-index")
            .await
            .respond(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "cats-index"}}));
        let pod = api.create_pod().await;
        let status = api.apply_status(&obj).await;
        api.events(&["ScanStarted"]).await;
        api.done().await;
        (pod, status)
    })
    .await;
    assert_eq!(pod.metadata.name.as_deref(), Some("cats-scan-2"));
    assert_eq!(label(&pod, labels::REBUILD), "r2");
    assert_eq!(status.unit.phase, Some(IndexPhase::Scanning));
    assert_eq!(
        status.endpoint.as_deref(),
        Some("http://cats-query.testns.svc:8080")
    );
    assert_eq!(condition(&status, READY).0, "True");
}
