//! Test-only helpers: ImageIndex and pod fixtures, and an `ApiServerVerifier` that plays the
//! API server over a tower-test mock. Each scenario awaits the requests one reconcile makes,
//! in order, asserts method + path + the JSON fields that matter, and answers what the API
//! server would.

use crate::controller::Context;
use crate::history::MemoryHistory;
use crate::metrics::Metrics;
use crate::resources::Instance;
use crate::scrape;
use crate::settings::Settings;
use http::{Method, Request, Response, StatusCode};
use imageindex_crds::types::{Attempt, IndexPhase, ScanSummary, UnitStatus};
use imageindex_crds::validate::{validate, Mode};
use imageindex_crds::{
    DatasetShape, ImageIndex, ImageIndexSpec, ImageIndexStatus, Preset, ScanReport,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::{Client, Resource, ResourceExt};
use prometheus::Registry;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower_test::mock::{self, Handle, SendResponse};

/// Namespace of the fixtures.
pub const NS: &str = "testns";
/// Name of the fixture ImageIndex.
pub const NAME: &str = "cats";
/// Its uid.
pub const UID: &str = "uid-cats";

/// Fixture constructors of ImageIndex (a trait: the type lives in the crds crate).
pub trait ImageIndexFixture: Sized {
    /// A valid ImageIndex with no status.
    fn test() -> Self;
    /// An ImageIndex with the spec given as YAML.
    fn test_with_spec(yaml: &str) -> Self;
    /// With a status.
    fn with_status(self, status: ImageIndexStatus) -> Self;
}

impl ImageIndexFixture for ImageIndex {
    fn test() -> Self {
        Self::test_with_spec("dataset: {claimName: photos, path: /catalogue}\nmemoryLimit: 512Mi\n")
    }

    fn test_with_spec(yaml: &str) -> Self {
        let spec: ImageIndexSpec = serde_yaml::from_str(yaml).unwrap();
        let mut ii = ImageIndex::new(NAME, spec);
        ii.meta_mut().namespace = Some(NS.into());
        ii.meta_mut().uid = Some(UID.into());
        ii.meta_mut().generation = Some(1);
        ii.meta_mut().resource_version = Some("1".into());
        ii
    }

    fn with_status(mut self, status: ImageIndexStatus) -> Self {
        self.status = Some(status);
        self
    }
}

/// A time for fixtures.
pub fn at(secs: i64) -> Time {
    Time(Timestamp::from_second(1_700_000_000 + secs).unwrap())
}

/// The dataset the fixture scan finds: 4000 photos of up to 4000x3000.
pub fn shape() -> DatasetShape {
    DatasetShape {
        images: 4000,
        bytes: 2_000_000_000,
        max_width: 4000,
        max_height: 3000,
        max_is_jpeg: true,
    }
}

/// The scan report of [`shape`].
pub fn report() -> ScanReport {
    ScanReport::new(shape(), 3, 4000, "f1n9er".into(), Some(512 << 20), 1)
}

/// The scan summary status keeps for [`report`], for the build starting at `first`.
pub fn summary(first: u32) -> ScanSummary {
    ScanSummary {
        pod: Some(format!("{NAME}-scan-{first}")),
        first_attempt: Some(first),
        ..ScanSummary::from_report(&report())
    }
}

/// Status while the scan pod of the first build runs.
pub fn scanning() -> ImageIndexStatus {
    ImageIndexStatus {
        observed_generation: Some(1),
        unit: UnitStatus {
            phase: Some(IndexPhase::Scanning),
            ..UnitStatus::default()
        },
        ..ImageIndexStatus::default()
    }
}

/// Status while attempt `number` runs with `preset`.
pub fn building(attempts: Vec<Attempt>) -> ImageIndexStatus {
    ImageIndexStatus {
        observed_generation: Some(1),
        scan: Some(summary(1)),
        unit: UnitStatus {
            phase: Some(IndexPhase::Building),
            preset: attempts.last().map(|a| a.preset.clone()),
            attempts,
            ..UnitStatus::default()
        },
        ..ImageIndexStatus::default()
    }
}

/// Calls `f` with the builders' view of `ii`.
pub fn with_instance<T>(ii: &ImageIndex, settings: &Settings, f: impl FnOnce(&Instance) -> T) -> T {
    let valid = validate(&ii.spec, Mode::Cluster).unwrap();
    let inst = Instance {
        name: NAME,
        namespace: NS,
        owner: ii.controller_owner_ref(&()).unwrap(),
        spec: &ii.spec,
        valid: &valid,
        settings,
    };
    f(&inst)
}

/// Sets a pod's status from JSON.
pub fn with_pod_status(mut pod: Pod, status: Value) -> Pod {
    pod.status = Some(serde_json::from_value(status).unwrap());
    pod.metadata.uid = Some(format!("uid-{}", pod.name_any()));
    pod.metadata.creation_timestamp = Some(at(0));
    pod
}

/// A container status JSON with a terminated state.
pub fn terminated(exit_code: i32, reason: &str, message: &str) -> Value {
    json!({"terminated": {"exitCode": exit_code, "reason": reason, "message": message,
        "finishedAt": "2023-11-14T22:20:00Z"}})
}

/// The scan pod of attempt 1, finished with the fixture report.
pub fn scan_pod_succeeded(ii: &ImageIndex) -> Pod {
    let pod = with_instance(ii, &Settings::default(), |i| i.scan_pod(1));
    let message = serde_json::to_string(&report()).unwrap();
    with_pod_status(
        pod,
        json!({"phase": "Succeeded", "containerStatuses": [{"name": "scan", "image": "i", "imageID": "",
            "ready": false, "restartCount": 0, "state": terminated(0, "Completed", &message)}]}),
    )
}

/// A build pod of `attempt` with `preset` and status JSON.
pub fn build_pod(
    ii: &ImageIndex,
    settings: &Settings,
    attempt: u32,
    preset: &str,
    status: Value,
) -> Pod {
    let preset = Preset::from_label(preset).unwrap();
    with_pod_status(
        with_instance(ii, settings, |i| i.build_pod(attempt, &preset)),
        status,
    )
}

/// The pod status of a build container that ended.
pub fn build_ended(phase: &str, state: Value, last_state: Value) -> Value {
    json!({"phase": phase, "containerStatuses": [{"name": "build", "image": "i", "imageID": "",
        "ready": false, "restartCount": 0, "state": state, "lastState": last_state}]})
}

/// Decodes `a%3Db+c` as form encoding does.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// One request the reconcile made.
pub struct Call {
    /// HTTP method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
    /// JSON body (`Null` when empty).
    pub body: Value,
    send: SendResponse<Response<Body>>,
}

impl Call {
    /// Answers with a JSON object.
    pub fn respond(self, value: impl Serialize) {
        let body = serde_json::to_vec(&value).unwrap();
        self.send
            .send_response(Response::builder().body(Body::from(body)).unwrap());
    }

    /// Answers with the request's own body (what a create or apply returns, near enough).
    pub fn echo(self) {
        let body = self.body.clone();
        self.respond(body);
    }

    /// Answers with an API error.
    pub fn fail(self, code: StatusCode, reason: &str) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("{reason} (test)"), "reason": reason, "code": code.as_u16()});
        let body = serde_json::to_vec(&status).unwrap();
        self.send.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(body))
                .unwrap(),
        );
    }
}

