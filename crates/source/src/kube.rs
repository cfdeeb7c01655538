//! The Kubernetes API as a [`Source`]: kube-runtime watchers on Services, EndpointSlices
//! (discovery.k8s.io/v1) and this node's Node, as kube-proxy's informers.
//!
//! - Selectors as kube-proxy's: Services and EndpointSlices labelled
//!   `service.kubernetes.io/service-proxy-name` (another proxy's) or
//!   `service.kubernetes.io/headless` are not watched (and are dropped here too, should a
//!   server ignore the selector); the Node by `fieldSelector=metadata.name=NODE`.
//! - Each watcher lists, then watches from the list's resourceVersion; a cut connection
//!   resumes from the last resourceVersion seen, a 410 Gone relists (the watcher does
//!   both). After a relist the objects not listed again are deleted, so what was deleted
//!   while disconnected goes away.
//! - Errors are retried with kube-runtime's default backoff (0.8 s doubling to 30 s) and
//!   never clear anything: the engine keeps the last known state, so the dataplane is not
//!   flushed because the API is unreachable. Each error is logged, counted in
//!   [`ApiSourceStatus`] and reported to whoever watches it (`/healthz`, metrics).
//! - Invalid objects (the converters' validation) are reported as [`Problem`]s and
//!   skipped; an object that becomes invalid keeps its previous valid version.
//! - The initial state is sent once all three initial lists completed, followed by
//!   `SourceEvent::Synced`; later events go out in batches of whatever is ready together.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::SystemTime;

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde::de::{Deserialize, DeserializeOwned, Deserializer};
use svcplane_model::{
    Change, DEFAULT_NAMESPACE, InvalidObject, Kind, NamespacedName, Object, ObjectKey,
    SERVICE_PROXY_NAME_LABEL, SourceEvent, endpoint_slice_from_k8s, node_from_k8s,
    service_from_k8s,
};
use tokio::sync::watch;

use crate::by_name::{ByKey, NameView};
use crate::ratelimit::RateLimitLayer;
use crate::{IGNORED, Problem, ProblemSink, Source, SourceError, SourceFuture};

/// Label kube's EndpointSlice controller puts on the slices of headless Services (and
/// which kube-proxy's informers exclude).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// kube-proxy's label selector for Services and EndpointSlices.
pub fn proxy_label_selector() -> String {
    format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}

/// Most changes sent in one batch (a relist of 10k objects is split).
const MAX_BATCH: usize = 2048;

/// kube-proxy's `--kube-api-qps` / `--kube-api-burst` defaults.
pub const DEFAULT_API_QPS: f32 = 5.0;
pub const DEFAULT_API_BURST: u32 = 10;

/// The watched collections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ApiResource {
    Services,
    EndpointSlices,
    Nodes,
}

impl ApiResource {
    pub const ALL: [ApiResource; 3] = [
        ApiResource::Services,
        ApiResource::EndpointSlices,
        ApiResource::Nodes,
    ];

    /// The lower-case plural, as in metric labels (`services`, `endpointslices`, `nodes`).
    pub fn as_str(self) -> &'static str {
        match self {
            ApiResource::Services => "services",
            ApiResource::EndpointSlices => "endpointslices",
            ApiResource::Nodes => "nodes",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One watcher's state, for health and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchStatus {
    /// Its initial list completed at least once.
    pub synced: bool,
    /// Errors so far (failed lists, failed or broken watches, 410 Gone).
    pub errors: u64,
    /// The last error, cleared by the next successful list or event.
    pub last_error: Option<String>,
    pub last_error_time: Option<SystemTime>,
    /// Completed lists (the first, then each relist).
    pub lists: u64,
}

/// The API source's state: one [`WatchStatus`] per resource, in [`ApiResource::ALL`] order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiSourceStatus {
    pub watches: [WatchStatus; 3],
}

impl ApiSourceStatus {
    pub fn get(&self, resource: ApiResource) -> &WatchStatus {
        &self.watches[resource.index()]
    }

