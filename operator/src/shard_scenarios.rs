//! Reconcile scenarios of a sharded ImageIndex (`spec.shards: 3`) against a mocked API server:
//! one build pod per shard, a shard restarted alone, the shard query objects and the router,
//! and `Degraded` while a shard does not serve.

use crate::controller::{reconcile, Context, REQUEUE_SHORT};
use crate::fixtures::*;
use crate::settings::Settings;
use http::Method;
use imageindex_crds::aggregate;
use imageindex_crds::conditions::{self, DEGRADED, PROGRESSING, READY};
use imageindex_crds::labels;
use imageindex_crds::types::{Attempt, AttemptOutcome, IndexPhase, ShardStatus, UnitStatus};
use imageindex_crds::{ImageIndex, ImageIndexStatus, Preset};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::controller::Action;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::Arc;

const SHARDED: &str =
    "dataset: {claimName: photos, path: /catalogue}\nmemoryLimit: 512Mi\nshards: 3\n";

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

fn started(shard: u32, n: u32, preset: &str) -> Attempt {
    imageindex_crds::attempts::started(n, preset, &format!("cats-s{shard}-build-{n}"), at(10))
}

/// A sharded status in `phase` with each shard's attempts; the whole is their aggregate.
fn sharded(phase: IndexPhase, shards: Vec<Vec<Attempt>>) -> ImageIndexStatus {
    let shards: Vec<ShardStatus> = (0u32..)
        .zip(shards)
        .map(|(shard, attempts)| ShardStatus {
            shard,
            unit: UnitStatus {
                phase: Some(phase),
                preset: attempts.last().map(|a| a.preset.clone()),
                index_generation: attempts
                    .iter()
                    .any(|a| a.outcome == Some(AttemptOutcome::Succeeded))
                    .then_some(1),
                attempts,
                ..UnitStatus::default()
            },
        })
        .collect();
    let units: Vec<UnitStatus> = shards.iter().map(|s| s.unit.clone()).collect();
    ImageIndexStatus {
        observed_generation: Some(1),
        scan: Some(summary(1)),
        unit: aggregate::whole(&units),
        shards,
        ..ImageIndexStatus::default()
    }
}

fn shard_pod(ii: &ImageIndex, shard: u32, n: u32, preset: &str, status: Value) -> Pod {
    let preset = Preset::from_label(preset).unwrap();
    with_pod_status(
        with_instance(ii, &Settings::default(), |i| {
            i.build_pod_of(Some((shard, 3)), n, &preset)
        }),
        status,
    )
}

fn shard_service(shard: u32, ip: &str) -> Service {
    serde_json::from_value(json!({"metadata": {"name": format!("cats-shard-{shard}")},
        "spec": {"clusterIP": ip}}))
    .unwrap()
}