/// Plays the API server for one reconcile at a time.
pub struct ApiServerVerifier(Handle<Request<Body>, Response<Body>>);

const IMAGEINDEX_PATH: &str = "/apis/imagematch.dev/v1alpha1/namespaces/testns/imageindexes/cats";
const PODS_PATH: &str = "/api/v1/namespaces/testns/pods";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/testns/events";

impl ApiServerVerifier {
    /// The next request (fails the test after 5 s without one).
    pub async fn next(&mut self) -> Call {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .expect("the reconcile made no further request")
            .expect("the client is gone");
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let query = parts
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (decode(k), decode(v))
            })
            .collect();
        Call {
            method: parts.method,
            path: parts.uri.path().to_string(),
            query,
            body,
            send,
        }
    }

    /// The next request, asserted to be `method path`.
    pub async fn expect(&mut self, method: Method, path: &str) -> Call {
        let call = self.next().await;
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&method, path),
            "unexpected request; body {}",
            call.body
        );
        call
    }

    /// Asserts that the reconcile makes no further request.
    pub async fn done(mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(300), self.0.next_request()).await
        {
            panic!(
                "unexpected extra request {} {}",
                request.method(),
                request.uri()
            );
        }
    }

    /// Fetch: GET the ImageIndex.
    pub async fn get_imageindex(&mut self, ii: &ImageIndex) {
        self.expect(Method::GET, IMAGEINDEX_PATH).await.respond(ii);
    }

    /// List the scan and build pods by label.
    pub async fn list_pods(&mut self, pods: Vec<Pod>) {
        let call = self.expect(Method::GET, PODS_PATH).await;
        assert_eq!(
            call.query.get("labelSelector").map(String::as_str),
            Some("app.kubernetes.io/name=imageindex,app.kubernetes.io/instance=cats,app.kubernetes.io/component in (scan,build)")
        );
        call.respond(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "5"}, "items": pods}));
    }

    /// List a sharded index's shard Services by label.
    pub async fn list_shard_services(
        &mut self,
        services: Vec<k8s_openapi::api::core::v1::Service>,
    ) {
        let call = self
            .expect(Method::GET, "/api/v1/namespaces/testns/services")
            .await;
        assert_eq!(
            call.query.get("labelSelector").map(String::as_str),
            Some("app.kubernetes.io/name=imageindex,app.kubernetes.io/instance=cats,app.kubernetes.io/component=shard")
        );
        call.respond(json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {"resourceVersion": "5"}, "items": services}));
    }

    /// POST a pod; returns it.
    pub async fn create_pod(&mut self) -> Pod {
        let call = self.expect(Method::POST, PODS_PATH).await;
        let pod: Pod = serde_json::from_value(call.body.clone()).unwrap();
        call.echo();
        pod
    }

    /// DELETE a pod; returns the delete options.
    pub async fn delete_pod(&mut self, name: &str) -> Value {
        let call = self
            .expect(Method::DELETE, &format!("{PODS_PATH}/{name}"))
            .await;
        let options = call.body.clone();
        call.respond(json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}));
        options
    }

    /// PATCH the status with server-side apply; returns the status applied.
    pub async fn apply_status(&mut self, ii: &ImageIndex) -> ImageIndexStatus {
        let call = self
            .expect(Method::PATCH, &format!("{IMAGEINDEX_PATH}/status"))
            .await;
        assert_apply(&call);
        assert_eq!(call.body["apiVersion"], "imagematch.dev/v1alpha1");
        assert_eq!(call.body["kind"], "ImageIndex");
        let status: ImageIndexStatus = serde_json::from_value(call.body["status"].clone()).unwrap();
        call.respond(ii.clone().with_status(status.clone()));
        status
    }

    /// POST Events with these reasons, in order; returns their (type, note).
    pub async fn events(&mut self, reasons: &[&str]) -> Vec<(String, String)> {
        let mut seen = Vec::new();
        for reason in reasons {
            let call = self.expect(Method::POST, EVENTS_PATH).await;
            assert_eq!(call.body["reason"], *reason, "event {}", call.body);
            assert_eq!(call.body["regarding"]["name"], NAME);
            assert_eq!(call.body["reportingController"], "imageindex-operator");
            seen.push((
                call.body["type"].as_str().unwrap_or_default().to_string(),
                call.body["note"].as_str().unwrap_or_default().to_string(),
            ));
            call.echo();
        }
        seen
    }
}

/// Asserts a server-side apply by the operator's field manager.
pub fn assert_apply(call: &Call) {
    assert_eq!(
        call.query.get("fieldManager").map(String::as_str),
        Some("imageindex-operator")
    );
    assert_eq!(call.query.get("force").map(String::as_str), Some("true"));
}

impl Context {
    /// A context over a mocked API server, with unregistered metrics.
    pub fn test() -> (Arc<Self>, ApiServerVerifier) {
        Self::test_with(Settings::default(), MemoryHistory::default())
    }

    /// The same with settings and a memory history.
    pub fn test_with(settings: Settings, history: MemoryHistory) -> (Arc<Self>, ApiServerVerifier) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let metrics = Metrics::new(&Registry::new()).unwrap();
        let ctx = Context::new(client, settings, metrics);
        let mut ctx = Arc::try_unwrap(ctx).ok().unwrap();
        ctx.history = history;
        ctx.http = scrape::http_client(Duration::from_secs(2));
        (Arc::new(ctx), ApiServerVerifier(handle))
    }
}

/// A history whose clock started long enough ago for back-dated samples.
pub fn history_started_before(ago: Duration) -> MemoryHistory {
    MemoryHistory::since(Instant::now() - ago)
}