    /// Every watcher listed once and none is failing right now.
    pub fn healthy(&self) -> bool {
        self.watches
            .iter()
            .all(|w| w.synced && w.last_error.is_none())
    }
}

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct ApiClientOptions {
    /// A kubeconfig file (its current context); `None`: in-cluster (service account).
    pub kubeconfig: Option<PathBuf>,
    /// The API server URL, overriding the kubeconfig's (kube-proxy's `--master`).
    pub master: Option<String>,
    /// Requests per second (≤ 0: unlimited) and burst of the client's token bucket.
    pub qps: f32,
    pub burst: u32,
}

/// A kube client as `options` say ([`api_config`]), with the rate limit in its stack.
pub async fn api_client(options: &ApiClientOptions) -> Result<Client, SourceError> {
    client_from_config(api_config(options).await?, options)
}

/// The client for `config` (from [`api_config`]), with `options`' rate limit in its stack.
pub fn client_from_config(
    config: kube::Config,
    options: &ApiClientOptions,
) -> Result<Client, SourceError> {
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| SourceError::ApiClient(format!("cannot build the API client: {e}")))?;
    Ok(builder
        .with_layer(&RateLimitLayer::new(options.qps, options.burst))
        .build())
}

/// Where to find the API server: the kubeconfig's current context (a `tokenFile` is
/// read, and re-read as it rotates, by kube's client), with `--master` overriding its
/// server; `--master` alone; or in-cluster (`KUBERNETES_SERVICE_HOST`/`_PORT` and the
/// service account's token and CA). A server under the reserved `.invalid` domain, such
/// as deploy/'s placeholder, is refused here: it can never resolve, and retrying it
/// forever would look like a hang.
pub async fn api_config(options: &ApiClientOptions) -> Result<kube::Config, SourceError> {
    let err = |e: String| SourceError::ApiClient(e);
    // Which setting the server came from, to name it in the placeholder error.
    let (mut config, field) = match (&options.kubeconfig, &options.master) {
        (Some(path), _) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| err(format!("kubeconfig {}: {e}", path.display())))?;
            let field = match current_cluster(&kubeconfig) {
                Some(name) => format!(
                    "kubeconfig {}: the server of cluster {name:?}",
                    path.display()
                ),
                None => format!("kubeconfig {}: its cluster's server", path.display()),
            };
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| err(format!("kubeconfig {}: {e}", path.display())))?;
            (config, field)
        }
        (None, Some(master)) => (
            kube::Config::new(
                master
                    .parse()
                    .map_err(|e| err(format!("--master {master:?}: {e}")))?,
            ),
            "--master".to_string(),
        ),
        (None, None) => (
            kube::Config::incluster().map_err(|e| err(format!("in-cluster configuration: {e}")))?,
            "KUBERNETES_SERVICE_HOST".to_string(),
        ),
    };
    if let (Some(_), Some(master)) = (&options.kubeconfig, &options.master) {
        config.cluster_url = master
            .parse()
            .map_err(|e| err(format!("--master {master:?}: {e}")))?;
    }
    let field = if options.master.is_some() {
        "--master".to_string()
    } else {
        field
    };
    let host = config.cluster_url.host().unwrap_or_default();
    if host
        .trim_end_matches('.')
        .to_ascii_lowercase()
        .ends_with(".invalid")
    {
        return Err(err(format!(
            "{field}: {:?} is a placeholder (the .invalid domain never resolves): set it to \
             {API_ADDRESS_ADVICE}",
            config.cluster_url.to_string()
        )));
    }
    Ok(config)
}

/// The name of the cluster the kubeconfig's current context uses (for error messages).
fn current_cluster(kubeconfig: &kube::config::Kubeconfig) -> Option<String> {
    let current = kubeconfig.current_context.as_deref()?;
    kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == current)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
}

/// What to give svcplane instead of a ClusterIP, and where the README says how.
pub const API_ADDRESS_ADVICE: &str = "the API server's real address, reachable from the node \
     without any Service rule (`kubectl config view --minify -o \
     jsonpath='{.clusters[0].cluster.server}'`, or the server in kubeadm's kube-proxy \
     ConfigMap; README, \"Running in a cluster: replacing kube-proxy\")";

