//! The Kubernetes API source against the test kit's fake API server (the real list/watch
//! wire protocol over HTTP): events, relists on 410 Gone, resumed watches, invalid and
//! foreign objects.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use svcplane_model::{Change, Kind, NamespacedName, Object, ObjectKey, SourceEvent};
use svcplane_source::kube::ApiResource;
use svcplane_source::{
    ApiClientOptions, ApiSourceStatus, KubeSource, Problem, ProblemSink, Source, api_client,
};
use svcplane_testkit::FakeApiServer;
use tokio::sync::{mpsc, watch};

const NODE: &str = "node-a";
/// Bounds how long a broken test waits; not a speed assertion.
const PATIENCE: Duration = Duration::from_secs(30);

fn service(name: &str, port: u32, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "demo", "labels": labels},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ipFamilies": ["IPv4"],
                 "ports": [{"port": port, "targetPort": 8080}]},
    })
}

fn slice(name: &str, service: &str, ip: &str, labels: Value) -> Value {
    let mut labels = labels;
    labels["kubernetes.io/service-name"] = json!(service);
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "demo", "labels": labels},
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE}],
    })
}

fn node(name: &str, zone: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    })
}

fn key(kind: Kind, name: &str) -> ObjectKey {
    let ns = if kind == Kind::Node { "" } else { "demo" };
    ObjectKey {
        kind,
        name: NamespacedName::new(ns, name),
    }
}