/// GET the shard's claim (it exists) and POST its build pod; returns the pod.
async fn claim_and_pod(api: &mut ApiServerVerifier, shard: u32) -> Pod {
    let call = api
        .expect(
            Method::GET,
            &format!("/api/v1/namespaces/testns/persistentvolumeclaims/cats-index-{shard}"),
        )
        .await;
    call.respond(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": format!("cats-index-{shard}")}}));
    api.create_pod().await
}

/// PATCH a Deployment and its Service by server-side apply, the Deployment answering with
/// `available` replicas; returns both bodies.
async fn apply_served(api: &mut ApiServerVerifier, name: &str, available: i32) -> (Value, Value) {
    let call = api
        .expect(
            Method::PATCH,
            &format!("/apis/apps/v1/namespaces/testns/deployments/{name}"),
        )
        .await;
    assert_apply(&call);
    let deployment = call.body.clone();
    let mut answer = deployment.clone();
    answer["status"] = json!({"replicas": 1, "availableReplicas": available});
    call.respond(answer);
    let call = api
        .expect(
            Method::PATCH,
            &format!("/api/v1/namespaces/testns/services/{name}"),
        )
        .await;
    assert_apply(&call);
    let service = call.body.clone();
    call.echo();
    (deployment, service)
}

#[tokio::test]
async fn finished_scan_starts_one_build_pod_per_shard() {
    let (ctx, mut api) = Context::test();
    let ii = ImageIndex::test_with_spec(SHARDED).with_status(scanning());
    let obj = ii.clone();
    let scan = scan_pod_succeeded(&ii);
    let (action, (pods, status, events)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(vec![scan]).await;
        let mut pods = Vec::new();
        for shard in 0..3 {
            pods.push(claim_and_pod(&mut api, shard).await);
        }
        let status = api.apply_status(&obj).await;
        let events = api
            .events(&[
                "ScanComplete",
                "PresetChosen",
                "PresetChosen",
                "PresetChosen",
                "BuildStarted",
                "BuildStarted",
                "BuildStarted",
            ])
            .await;
        api.done().await;
        (pods, status, events)
    })
    .await;
    for (shard, pod) in (0u32..).zip(&pods) {
        assert_eq!(
            pod.metadata.name.as_deref(),
            Some(format!("cats-s{shard}-build-1").as_str())
        );
        assert_eq!(label(pod, labels::SHARD), shard.to_string());
        assert_eq!(label(pod, labels::COMPONENT), "build");
        assert_eq!(label(pod, labels::ATTEMPT), "1");
        assert!(
            args(pod).ends_with(&format!("--shard {shard}/3")),
            "{}",
            args(pod)
        );
        let vols = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
        assert_eq!(
            vols[1].persistent_volume_claim.as_ref().unwrap().claim_name,
            format!("cats-index-{shard}")
        );
    }
    assert_eq!(status.unit.phase, Some(IndexPhase::Building));
    assert_eq!(status.shards.len(), 3);
    assert_eq!(status.shards_ready.as_deref(), Some("0/3"));
    for (shard, s) in (0u32..).zip(&status.shards) {
        assert_eq!(s.shard, shard);
        assert_eq!(s.unit.phase, Some(IndexPhase::Building));
        assert_eq!(s.unit.attempts.len(), 1);
        assert_eq!(
            s.unit.attempts[0].pod.as_deref(),
            Some(format!("cats-s{shard}-build-1").as_str())
        );
    }
    assert!(status.unit.attempts.is_empty(), "attempts stay with shards");
    assert!(events[1].1.starts_with("shard 0: "), "{}", events[1].1);
    assert!(events[6].1.starts_with("shard 2: "), "{}", events[6].1);
    assert_eq!(action, Action::requeue(Settings::default().scrape_interval));
}

#[tokio::test]
async fn builds_beyond_max_parallel_builds_wait_for_a_slot() {
    let (ctx, mut api) = Context::test();
    let spec = format!("{SHARDED}maxParallelBuilds: 2\n");
    let ii = ImageIndex::test_with_spec(&spec).with_status(scanning());
    let obj = ii.clone();
    let scan = scan_pod_succeeded(&ii);
    let (_, status) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(vec![scan]).await;
        claim_and_pod(&mut api, 0).await;
        claim_and_pod(&mut api, 1).await;
        let status = api.apply_status(&obj).await;
        api.events(&[
            "ScanComplete",
            "PresetChosen",
            "PresetChosen",
            "BuildStarted",
            "BuildStarted",
        ])
        .await;
        api.done().await;
        status
    })
    .await;
    assert_eq!(status.shards[2].unit.attempts.len(), 0);
    assert_eq!(status.shards[2].unit.phase, Some(IndexPhase::Building));
}