/// Why the API server, at `host`, is reachable only through a Service ClusterIP: one
/// that a Service dataplane (this proxy) programs, so on a node without Service rules
/// the proxy cannot list the objects it needs to program that very rule. svcplane is not
/// told the service CIDR, so the rule is static.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterIpDependency {
    /// In-cluster configuration: `KUBERNETES_SERVICE_HOST` is by definition the ClusterIP
    /// of the `default/kubernetes` Service.
    InCluster,
    /// The kubeconfig's (or `--master`'s) host is `$KUBERNETES_SERVICE_HOST` (which every
    /// Pod, a DaemonSet's too, gets): that ClusterIP again.
    ServiceHostEnv,
    /// A Service DNS name (`NAME.NAMESPACE.svc[.ZONE]`, `kubernetes.default`): resolved by
    /// cluster DNS, itself behind a ClusterIP, to a ClusterIP.
    ServiceDnsName,
}

impl ClusterIpDependency {
    /// The rule for a client configured by `options` as `config` (from [`api_config`]).
    pub fn of_config(
        options: &ApiClientOptions,
        config: &kube::Config,
        service_host: Option<&str>,
    ) -> Option<Self> {
        let in_cluster = options.kubeconfig.is_none() && options.master.is_none();
        let host = config.cluster_url.host().unwrap_or_default();
        ClusterIpDependency::of(host, in_cluster, service_host)
    }

    /// The rule for a client reaching `host` (the API server URL's host), in-cluster or
    /// not, with `KUBERNETES_SERVICE_HOST` set to `service_host` (if at all).
    pub fn of(host: &str, in_cluster: bool, service_host: Option<&str>) -> Option<Self> {
        if in_cluster {
            return Some(ClusterIpDependency::InCluster);
        }
        let bare = |h: &str| {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .trim_end_matches('.')
                .to_ascii_lowercase()
        };
        let host = bare(host);
        if let Some(env) = service_host.map(bare).filter(|e| !e.is_empty()) {
            let same = match (
                host.parse::<std::net::IpAddr>(),
                env.parse::<std::net::IpAddr>(),
            ) {
                (Ok(a), Ok(b)) => a == b,
                _ => host == env,
            };
            if same {
                return Some(ClusterIpDependency::ServiceHostEnv);
            }
        }
        let labels: Vec<&str> = host.split('.').collect();
        if host == "kubernetes.default" || (labels.len() >= 3 && labels[2] == "svc") {
            return Some(ClusterIpDependency::ServiceDnsName);
        }
        None
    }
}

impl std::fmt::Display for ClusterIpDependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClusterIpDependency::InCluster => {
                "the in-cluster address KUBERNETES_SERVICE_HOST, the `kubernetes` Service's ClusterIP"
            }
            ClusterIpDependency::ServiceHostEnv => {
                "$KUBERNETES_SERVICE_HOST, the `kubernetes` Service's ClusterIP"
            }
            ClusterIpDependency::ServiceDnsName => {
                "a Service DNS name, resolved by cluster DNS (behind a ClusterIP) to a ClusterIP"
            }
        })
    }
}

/// The Kubernetes API source. See the module docs.
pub struct KubeSource {
    client: Client,
    node_name: String,
    status: watch::Sender<ApiSourceStatus>,
}

impl KubeSource {
    /// Watch through `client`; `node_name` selects the Node watched.
    pub fn new(client: Client, node_name: impl Into<String>) -> KubeSource {
        KubeSource {
            client,
            node_name: node_name.into(),
            status: watch::channel(ApiSourceStatus::default()).0,
        }
    }

    /// Follow the watchers' state (for `/healthz` and metrics).
    pub fn status(&self) -> watch::Receiver<ApiSourceStatus> {
        self.status.subscribe()
    }