/// The source running against a server, and what it delivered so far.
struct Harness {
    rx: mpsc::Receiver<SourceEvent>,
    /// The object cache as the engine would hold it.
    state: BTreeMap<ObjectKey, Object>,
    events: Vec<SourceEvent>,
    synced: bool,
    problems: Arc<Mutex<Vec<Problem>>>,
    status: watch::Receiver<ApiSourceStatus>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start(server: &FakeApiServer) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).unwrap();
        let client = api_client(&ApiClientOptions {
            kubeconfig: Some(kubeconfig),
            master: None,
            qps: 0.0,
            burst: 1,
        })
        .await
        .unwrap();
        let source = KubeSource::new(client, NODE);
        let status = source.status();
        let problems = Arc::new(Mutex::new(Vec::new()));
        let sink_problems = problems.clone();
        let sink: ProblemSink = Arc::new(move |p| sink_problems.lock().unwrap().push(p.clone()));
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(async move {
            Box::new(source).run(tx, sink).await.unwrap();
        });
        Harness {
            rx,
            state: BTreeMap::new(),
            events: Vec::new(),
            synced: false,
            problems,
            status,
            _dir: dir,
            task,
        }
    }

    /// Receive until `done` holds on the state; panics after PATIENCE.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&Harness) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !done(self) {
            let event = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "timed out waiting for {what}; state: {:#?}",
                        self.state.keys()
                    )
                })
                .expect("source stopped");
            match &event {
                SourceEvent::Changes(changes) => {
                    for change in changes {
                        match change {
                            Change::Apply(obj) => {
                                self.state.insert(obj.key(), obj.clone());
                            }
                            Change::Delete(key) => {
                                self.state.remove(key);
                            }
                        }
                    }
                }
                SourceEvent::Synced => self.synced = true,
            }
            self.events.push(event);
        }
    }

    async fn synced(&mut self) {
        self.until("Synced", |h| h.synced).await;
    }

    fn service_port(&self, name: &str) -> Option<u16> {
        match self.state.get(&key(Kind::Service, name)) {
            Some(Object::Service(s)) => s.ports.first().map(|p| p.port),
            _ => None,
        }
    }

    fn slice_ip(&self, name: &str) -> Option<String> {
        match self.state.get(&key(Kind::EndpointSlice, name)) {
            Some(Object::EndpointSlice(s)) => {
                s.endpoints.first().map(|e| e.addresses()[0].to_string())
            }
            _ => None,
        }
    }

    fn node_zone(&self) -> Option<String> {
        match self.state.get(&key(Kind::Node, NODE)) {
            Some(Object::Node(n)) => n.zone.clone(),
            _ => None,
        }
    }

    fn problems(&self) -> Vec<String> {
        self.problems
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.to_string())
            .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn follows_added_modified_deleted_for_all_three_kinds() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("web", 80, json!({}))).unwrap();
    server
        .apply(slice("web-1", "web", "10.244.1.5", json!({})))
        .unwrap();
    server.apply(node(NODE, "zone-a", "10.0.0.11")).unwrap();
    server.apply(node("node-b", "zone-b", "10.0.0.12")).unwrap();
    let mut h = Harness::start(&server).await;
    h.synced().await;
    // The complete initial state comes first, then Synced.
    assert!(
        matches!(h.events.as_slice(), [SourceEvent::Changes(c), SourceEvent::Synced] if c.len() == 3),
        "{:#?}",
        h.events
    );
    assert_eq!(h.service_port("web"), Some(80));
    assert_eq!(h.slice_ip("web-1").as_deref(), Some("10.244.1.5"));
    assert_eq!(h.node_zone().as_deref(), Some("zone-a"));
    assert!(
        !h.state.contains_key(&key(Kind::Node, "node-b")),
        "only this node is watched"
    );

    // What was asked: kube-proxy's selectors, the kubeconfig's token.
    let requests = server.requests();
    let svc_list = requests
        .iter()
        .find(|r| r.path == "/api/v1/services" && !r.is_watch())
        .unwrap();
    assert_eq!(
        svc_list.query["labelSelector"],
        "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    );
    assert_eq!(svc_list.authorization.as_deref(), Some("Bearer fake-token"));
    // kube-proxy's informers list from the API server's watch cache (resourceVersion=0):
    // one answer, not one page of 500 per token of the client's rate limit.
    assert_eq!(
        svc_list.query.get("resourceVersion").map(String::as_str),
        Some("0")
    );
    let node_list = requests
        .iter()
        .find(|r| r.path == "/api/v1/nodes" && !r.is_watch())
        .unwrap();
    assert_eq!(node_list.query["fieldSelector"], "metadata.name=node-a");

    // MODIFIED
    server.apply(service("web", 8080, json!({}))).unwrap();
    server
        .apply(slice("web-1", "web", "10.244.1.6", json!({})))
        .unwrap();
    server.apply(node(NODE, "zone-c", "10.0.0.11")).unwrap();
    h.until("modifications", |h| {
        h.service_port("web") == Some(8080)
            && h.slice_ip("web-1").as_deref() == Some("10.244.1.6")
            && h.node_zone().as_deref() == Some("zone-c")
    })
    .await;
    // ADDED after the sync
    server.apply(service("api", 443, json!({}))).unwrap();
    h.until("a new Service", |h| h.service_port("api") == Some(443))
        .await;
    // DELETED
    assert!(server.delete("Service", "demo", "web"));
    assert!(server.delete("EndpointSlice", "demo", "web-1"));
    assert!(server.delete("Node", "", NODE));
    h.until("deletions", |h| {
        h.state.len() == 1 && h.service_port("api") == Some(443)
    })
    .await;
    assert!(h.problems().is_empty(), "{:?}", h.problems());
    assert!(h.status.borrow().healthy());
}