#[tokio::test]
async fn an_oom_killed_shard_restarts_alone_with_a_poorer_preset() {
    let (ctx, mut api) = Context::test();
    let ii = ImageIndex::test_with_spec(SHARDED).with_status(sharded(
        IndexPhase::Building,
        vec![
            vec![started(0, 1, "full")],
            vec![started(1, 1, "full")],
            vec![started(2, 1, "full")],
        ],
    ));
    let pending = json!({"phase": "Pending"});
    let oom = build_ended("Failed", terminated(137, "OOMKilled", ""), Value::Null);
    let pods = vec![
        scan_pod_succeeded(&ii),
        shard_pod(&ii, 0, 1, "full", pending.clone()),
        shard_pod(&ii, 1, 1, "full", oom),
        shard_pod(&ii, 2, 1, "full", pending),
    ];
    let obj = ii.clone();
    let (_, (pod, status, events)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(pods).await;
        api.list_shard_services(vec![]).await;
        let pod = claim_and_pod(&mut api, 1).await;
        let status = api.apply_status(&obj).await;
        let events = api
            .events(&["OOMKilled", "DowngradeAfterOOMKill", "BuildStarted"])
            .await;
        api.done().await;
        (pod, status, events)
    })
    .await;
    assert_eq!(pod.metadata.name.as_deref(), Some("cats-s1-build-2"));
    assert_eq!(label(&pod, labels::SHARD), "1");
    assert_eq!(label(&pod, labels::ATTEMPT), "2");
    assert_ne!(label(&pod, labels::PRESET), "full");
    assert!(args(&pod).ends_with("--shard 1/3"));
    let one = &status.shards[1].unit;
    assert_eq!(one.attempts[0].outcome, Some(AttemptOutcome::OomKilled));
    assert_eq!(one.attempts[1].number, 2);
    assert_eq!(
        one.preset.as_deref(),
        Some(label(&pod, labels::PRESET).as_str())
    );
    for other in [0, 2] {
        let u = &status.shards[other].unit;
        assert_eq!(u.attempts.len(), 1, "shard {other} goes on");
        assert_eq!(u.attempts[0].outcome, None);
        assert_eq!(u.preset.as_deref(), Some("full"));
    }
    assert_eq!(
        status.unit.preset, None,
        "the shards now use different presets"
    );
    assert!(
        events.iter().all(|(_, note)| note.starts_with("shard 1: ")),
        "{events:?}"
    );
    assert_eq!(condition(&status, DEGRADED).1, "DowngradeAfterOOMKill");
}

fn succeeded_shards(ii: &ImageIndex) -> Vec<Pod> {
    let done = || build_ended("Succeeded", terminated(0, "Completed", ""), Value::Null);
    vec![
        scan_pod_succeeded(ii),
        shard_pod(ii, 0, 1, "full", done()),
        shard_pod(ii, 1, 1, "full", done()),
        shard_pod(ii, 2, 1, "full", done()),
    ]
}