    fn streams(&self) -> SelectAll<BoxStream<'static, Item>> {
        let labels = proxy_label_selector();
        // Lists with resourceVersion=0, as kube-proxy's informers do: the API server
        // answers from its watch cache, in one response (the cache ignores a page size), so
        // 10k objects are one request instead of 20 pages of 500, each a token of the
        // --kube-api-qps bucket (5/s: 6 s for 20k objects). kube sends resourceVersion=0
        // only without a page size.
        let config = || watcher::Config {
            page_size: None,
            ..watcher::Config::default().any_semantic()
        };
        let services = watcher::watcher(
            Api::<Watched<core::Service>>::all(self.client.clone()),
            config().labels(&labels),
        )
        .default_backoff()
        .map(|r| item(ApiResource::Services, r))
        .boxed();
        let slices = watcher::watcher(
            Api::<Watched<discovery::EndpointSlice>>::all(self.client.clone()),
            config().labels(&labels),
        )
        .default_backoff()
        .map(|r| item(ApiResource::EndpointSlices, r))
        .boxed();
        let node = self.node_name.clone();
        let nodes = watcher::watcher(
            Api::<Watched<core::Node>>::all(self.client.clone()),
            config().fields(&format!("metadata.name={}", self.node_name)),
        )
        .default_backoff()
        .map(move |r| {
            let mut item = item(ApiResource::Nodes, r);
            // Should a server ignore the field selector: another node is not ours.
            if let Ok(Event::Apply(c) | Event::InitApply(c)) = &mut item.event
                && *c.key.name.name != *node
            {
                c.object = Ok(None);
                c.warnings.clear();
            }
            item
        })
        .boxed();
        futures::stream::select_all([services, slices, nodes])
    }

    async fn watch(
        self,
        tx: tokio::sync::mpsc::Sender<SourceEvent>,
        problems: ProblemSink,
    ) -> Result<(), SourceError> {
        let mut streams = self.streams();
        let mut state = State::default();
        let mut sent_synced = false;
        loop {
            let first = tokio::select! {
                item = streams.next() => item,
                () = tx.closed() => return Ok(()),
            };
            // The watchers retry forever, so their streams do not end.
            let Some(first) = first else { return Ok(()) };
            let mut changes = Vec::new();
            let mut found = Vec::new();
            state.handle(first, &mut changes, &mut found, &self.status);
            // One batch: whatever else is ready now.
            while changes.len() < MAX_BATCH {
                match streams.next().now_or_never() {
                    Some(Some(item)) => state.handle(item, &mut changes, &mut found, &self.status),
                    _ => break,
                }
            }
            for p in &found {
                tracing::warn!("{p}");
                problems(p);
            }
            if sent_synced {
                if !changes.is_empty() && tx.send(SourceEvent::Changes(changes)).await.is_err() {
                    return Ok(());
                }
                continue;
            }
            // Before every list completed: held back, so the first batch is the whole state.
            state.held.extend(changes);
            if state.all_listed() {
                let held = std::mem::take(&mut state.held);
                if tx.send(SourceEvent::Changes(held)).await.is_err()
                    || tx.send(SourceEvent::Synced).await.is_err()
                {
                    return Ok(());
                }
                sent_synced = true;
                tracing::info!(
                    "Kubernetes API source synced: Services, EndpointSlices and Node listed"
                );
            }
        }
    }
}

impl Source for KubeSource {
    fn run(
        self: Box<Self>,
        tx: tokio::sync::mpsc::Sender<SourceEvent>,
        problems: ProblemSink,
    ) -> SourceFuture {
        Box::pin((*self).watch(tx, problems))
    }
}

/// One object from a watcher, converted: its key, and the object or why it is invalid
/// (`Ok(None)`: not for this proxy, treated as absent), and the values ignored in it.
#[derive(Debug, Clone)]
struct Converted {
    key: ObjectKey,
    object: Result<Option<Object>, InvalidObject>,
    warnings: Vec<InvalidObject>,
}

impl Converted {
    fn new(
        key: ObjectKey,
        converted: Option<Result<svcplane_model::Converted<Object>, InvalidObject>>,
    ) -> Converted {
        match converted {
            None => Converted {
                key,
                object: Ok(None),
                warnings: Vec::new(),
            },
            Some(Ok(c)) => Converted {
                // The object's own key (the same name, from the same metadata) shares the
                // object's strings: the one built before converting is dropped.
                key: Some(c.object.key()).filter(|k| *k == key).unwrap_or(key),
                object: Ok(Some(c.object)),
                warnings: c.warnings,
            },
            Some(Err(invalid)) => Converted {
                key,
                object: Err(invalid),
                warnings: Vec::new(),
            },
        }
    }
}

/// A k8s-openapi type the source watches, and its conversion to the model.
trait Watchable:
    k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta> + DeserializeOwned
{
    fn convert(&self) -> Converted;
}

impl Watchable for core::Service {
    fn convert(&self) -> Converted {
        convert_service(self)
    }
}

impl Watchable for discovery::EndpointSlice {
    fn convert(&self) -> Converted {
        convert_slice(self)
    }
}