#[tokio::test]
async fn expired_watch_relists_and_drops_what_was_deleted_meanwhile() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("web", 80, json!({}))).unwrap();
    server.apply(service("gone", 81, json!({}))).unwrap();
    server
        .apply(slice("web-1", "web", "10.244.1.5", json!({})))
        .unwrap();
    server.apply(node(NODE, "zone-a", "10.0.0.11")).unwrap();
    let mut h = Harness::start(&server).await;
    h.synced().await;
    assert_eq!(h.state.len(), 4);

    // Unreachable: the watches break and cannot restart; nothing is deleted meanwhile.
    server.set_available(false);
    let mut status = h.status.clone();
    tokio::time::timeout(
        PATIENCE,
        status.wait_for(|s| s.get(ApiResource::Services).errors > 0),
    )
    .await
    .expect("watch errors are reported")
    .unwrap();
    assert!(!h.status.borrow().healthy());
    assert_eq!(h.state.len(), 4, "the last known state is kept");

    // While it is away: one Service deleted, the slice changed, history compacted.
    assert!(server.delete("Service", "demo", "gone"));
    server
        .apply(slice("web-1", "web", "10.244.1.9", json!({})))
        .unwrap();
    server.expire();
    server.set_available(true);
    h.until("the relisted state", |h| {
        !h.state.contains_key(&key(Kind::Service, "gone"))
            && h.slice_ip("web-1").as_deref() == Some("10.244.1.9")
    })
    .await;
    assert_eq!(h.service_port("web"), Some(80));
    let st = h.status.borrow().clone();
    assert!(st.get(ApiResource::Services).lists >= 2, "{st:?}");
    assert!(st.get(ApiResource::EndpointSlices).lists >= 2, "{st:?}");
    // The resumed watch got 410 Gone and the watcher listed again.
    let service_lists = server
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/services" && !r.is_watch())
        .count();
    assert!(service_lists >= 2, "services listed again");
}

#[tokio::test]
async fn gone_on_an_open_watch_relists() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("web", 80, json!({}))).unwrap();
    server.apply(node(NODE, "zone-a", "10.0.0.11")).unwrap();
    let mut h = Harness::start(&server).await;
    h.synced().await;
    let mut status = h.status.clone();
    tokio::time::timeout(PATIENCE, async {
        while server.open_watches() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("three watches open");
    server.expire();
    tokio::time::timeout(
        PATIENCE,
        status.wait_for(|s| s.get(ApiResource::Services).lists >= 2),
    )
    .await
    .expect("relisted after 410")
    .unwrap();
    server.apply(service("web", 90, json!({}))).unwrap();
    h.until("a change after the relist", |h| {
        h.service_port("web") == Some(90)
    })
    .await;
}

#[tokio::test]
async fn dropped_connection_is_resumed_without_relist() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("web", 80, json!({}))).unwrap();
    server.apply(node(NODE, "zone-a", "10.0.0.11")).unwrap();
    let mut h = Harness::start(&server).await;
    h.synced().await;
    tokio::time::timeout(PATIENCE, async {
        while server.open_watches() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("three watches open");
    let rv_before = server.resource_version();
    server.drop_watches();
    server.apply(service("api", 443, json!({}))).unwrap();
    h.until("the change made while cut", |h| {
        h.service_port("api") == Some(443)
    })
    .await;
    let requests = server.requests();
    let lists = requests
        .iter()
        .filter(|r| r.path == "/api/v1/services" && !r.is_watch())
        .count();
    assert_eq!(lists, 1, "resumed, not relisted");
    let resumed = requests
        .iter()
        .filter(|r| r.path == "/api/v1/services" && r.is_watch())
        .filter_map(|r| r.query.get("resourceVersion")?.parse::<u64>().ok())
        .max()
        .unwrap();
    assert!(resumed <= rv_before, "resumed from where it was");
    assert_eq!(h.status.borrow().get(ApiResource::Services).lists, 1);
}

#[tokio::test]
async fn invalid_objects_are_reported_and_skipped() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("web", 80, json!({}))).unwrap();
    server.apply(service("broken", 70000, json!({}))).unwrap();
    server.apply(node(NODE, "zone-a", "10.0.0.11")).unwrap();
    let mut h = Harness::start(&server).await;
    h.synced().await;
    assert_eq!(h.service_port("web"), Some(80));
    assert!(!h.state.contains_key(&key(Kind::Service, "broken")));
    let problems = h.problems();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("demo/broken") && p.contains("70000") && p.ends_with("skipped")),
        "{problems:?}"
    );
    // A valid object turning invalid keeps its previous version; others still flow.
    server.apply(service("web", 0, json!({}))).unwrap();
    server.apply(service("api", 443, json!({}))).unwrap();
    h.until("the valid change", |h| h.service_port("api") == Some(443))
        .await;
    assert_eq!(h.service_port("web"), Some(80));
    assert!(
        h.problems()
            .iter()
            .any(|p| p.contains("demo/web") && p.contains("keeping its previous valid version")),
        "{:?}",
        h.problems()
    );
}