#[tokio::test]
async fn published_shards_get_their_services_then_the_router() {
    let ii = ImageIndex::test_with_spec(SHARDED).with_status(sharded(
        IndexPhase::Building,
        (0..3).map(|s| vec![started(s, 1, "full")]).collect(),
    ));
    // First reconcile: every shard succeeded; their objects are made, the router waits for
    // the shard Services' ClusterIPs.
    let (ctx, mut api) = Context::test();
    let obj = ii.clone();
    let pods = succeeded_shards(&ii);
    let (action, (shard_objects, status)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(pods).await;
        api.list_shard_services(vec![]).await;
        let mut objects = Vec::new();
        for shard in 0..3 {
            objects.push(apply_served(&mut api, &format!("cats-shard-{shard}"), 1).await);
        }
        let status = api.apply_status(&obj).await;
        api.events(&["BuildSucceeded", "BuildSucceeded", "BuildSucceeded"])
            .await;
        api.done().await;
        (objects, status)
    })
    .await;
    assert_eq!(action, Action::requeue(REQUEUE_SHORT));
    for (shard, (deployment, service)) in (0u32..).zip(&shard_objects) {
        let l = &deployment["spec"]["template"]["metadata"]["labels"];
        assert_eq!(l[labels::COMPONENT], "shard");
        assert_eq!(l[labels::SHARD], shard.to_string());
        assert_eq!(deployment["metadata"]["ownerReferences"][0]["uid"], UID);
        let a = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
        assert_eq!(a, &json!(["serve", "/index", "--addr", "$(POD_IP):8080"]));
        assert_eq!(
            deployment["spec"]["template"]["metadata"]["annotations"]["imagematch.dev/generation"],
            "1"
        );
        assert_eq!(
            service["spec"]["selector"][labels::SHARD],
            shard.to_string()
        );
    }
    assert_eq!(status.unit.index_generation, Some(1));
    assert_eq!(condition(&status, PROGRESSING).1, "WaitingForShardServices");
    assert_eq!(status.unit.phase, Some(IndexPhase::Building));

    // Second reconcile: the Services have ClusterIPs; the router lists them in shard order.
    let ii = ii.with_status(status);
    let (ctx, mut api) = Context::test();
    let obj = ii.clone();
    let pods = succeeded_shards(&ii);
    let (_, (router, front, status, events)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(pods).await;
        api.list_shard_services(vec![
            shard_service(2, "10.96.0.12"),
            shard_service(0, "10.96.0.10"),
            shard_service(1, "10.96.0.11"),
        ])
        .await;
        for shard in 0..3 {
            apply_served(&mut api, &format!("cats-shard-{shard}"), 1).await;
        }
        let (router, front) = apply_served(&mut api, "cats-query", 1).await;
        let status = api.apply_status(&obj).await;
        let events = api.events(&["Ready"]).await;
        api.done().await;
        (router, front, status, events)
    })
    .await;
    assert_eq!(
        router["spec"]["template"]["metadata"]["labels"][labels::COMPONENT],
        "query"
    );
    let a: Vec<&str> = router["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        a.join(" "),
        "route --listen 0.0.0.0:8080 --shard http://10.96.0.10:8080 --shard http://10.96.0.11:8080 --shard http://10.96.0.12:8080 --deadline 2s"
    );
    assert_eq!(
        router["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"],
        "http"
    );
    assert_eq!(front["spec"]["selector"][labels::COMPONENT], "query");
    assert_eq!(status.unit.phase, Some(IndexPhase::Ready));
    assert_eq!(status.shards_ready.as_deref(), Some("3/3"));
    assert_eq!(
        status.endpoint.as_deref(),
        Some("http://cats-query.testns.svc:8080")
    );
    assert_eq!(condition(&status, READY).0, "True");
    assert!(events[0].1.contains("http://cats-query.testns.svc:8080"));
}

#[tokio::test]
async fn a_shard_without_a_ready_replica_degrades_the_index_until_it_is_back() {
    let mut ready = sharded(
        IndexPhase::Ready,
        (0..3)
            .map(|s| {
                let mut a = started(s, 1, "full");
                a.outcome = Some(AttemptOutcome::Succeeded);
                vec![a]
            })
            .collect(),
    );
    ready.shards_ready = Some("3/3".into());
    ready.endpoint = Some("http://cats-query.testns.svc:8080".into());
    conditions::set(
        &mut ready.conditions,
        READY,
        true,
        "IndexServed",
        "index generation 1 is served at http://cats-query.testns.svc:8080",
        Some(1),
        &at(20),
    );
    let services = || {
        vec![
            shard_service(0, "10.96.0.10"),
            shard_service(1, "10.96.0.11"),
            shard_service(2, "10.96.0.12"),
        ]
    };
    let reconcile_with = |ii: ImageIndex, down: Option<u32>, events: &'static [&'static str]| {
        let (ctx, mut api) = Context::test();
        let obj = ii.clone();
        let svcs = services();
        async move {
            let (_, status) = run(ctx, &ii, async move {
                api.get_imageindex(&obj).await;
                api.list_pods(vec![]).await;
                api.list_shard_services(svcs).await;
                for shard in 0..3 {
                    let available = if Some(shard) == down { 0 } else { 1 };
                    apply_served(&mut api, &format!("cats-shard-{shard}"), available).await;
                }
                apply_served(&mut api, "cats-query", 1).await;
                let status = api.apply_status(&obj).await;
                api.events(events).await;
                api.done().await;
                status
            })
            .await;
            status
        }
    };
    let ii = ImageIndex::test_with_spec(SHARDED).with_status(ready);
    let status = reconcile_with(ii.clone(), Some(1), &["ShardUnavailable"]).await;
    let (s, reason, message) = condition(&status, DEGRADED);
    assert_eq!((s, reason), ("True", "ShardUnavailable"));
    assert!(message.contains("shard 1"), "{message}");
    assert_eq!(
        condition(&status, READY).0,
        "True",
        "the router still answers"
    );
    let status = reconcile_with(ii.with_status(status), None, &["AllShardsServing"]).await;
    assert_eq!(
        (
            condition(&status, DEGRADED).0,
            condition(&status, DEGRADED).1
        ),
        ("False", "AllShardsServing")
    );
}