impl Watchable for core::Node {
    fn convert(&self) -> Converted {
        convert_node(self)
    }
}

/// What kube's watcher holds of a `K`: the object already converted, and of its metadata
/// only the resourceVersion (which the watcher reads to resume). It is deserialized
/// through `K`, converted and `K` dropped right there, one item at a time: a list of 10k
/// slices is never 10k k8s-openapi objects at once (each several times the size of its
/// conversion), and no k8s-openapi object outlives its conversion.
#[derive(Debug, Clone)]
struct Watched<K> {
    converted: Converted,
    meta: ObjectMeta,
    kind: PhantomData<fn() -> K>,
}

impl<'de, K: Watchable> Deserialize<'de> for Watched<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let object = K::deserialize(deserializer)?;
        let converted = object.convert();
        let meta = ObjectMeta {
            resource_version: object.metadata().resource_version.clone(),
            ..ObjectMeta::default()
        };
        Ok(Watched {
            converted,
            meta,
            kind: PhantomData,
        })
    }
}

impl<K: Watchable> kube::Resource for Watched<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(_: &()) -> Cow<'_, str> {
        K::KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        K::GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        K::VERSION.into()
    }

    fn api_version(_: &()) -> Cow<'_, str> {
        K::API_VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        K::URL_PATH_SEGMENT.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

struct Item {
    resource: ApiResource,
    event: Result<Event<Converted>, watcher::Error>,
}

fn item<K>(resource: ApiResource, result: Result<Event<Watched<K>>, watcher::Error>) -> Item {
    let event = result.map(|event| match event {
        Event::Apply(k) => Event::Apply(k.converted),
        Event::Delete(k) => Event::Delete(k.converted),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(k.converted),
        Event::InitDone => Event::InitDone,
    });
    Item { resource, event }
}

fn namespaced_key<K: ResourceExt>(kind: Kind, k: &K) -> ObjectKey {
    let namespace = k
        .namespace()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    ObjectKey {
        kind,
        name: NamespacedName::new(namespace, k.name_any()),
    }
}

/// Labelled as another proxy's, or as a headless Service's: kube-proxy ignores it.
fn not_for_this_proxy<K: ResourceExt>(k: &K) -> bool {
    let labels = k.labels();
    labels.contains_key(SERVICE_PROXY_NAME_LABEL) || labels.contains_key(HEADLESS_LABEL)
}

fn convert_service(s: &core::Service) -> Converted {
    let key = namespaced_key(Kind::Service, s);
    let converted = (!not_for_this_proxy(s)).then(|| {
        service_from_k8s(s).and_then(|c| {
            // The API server allocates it before anyone sees the Service; only a
            // manifest (the standalone allocator's input) may lack it.
            if c.object.needs_cluster_ip() {
                return Err(InvalidObject {
                    kind: Kind::Service,
                    object: c.object.name.to_string(),
                    field: "spec.clusterIP".into(),
                    value: String::new(),
                    reason: "must be set (the API server allocates it)".into(),
                });
            }
            Ok(c.map(Object::from))
        })
    });
    Converted::new(key, converted)
}

fn convert_slice(s: &discovery::EndpointSlice) -> Converted {
    let key = namespaced_key(Kind::EndpointSlice, s);
    let converted =
        (!not_for_this_proxy(s)).then(|| endpoint_slice_from_k8s(s).map(|c| c.map(Object::from)));
    Converted::new(key, converted)
}

/// Any Node; whether it is this proxy's is the watch's to say (it knows the node name).
fn convert_node(n: &core::Node) -> Converted {
    let key = ObjectKey {
        kind: Kind::Node,
        name: NamespacedName::new("", n.name_any()),
    };
    Converted::new(key, Some(node_from_k8s(n).map(|c| c.map(Object::from))))
}

#[derive(Default)]
struct State {
    /// What was emitted, per resource, by key (the objects' own names: no key copies).
    known: [BTreeSet<ByKey>; 3],
    /// A list in progress, per resource.
    listing: [Option<BTreeSet<ByKey>>; 3],
    listed: [bool; 3],
    /// Changes before the first complete state.
    held: Vec<Change>,
}