/// Objects from the API go through the same model: any nodePort is programmed, and a
/// value kube-proxy would ignore costs only that value (reported, counted).
#[tokio::test]
async fn wide_node_ports_and_ignored_values() {
    let server = FakeApiServer::start().unwrap();
    let mut wide = service("wide", 80, json!({}));
    wide["spec"]["type"] = json!("NodePort");
    wide["spec"]["ports"][0]["nodePort"] = json!(3001);
    wide["spec"]["externalIPs"] = json!(["not-an-ip", "198.51.100.7"]);
    server.apply(wide).unwrap();
    let mut slice = slice("wide-1", "wide", "10.244.1.5", json!({}));
    // An endpoint of the other family is ignored, as by kube-proxy; the slice stays.
    slice["endpoints"]
        .as_array_mut()
        .unwrap()
        .push(json!({"addresses": ["fd00::5"]}));
    server.apply(slice).unwrap();
    server.apply(node(NODE, "zone-a", "10.0.0.11")).unwrap();
    let mut h = Harness::start(&server).await;
    h.synced().await;
    match h.state.get(&key(Kind::Service, "wide")) {
        Some(Object::Service(s)) => {
            assert_eq!(s.ports[0].node_port, Some(3001));
            assert_eq!(s.rare.external_ips.len(), 1);
        }
        other => panic!("wide: {other:?}"),
    }
    assert_eq!(h.slice_ip("wide-1").as_deref(), Some("10.244.1.5"));
    let problems = h.problems();
    for needle in [
        "Service demo/wide: spec.externalIPs[0]: invalid value \"not-an-ip\"",
        "EndpointSlice demo/wide-1: endpoints[1].addresses[0]: invalid value \"fd00::5\"",
    ] {
        assert!(
            problems
                .iter()
                .any(|p| p.contains(needle)
                    && p.ends_with("ignored, the rest of the object is used")),
            "{needle}: {problems:?}"
        );
    }
    assert_eq!(problems.len(), 2, "{problems:?}");
}

#[tokio::test]
async fn services_of_other_proxies_and_headless_slices_are_skipped() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("web", 80, json!({}))).unwrap();
    server
        .apply(service(
            "other",
            81,
            json!({"service.kubernetes.io/service-proxy-name": "cilium"}),
        ))
        .unwrap();
    server
        .apply(slice(
            "db-1",
            "db",
            "10.244.1.7",
            json!({"service.kubernetes.io/headless": ""}),
        ))
        .unwrap();
    server
        .apply(slice("web-1", "web", "10.244.1.5", json!({})))
        .unwrap();
    server.apply(node(NODE, "zone-a", "10.0.0.11")).unwrap();
    let mut h = Harness::start(&server).await;
    h.synced().await;
    assert!(h.service_port("web").is_some());
    assert!(h.service_port("other").is_none());
    assert!(h.slice_ip("db-1").is_none());
    assert!(h.slice_ip("web-1").is_some());
    // Labelled later: it leaves the selector, arrives as DELETED, and is dropped.
    server
        .apply(service(
            "web",
            80,
            json!({"service.kubernetes.io/service-proxy-name": "cilium"}),
        ))
        .unwrap();
    h.until("the relabelled Service gone", |h| {
        h.service_port("web").is_none()
    })
    .await;
}

#[tokio::test]
async fn synced_waits_until_every_initial_list_succeeded() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("web", 80, json!({}))).unwrap();
    server.set_available(false);
    let mut h = Harness::start(&server).await;
    // While the API refuses every list, nothing is delivered: an empty or partial initial
    // state would make the engine delete every rule.
    let early = tokio::time::timeout(Duration::from_secs(2), h.rx.recv()).await;
    assert!(
        early.is_err(),
        "delivered while the API was down: {early:?}"
    );
    server.set_available(true);
    h.synced().await;
    assert_eq!(h.service_port("web"), Some(80));
    // The first batch carried the whole state, before Synced.
    assert!(matches!(h.events.first(), Some(SourceEvent::Changes(c)) if !c.is_empty()));
}