#[tokio::test]
async fn a_rebuild_rolls_the_shards_only_once_every_shard_published() {
    // Generation 1 is served; the rebuild's attempts are numbered from 2. Shards 0 and 1 have
    // published generation 2, shard 2 still builds: nothing is applied to the serving objects.
    let done = |s: u32, n: u32| {
        let mut a = started(s, n, "full");
        a.outcome = Some(AttemptOutcome::Succeeded);
        a
    };
    let mut status = sharded(
        IndexPhase::Building,
        vec![
            vec![done(0, 1), done(0, 2)],
            vec![done(1, 1), done(1, 2)],
            vec![done(2, 1), started(2, 2, "full")],
        ],
    );
    status.scan = Some(summary(2));
    for (shard, generation) in [(0, 2), (1, 2), (2, 1)] {
        status.shards[shard].unit.index_generation = Some(generation);
    }
    let units: Vec<UnitStatus> = status.shards.iter().map(|s| s.unit.clone()).collect();
    status.unit = aggregate::whole(&units);
    assert_eq!(
        status.unit.index_generation,
        Some(1),
        "the whole serves generation 1"
    );
    let spec = format!("{SHARDED}rebuild: r2\n");
    let ii = ImageIndex::test_with_spec(&spec).with_status(status);
    let succeeded = || build_ended("Succeeded", terminated(0, "Completed", ""), Value::Null);
    let pods = vec![
        shard_pod(&ii, 0, 2, "full", succeeded()),
        shard_pod(&ii, 1, 2, "full", succeeded()),
        shard_pod(&ii, 2, 2, "full", json!({"phase": "Pending"})),
    ];
    let (ctx, mut api) = Context::test();
    let obj = ii.clone();
    run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(pods).await;
        api.list_shard_services(vec![]).await;
        // No Deployment or Service is touched while shard 2 builds.
        api.done().await;
    })
    .await;

    // Shard 2 publishes too: every shard Deployment is rolled to generation 2 at once.
    let mut status = ii.status.clone().unwrap();
    let mut last = started(2, 2, "full");
    last.outcome = Some(AttemptOutcome::Succeeded);
    status.shards[2].unit.attempts[1] = last;
    status.shards[2].unit.index_generation = Some(2);
    let units: Vec<UnitStatus> = status.shards.iter().map(|s| s.unit.clone()).collect();
    status.unit = aggregate::whole(&units);
    let ii = ii.with_status(status);
    let pods = vec![
        shard_pod(&ii, 0, 2, "full", succeeded()),
        shard_pod(&ii, 1, 2, "full", succeeded()),
        shard_pod(&ii, 2, 2, "full", succeeded()),
    ];
    let (ctx, mut api) = Context::test();
    let obj = ii.clone();
    let (_, generations) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(pods).await;
        api.list_shard_services(vec![
            shard_service(0, "10.96.0.10"),
            shard_service(1, "10.96.0.11"),
            shard_service(2, "10.96.0.12"),
        ])
        .await;
        let mut generations = Vec::new();
        for shard in 0..3 {
            let (d, _) = apply_served(&mut api, &format!("cats-shard-{shard}"), 1).await;
            generations.push(
                d["spec"]["template"]["metadata"]["annotations"]["imagematch.dev/generation"]
                    .clone(),
            );
        }
        apply_served(&mut api, "cats-query", 1).await;
        api.apply_status(&obj).await;
        api.events(&["Ready"]).await;
        api.done().await;
        generations
    })
    .await;
    assert_eq!(generations, [json!("2"), json!("2"), json!("2")]);
}