impl State {
    fn all_listed(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    fn handle(
        &mut self,
        item: Item,
        changes: &mut Vec<Change>,
        problems: &mut Vec<Problem>,
        status: &watch::Sender<ApiSourceStatus>,
    ) {
        let r = item.resource;
        let i = r.index();
        let event = match item.event {
            Ok(event) => event,
            Err(err) => {
                let message = describe_error(&err);
                tracing::warn!(
                    resource = r.as_str(),
                    error = %message,
                    "Kubernetes API watch failed; keeping the last known state, retrying with backoff"
                );
                status.send_modify(|s| {
                    let w = &mut s.watches[i];
                    w.errors += 1;
                    w.last_error = Some(message);
                    w.last_error_time = Some(SystemTime::now());
                });
                return;
            }
        };
        // Anything but an error means the API answered.
        status.send_if_modified(|s| s.watches[i].last_error.take().is_some());
        match event {
            Event::Init => {
                if self.listed[i] {
                    tracing::info!(resource = r.as_str(), "relisting from the Kubernetes API");
                }
                self.listing[i] = Some(BTreeSet::new());
            }
            Event::InitApply(c) => {
                let previous = known_object(&self.known[i], &c.key);
                let buffer = self.listing[i].get_or_insert_with(BTreeSet::new);
                if let (_, Some(obj)) = valid(c, previous, problems) {
                    buffer.replace(ByKey(obj));
                }
            }
            Event::InitDone => {
                let listed = self.listing[i].take().unwrap_or_default();
                let known = &mut self.known[i];
                for old in known.iter() {
                    if !listed.contains(old as &dyn NameView) {
                        changes.push(Change::Delete(old.0.key()));
                    }
                }
                for new in &listed {
                    if known.get(new as &dyn NameView).map(|old| &old.0) != Some(&new.0) {
                        changes.push(Change::Apply(new.0.clone()));
                    }
                }
                *known = listed;
                self.listed[i] = true;
                status.send_modify(|s| {
                    s.watches[i].synced = true;
                    s.watches[i].lists += 1;
                });
            }
            Event::Apply(c) => {
                let previous = known_object(&self.known[i], &c.key);
                match valid(c, previous, problems) {
                    (key, Some(obj)) => {
                        if known_object(&self.known[i], &key).as_ref() != Some(&obj) {
                            changes.push(Change::Apply(obj.clone()));
                            self.known[i].replace(ByKey(obj));
                        }
                    }
                    (key, None) => {
                        // Now labelled for another proxy: as deleted.
                        if self.known[i].remove(&key as &dyn NameView) {
                            changes.push(Change::Delete(key));
                        }
                    }
                }
            }
            Event::Delete(c) => {
                if self.known[i].remove(&c.key as &dyn NameView) {
                    changes.push(Change::Delete(c.key));
                }
            }
        }
    }
}

/// The object known under `key`.
fn known_object(known: &BTreeSet<ByKey>, key: &ObjectKey) -> Option<Object> {
    known.get(key as &dyn NameView).map(|k| k.0.clone())
}

/// The object to keep for `c`: its new version, its previous valid one when it became
/// invalid, or none (not for this proxy, or invalid and new).
fn valid(
    c: Converted,
    previous: Option<Object>,
    problems: &mut Vec<Problem>,
) -> (ObjectKey, Option<Object>) {
    for warning in c.warnings {
        problems.push(Problem {
            file: None,
            message: format!("{warning}; {IGNORED}"),
        });
    }
    match c.object {
        Ok(obj) => (c.key, obj),
        Err(invalid) => {
            let what = if previous.is_some() {
                "keeping its previous valid version"
            } else {
                "skipped"
            };
            problems.push(Problem {
                file: None,
                message: format!("{invalid}; {what}"),
            });
            (c.key, previous)
        }
    }
}

/// The error as logged: a 410 says the relist that follows.
fn describe_error(err: &watcher::Error) -> String {
    match err {
        watcher::Error::WatchError(status) if status.code == 410 => {
            format!("watch expired (410 Gone: {}); relisting", status.message)
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::ClusterIpDependency as D;

    /// No API server sends a Service without its clusterIP; allocating one is only the
    /// manifests source's job, so here it is an invalid object, not an unaddressed Service.
    #[test]
    fn a_service_without_cluster_ip_from_the_api_is_invalid() {
        let svc: super::core::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"ports": [{"port": 80}]}
        }))
        .unwrap();
        let converted = super::convert_service(&svc);
        let e = converted.object.unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.object.as_str()),
            ("spec.clusterIP", "demo/web")
        );
        let headless: super::core::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "h", "namespace": "demo"},
            "spec": {"clusterIP": "None"}
        }))
        .unwrap();
        assert!(super::convert_service(&headless).object.is_ok());
    }

    /// A list is converted item by item as it is deserialized; the watcher keeps only the
    /// resourceVersion of the metadata, and a watch event's object converts the same way.
    #[test]
    fn watched_objects_are_converted_as_they_are_deserialized() {
        use super::{Watched, discovery};
        use kube::core::{ObjectList, WatchEvent};
        use kube::{Resource, ResourceExt};
        use svcplane_model::Object;
        let list: ObjectList<Watched<discovery::EndpointSlice>> =
            serde_json::from_value(serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                "metadata": {"resourceVersion": "7"},
                "items": [
                    {"metadata": {"name": "web-1", "namespace": "demo", "resourceVersion": "5",
                                  "labels": {"kubernetes.io/service-name": "web"}},
                     "addressType": "IPv4", "ports": [{"port": 8080}],
                     "endpoints": [{"addresses": ["10.1.0.1"]}]},
                    {"metadata": {"name": "web-2", "namespace": "demo", "resourceVersion": "6",
                                  "labels": {"kubernetes.io/service-name": "web",
                                             "service.kubernetes.io/headless": ""}},
                     "addressType": "IPv4", "endpoints": []},
                ],
            }))
            .unwrap();
        let [first, second] = &list.items[..] else {
            panic!("{:?}", list.items)
        };
        assert_eq!(first.resource_version().as_deref(), Some("5"));
        assert_eq!(first.meta().name, None, "only the resourceVersion is kept");
        match &first.converted.object {
            Ok(Some(Object::EndpointSlice(s))) => {
                assert_eq!(s.endpoints.len(), 1);
                assert_eq!(&*first.converted.key.name.name, "web-1");
            }
            other => panic!("{other:?}"),
        }
        // A headless Service's slice: not for this proxy.
        assert!(matches!(second.converted.object, Ok(None)));
        assert_eq!(&*second.converted.key.name.namespace, "demo");

        let event: WatchEvent<Watched<super::core::Service>> =
            serde_json::from_value(serde_json::json!({
                "type": "MODIFIED",
                "object": {"metadata": {"name": "web", "namespace": "demo", "resourceVersion": "9"},
                           "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}},
            }))
            .unwrap();
        let WatchEvent::Modified(svc) = event else {
            panic!("{event:?}")
        };
        assert_eq!(svc.resource_version().as_deref(), Some("9"));
        assert!(matches!(svc.converted.object, Ok(Some(Object::Service(_)))));
    }

    #[test]
    fn an_api_address_behind_a_cluster_ip_is_recognised() {
        let env = Some("10.96.0.1");
        // In-cluster: KUBERNETES_SERVICE_HOST is the `kubernetes` Service's ClusterIP.
        assert_eq!(D::of("10.96.0.1", true, env), Some(D::InCluster));
        assert_eq!(D::of("10.96.0.1", false, env), Some(D::ServiceHostEnv));
        assert_eq!(
            D::of("[fd00:96::1]", false, Some("fd00:96:0:0::1")),
            Some(D::ServiceHostEnv)
        );
        for name in [
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local.",
            "KUBERNETES.default.svc.example.org",
            "kubernetes.default",
            "apiserver.kube-system.svc",
        ] {
            assert_eq!(D::of(name, false, None), Some(D::ServiceDnsName), "{name}");
        }
        // The real address (kubeadm's control-plane endpoint, a load balancer, a node IP).
        for host in [
            "10.0.0.11",
            "192.168.1.10",
            "api.example.org",
            "k8s-api.svc-lb.example.org",
            "[fd00:10::11]",
        ] {
            assert_eq!(D::of(host, false, env), None, "{host}");
        }
        // Outside a Pod nothing says which address is the ClusterIP.
        assert_eq!(D::of("10.96.0.1", false, None), None);
        assert_eq!(D::of("10.96.0.1", false, Some("")), None);
    }
}