#[tokio::test]
async fn a_rebuild_of_a_sharded_index_scans_again_numbered_after_every_shard() {
    let succeeded = |s: u32, n: u32| {
        let mut a = started(s, n, "full");
        a.outcome = Some(AttemptOutcome::Succeeded);
        a
    };
    let mut status = sharded(
        IndexPhase::Ready,
        vec![
            vec![succeeded(0, 1)],
            vec![started(1, 1, "full"), succeeded(1, 2)],
            vec![succeeded(2, 1)],
        ],
    );
    status.shards[1].unit.attempts[0].outcome = Some(AttemptOutcome::OomKilled);
    let spec = format!("{SHARDED}rebuild: r2\n");
    let ii = ImageIndex::test_with_spec(&spec).with_status(status);
    let (ctx, mut api) = Context::test();
    let obj = ii.clone();
    let (_, (pod, status)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(vec![]).await;
        api.list_shard_services(vec![]).await;
        // No `cats-index` claim: a sharded index's claims are made per shard.
        let pod = api.create_pod().await;
        let status = api.apply_status(&obj).await;
        api.events(&["ScanStarted"]).await;
        api.done().await;
        (pod, status)
    })
    .await;
    assert_eq!(pod.metadata.name.as_deref(), Some("cats-scan-3"));
    assert_eq!(status.unit.phase, Some(IndexPhase::Scanning));
    assert!(status
        .shards
        .iter()
        .all(|s| s.unit.phase == Some(IndexPhase::Scanning)));
    assert_eq!(
        status.unit.index_generation,
        Some(1),
        "generation 1 still serves"
    );
    assert_eq!(status.rebuild.as_deref(), Some("r2"));
}

#[tokio::test]
async fn a_shard_that_gives_up_stops_the_other_shards_and_fails_the_build() {
    let spec = format!("{SHARDED}maxAttempts: 1\n");
    let ii = ImageIndex::test_with_spec(&spec).with_status(sharded(
        IndexPhase::Building,
        (0..3).map(|s| vec![started(s, 1, "full")]).collect(),
    ));
    let pending = json!({"phase": "Pending"});
    let oom = build_ended("Failed", terminated(137, "OOMKilled", ""), Value::Null);
    let pods = vec![
        shard_pod(&ii, 0, 1, "full", pending.clone()),
        shard_pod(&ii, 1, 1, "full", oom),
        shard_pod(&ii, 2, 1, "full", pending),
    ];
    let (ctx, mut api) = Context::test();
    let obj = ii.clone();
    let (_, (status, events)) = run(ctx, &ii, async move {
        api.get_imageindex(&obj).await;
        api.list_pods(pods).await;
        api.list_shard_services(vec![]).await;
        api.delete_pod("cats-s0-build-1").await;
        api.delete_pod("cats-s2-build-1").await;
        let status = api.apply_status(&obj).await;
        let events = api
            .events(&["OOMKilled", "MaxAttemptsReached", "ShardFailed"])
            .await;
        api.done().await;
        (status, events)
    })
    .await;
    assert_eq!(status.unit.phase, Some(IndexPhase::Failed));
    assert!(status
        .shards
        .iter()
        .all(|s| s.unit.phase == Some(IndexPhase::Failed)));
    let (s, reason, message) = condition(&status, DEGRADED);
    assert_eq!((s, reason), ("True", "ShardFailed"));
    assert!(message.starts_with("shard 1 gave up"), "{message}");
    assert!(events[1].1.starts_with("shard 1: "), "{}", events[1].1);
    assert_eq!(condition(&status, READY).0, "False");
}
