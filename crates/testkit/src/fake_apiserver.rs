//! A fake Kubernetes API server speaking the real list/watch wire protocol over plain
//! HTTP/1.1, for tests of the API source (no real API server is available here).
//!
//! What it serves, as the API server does:
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`
//!   (cluster-wide lists): a JSON `ServiceList` / `EndpointSliceList` / `NodeList` with
//!   `metadata.resourceVersion`, honouring `labelSelector` (`key`, `!key`, `key=value`,
//!   `key!=value`) and `fieldSelector` (`metadata.name=`, `metadata.namespace=`);
//! - the same paths with `?watch=1&resourceVersion=RV`: a chunked stream of
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":{...}}` lines, replaying
//!   every event after RV and then following live; an object that stops (starts) matching
//!   the selector arrives as DELETED (ADDED); `timeoutSeconds` ends the stream cleanly;
//!   a resourceVersion older than the last [`FakeApiServer::expire`] gets an
//!   `ERROR` event with a `Status` of code 410 (Gone), as after etcd compaction.
//!
//! Faults for resilience tests: [`FakeApiServer::expire`] (410 on the open watches and on
//! any resume from before it), [`FakeApiServer::drop_watches`] (connections cut
//! mid-stream, no terminating chunk) and [`FakeApiServer::set_available`] (every
//! connection closed at once, as an unreachable server). Dropping the server stops it.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The collections served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ApiResource {
    Services,
    EndpointSlices,
    Nodes,
}

impl ApiResource {
    const ALL: [ApiResource; 3] = [
        ApiResource::Services,
        ApiResource::EndpointSlices,
        ApiResource::Nodes,
    ];

    /// The cluster-wide collection path.
    pub fn path(self) -> &'static str {
        match self {
            ApiResource::Services => "/api/v1/services",
            ApiResource::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            ApiResource::Nodes => "/api/v1/nodes",
        }
    }

    fn from_kind(kind: &str) -> Option<ApiResource> {
        match kind {
            "Service" => Some(ApiResource::Services),
            "EndpointSlice" => Some(ApiResource::EndpointSlices),
            "Node" => Some(ApiResource::Nodes),
            _ => None,
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            ApiResource::Services => "ServiceList",
            ApiResource::EndpointSlices => "EndpointSliceList",
            ApiResource::Nodes => "NodeList",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            ApiResource::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn namespaced(self) -> bool {
        self != ApiResource::Nodes
    }
}

/// One request the server answered (for assertions on what the client asked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
    pub authorization: Option<String>,
    /// When its head was read (for timing a client's lists and watches).
    pub at: Instant,
}

impl ApiRequest {
    pub fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "1" || w == "true")
    }
}

#[derive(Debug)]
struct HistoryEntry {
    rv: u64,
    resource: ApiResource,
    kind: EventKind,
    object: Value,
    /// The version before a MODIFIED (to turn selector changes into ADDED/DELETED).
    old: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    Added,
    Modified,
    Deleted,
}

/// An object as served: its JSON, and its list item already serialized (so a list of
/// 10k objects is a concatenation, not 10k clones serialized under the lock: the fake must
/// not be what a benchmark of the client measures).
#[derive(Debug)]
struct Stored {
    object: Value,
    item: String,
}

impl Stored {
    fn new(object: Value) -> Stored {
        // As the API server: list items carry no kind/apiVersion.
        let mut item = object.clone();
        if let Some(map) = item.as_object_mut() {
            map.remove("kind");
            map.remove("apiVersion");
        }
        Stored {
            item: item.to_string(),
            object,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(ApiResource, String), Stored>,
    history: Vec<HistoryEntry>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// Bumped by `expire`: open watches send 410 and end.
    expire_gen: u64,
    /// Bumped by `drop_watches` and `set_available(false)`: open watches are cut.
    drop_gen: u64,
    unavailable: bool,
    stopped: bool,
    requests: Vec<ApiRequest>,
    open_watches: usize,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread must not take the whole server down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server; stopped (every connection closed) on drop.
#[derive(Debug)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Listen on 127.0.0.1 at a free port.
    pub fn start() -> io::Result<FakeApiServer> {
        FakeApiServer::serve(TcpListener::bind("127.0.0.1:0")?)
    }

    /// Serve on `listener` (e.g. one bound inside a network namespace with
    /// [`crate::in_netns`]: the socket stays there).
    pub fn serve(listener: TcpListener) -> io::Result<FakeApiServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let accept_shared = shared.clone();
        let accept = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || accept_loop(listener, accept_shared))?;
        Ok(FakeApiServer {
            shared,
            addr,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Write a kubeconfig pointing at this server (plain http, a bearer token).
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        self.write_kubeconfig_via(path, &self.url())
    }

    /// [`FakeApiServer::write_kubeconfig`] with another server URL, one that leads here
    /// some other way (e.g. a Service ClusterIP in front of it).
    pub fn write_kubeconfig_via(&self, path: &Path, server: &str) -> io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
                 current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
                server
            ),
        )
    }

    /// Create or replace an object (a JSON Service, EndpointSlice or Node with `kind`):
    /// ADDED or MODIFIED. Returns its new resourceVersion.
    pub fn apply(&self, mut object: Value) -> io::Result<u64> {
        let resource = object
            .get("kind")
            .and_then(Value::as_str)
            .and_then(ApiResource::from_kind)
            .ok_or_else(|| {
                io::Error::other("apply: kind must be Service, EndpointSlice or Node")
            })?;
        let key = object_key(resource, &mut object)?;
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["apiVersion"] = json!(resource.api_version());
        let old = st
            .objects
            .insert((resource, key), Stored::new(object.clone()))
            .map(|s| s.object);
        let kind = if old.is_some() {
            EventKind::Modified
        } else {
            EventKind::Added
        };
        st.history.push(HistoryEntry {
            rv,
            resource,
            kind,
            object,
            old,
        });
        drop(st);
        self.shared.changed.notify_all();
        Ok(rv)
    }

    /// Delete an object (`namespace` is ignored for Nodes): DELETED. False when unknown.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let Some(resource) = ApiResource::from_kind(kind) else {
            return false;
        };
        let key = if resource.namespaced() {
            format!("{namespace}/{name}")
        } else {
            name.to_string()
        };
        let mut st = self.shared.lock();
        let Some(Stored { mut object, .. }) = st.objects.remove(&(resource, key)) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history.push(HistoryEntry {
            rv,
            resource,
            kind: EventKind::Deleted,
            object,
            old: None,
        });
        drop(st);
        self.shared.changed.notify_all();
        true
    }

    /// Forget the history (as an etcd compaction): the open watches get an ERROR event with
    /// a 410 Gone Status and end, and any watch resuming from before now gets the same.
    pub fn expire(&self) {
        let mut st = self.shared.lock();
        st.compacted = st.rv + 1;
        st.history.clear();
        st.expire_gen += 1;
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Cut every open watch connection mid-stream (no terminating chunk).
    pub fn drop_watches(&self) {
        self.shared.lock().drop_gen += 1;
        self.shared.changed.notify_all();
    }

    /// Unavailable: open watches are cut and every new connection is closed unanswered.
    pub fn set_available(&self, available: bool) {
        let mut st = self.shared.lock();
        st.unavailable = !available;
        if !available {
            st.drop_gen += 1;
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.shared.lock().requests.clone()
    }

    /// Watches currently streaming.
    pub fn open_watches(&self) -> usize {
        self.shared.lock().open_watches
    }

    /// The latest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.changed.notify_all();
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// `namespace/name` (namespaced; namespace defaulted) or `name`.
fn object_key(resource: ApiResource, object: &mut Value) -> io::Result<String> {
    let name = object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| io::Error::other("apply: metadata.name is required"))?
        .to_string();
    if !resource.namespaced() {
        return Ok(name);
    }
    let namespace = match object["metadata"]["namespace"].as_str() {
        Some(ns) if !ns.is_empty() => ns.to_string(),
        _ => {
            object["metadata"]["namespace"] = json!("default");
            "default".to_string()
        }
    };
    Ok(format!("{namespace}/{name}"))
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = Vec::new();
    loop {
        if shared.lock().stopped {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if shared.lock().unavailable {
                    // Closed unanswered: the client sees a connection error.
                    drop(stream);
                    continue;
                }
                let conn_shared = shared.clone();
                if let Ok(handle) = std::thread::Builder::new()
                    .name("fake-apiserver-conn".into())
                    .spawn(move || {
                        let _ = serve_connection(stream, &conn_shared);
                    })
                {
                    connections.push(handle);
                }
                connections.retain(|h: &JoinHandle<()>| !h.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    drop(listener);
    for handle in connections {
        let _ = handle.join();
    }
}

/// Requests on one keep-alive connection until the client closes it or a watch ends it.
fn serve_connection(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    // Short read timeouts, so an idle keep-alive connection notices a stop or an outage.
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let Some(request) = read_request(&mut reader, shared)? else {
            return Ok(());
        };
        if shared.lock().unavailable {
            // Also a request on a connection opened before the outage goes unanswered.
            return Ok(());
        }
        let (path, query) = split_target(&request.target);
        let api_request = ApiRequest {
            path: path.to_string(),
            query,
            authorization: request.authorization,
            at: Instant::now(),
        };
        shared.lock().requests.push(api_request.clone());
        let Some(resource) = ApiResource::ALL.into_iter().find(|r| r.path() == path) else {
            let status = status_json(
                404,
                "NotFound",
                &format!("the server could not find {path}"),
            );
            write_response(&mut out, 404, "Not Found", &status)?;
            if request.close {
                return Ok(());
            }
            continue;
        };
        if request.method != "GET" {
            let status = status_json(405, "MethodNotAllowed", "only GET is served");
            write_response(&mut out, 405, "Method Not Allowed", &status)?;
            if request.close {
                return Ok(());
            }
            continue;
        }
        let selector = match Selector::parse(&api_request) {
            Ok(s) => s,
            Err(message) => {
                let status = status_json(400, "BadRequest", &message);
                write_response(&mut out, 400, "Bad Request", &status)?;
                if request.close {
                    return Ok(());
                }
                continue;
            }
        };
        if api_request.is_watch() {
            return serve_watch(out, shared, resource, &selector, &api_request);
        }
        let body = list_json(shared, resource, &selector);
        write_response(&mut out, 200, "OK", &body)?;
        if request.close {
            return Ok(());
        }
    }
}

struct RawRequest {
    method: String,
    target: String,
    authorization: Option<String>,
    close: bool,
}

/// The next request's head; `None` when the connection closed or the server stops.
fn read_request(
    reader: &mut BufReader<TcpStream>,
    shared: &Shared,
) -> io::Result<Option<RawRequest>> {
    let mut lines = Vec::new();
    let mut line = String::new();
    loop {
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(None),
            Ok(_) => {
                if line == "\r\n" || line == "\n" {
                    break;
                }
                lines.push(std::mem::take(&mut line));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let st = shared.lock();
                if st.stopped || st.unavailable {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
    let Some(first) = lines.first() else {
        return Ok(None);
    };
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let authorization = lines.iter().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim().to_string())
    });
    let connection = |want: &str| {
        lines.iter().skip(1).any(|l| {
            l.split_once(':').is_some_and(|(name, value)| {
                name.eq_ignore_ascii_case("connection") && value.trim().eq_ignore_ascii_case(want)
            })
        })
    };
    // HTTP/1.0 closes after the response unless asked to keep the connection alive
    // (as `http_get` sends it).
    let http10 = parts.next().is_some_and(|v| v == "HTTP/1.0");
    let close = connection("close") || (http10 && !connection("keep-alive"));
    Ok(Some(RawRequest {
        method,
        target,
        authorization,
        close,
    }))
}

fn split_target(target: &str) -> (&str, BTreeMap<String, String>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (path, params)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A parsed labelSelector + fieldSelector.
#[derive(Debug, Default)]
struct Selector {
    labels: Vec<LabelRequirement>,
    fields: Vec<(String, String)>,
}

#[derive(Debug)]
enum LabelRequirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
}

impl Selector {
    fn parse(request: &ApiRequest) -> Result<Selector, String> {
        let mut selector = Selector::default();
        if let Some(labels) = request.query.get("labelSelector") {
            for term in labels.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let req = if let Some(key) = term.strip_prefix('!') {
                    LabelRequirement::NotExists(key.to_string())
                } else if let Some((k, v)) = term.split_once("!=") {
                    LabelRequirement::NotEquals(k.to_string(), v.to_string())
                } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('='))
                {
                    LabelRequirement::Equals(k.to_string(), v.to_string())
                } else if term.contains(' ') {
                    return Err(format!("unsupported label selector term {term:?}"));
                } else {
                    LabelRequirement::Exists(term.to_string())
                };
                selector.labels.push(req);
            }
        }
        if let Some(fields) = request.query.get("fieldSelector") {
            for term in fields.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let (k, v) = term
                    .split_once("==")
                    .or_else(|| term.split_once('='))
                    .ok_or_else(|| format!("unsupported field selector term {term:?}"))?;
                if k != "metadata.name" && k != "metadata.namespace" {
                    return Err(format!("field label not supported: {k}"));
                }
                selector.fields.push((k.to_string(), v.to_string()));
            }
        }
        Ok(selector)
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = object["metadata"]["labels"].as_object();
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|req| match req {
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
        });
        labels_ok
            && self.fields.iter().all(|(k, v)| {
                let field = k.strip_prefix("metadata.").unwrap_or(k);
                object["metadata"][field].as_str().unwrap_or("") == v
            })
    }
}

fn status_json(code: u16, reason: &str, message: &str) -> String {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
    .to_string()
}

fn list_json(shared: &Shared, resource: ApiResource, selector: &Selector) -> String {
    let st = shared.lock();
    let head = json!({
        "kind": resource.list_kind(),
        "apiVersion": resource.api_version(),
        "metadata": {"resourceVersion": st.rv.to_string()},
    })
    .to_string();
    // `{...head, "items": [item, ...]}`, spliced by hand from the items' stored JSON.
    let mut out = String::with_capacity(head.len() + 16);
    out.push_str(head.strip_suffix('}').unwrap_or(&head));
    out.push_str(",\"items\":[");
    let mut first = true;
    for ((r, _), stored) in &st.objects {
        if *r == resource && selector.matches(&stored.object) {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&stored.item);
        }
    }
    out.push_str("]}");
    out
}

fn write_response(out: &mut TcpStream, code: u16, reason: &str, body: &str) -> io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

fn write_chunk(out: &mut TcpStream, line: &str) -> io::Result<()> {
    write!(out, "{:x}\r\n{line}\n\r\n", line.len() + 1)?;
    out.flush()
}

struct OpenWatch<'a>(&'a Shared);

impl Drop for OpenWatch<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.open_watches = st.open_watches.saturating_sub(1);
    }
}

/// Stream the events after the request's resourceVersion until the timeout, a fault or a stop.
fn serve_watch(
    mut out: TcpStream,
    shared: &Shared,
    resource: ApiResource,
    selector: &Selector,
    request: &ApiRequest,
) -> io::Result<()> {
    let since: u64 = request
        .query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let timeout = request
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let bookmarks = request
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let started = Instant::now();
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    out.flush()?;
    shared.lock().open_watches += 1;
    // Declared before the guard below, so it is dropped after it (it locks too).
    let _open = OpenWatch(shared);
    let mut st = shared.lock();
    let (drop_gen, expire_gen) = (st.drop_gen, st.expire_gen);
    if since < st.compacted {
        drop(st);
        return send_gone(&mut out, since);
    }
    let mut cursor = since;
    let mut bookmarked = since;
    loop {
        if st.stopped || st.unavailable || st.drop_gen != drop_gen {
            // Cut: no terminating chunk, the client sees the body end early.
            return Ok(());
        }
        if st.expire_gen != expire_gen {
            drop(st);
            return send_gone(&mut out, since);
        }
        let events: Vec<String> = st
            .history
            .iter()
            .filter(|e| e.rv > cursor && e.resource == resource)
            .filter_map(|e| watch_event(e, selector))
            .collect();
        let latest = st.rv;
        drop(st);
        for event in &events {
            write_chunk(&mut out, event)?;
        }
        cursor = latest;
        if bookmarks && cursor > bookmarked {
            // As the API server: a BOOKMARK carries only kind, apiVersion and resourceVersion.
            let bookmark = json!({
                "type": "BOOKMARK",
                "object": {
                    "kind": resource_kind(resource),
                    "apiVersion": resource.api_version(),
                    "metadata": {"resourceVersion": cursor.to_string()},
                },
            });
            write_chunk(&mut out, &bookmark.to_string())?;
            bookmarked = cursor;
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            write!(out, "0\r\n\r\n")?;
            return out.flush();
        }
        st = shared.lock();
        if st.rv == cursor && !st.stopped && st.drop_gen == drop_gen && st.expire_gen == expire_gen
        {
            st = shared
                .changed
                .wait_timeout(st, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

fn resource_kind(resource: ApiResource) -> &'static str {
    match resource {
        ApiResource::Services => "Service",
        ApiResource::EndpointSlices => "EndpointSlice",
        ApiResource::Nodes => "Node",
    }
}

fn send_gone(out: &mut TcpStream, since: u64) -> io::Result<()> {
    let status: Value = serde_json::from_str(&status_json(
        410,
        "Expired",
        &format!("too old resource version: {since}"),
    ))
    .unwrap_or_default();
    let event = json!({"type": "ERROR", "object": status});
    write_chunk(out, &event.to_string())?;
    write!(out, "0\r\n\r\n")?;
    out.flush()
}

/// The event line a watch with `selector` sees for `entry`, if any.
fn watch_event(entry: &HistoryEntry, selector: &Selector) -> Option<String> {
    let now = selector.matches(&entry.object);
    let kind = match entry.kind {
        EventKind::Added if now => "ADDED",
        EventKind::Deleted if now => "DELETED",
        EventKind::Modified => {
            let before = entry.old.as_ref().is_some_and(|o| selector.matches(o));
            match (before, now) {
                (true, true) => "MODIFIED",
                (false, true) => "ADDED",
                (true, false) => "DELETED",
                (false, false) => return None,
            }
        }
        _ => return None,
    };
    Some(json!({"type": kind, "object": entry.object}).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(server: &FakeApiServer, target: &str) -> String {
        let mut s = TcpStream::connect(server.addr()).unwrap();
        write!(
            s,
            "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn svc(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "demo", "labels": labels},
               "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}})
    }

    #[test]
    fn list_filters_by_selector_and_carries_resource_version() {
        let server = FakeApiServer::start().unwrap();
        server.apply(svc("a", json!({}))).unwrap();
        server
            .apply(svc(
                "b",
                json!({"service.kubernetes.io/service-proxy-name": "x"}),
            ))
            .unwrap();
        let all = get(&server, "/api/v1/services");
        assert!(
            all.contains("\"resourceVersion\":\"2\"") && all.contains("\"b\""),
            "{all}"
        );
        let filtered = get(
            &server,
            "/api/v1/services?labelSelector=%21service.kubernetes.io%2Fservice-proxy-name",
        );
        assert!(
            filtered.contains("\"a\"") && !filtered.contains("\"b\""),
            "{filtered}"
        );
        // A JSON list, its items without kind and apiVersion, as the API server's.
        let body = all.split_once("\r\n\r\n").unwrap().1;
        let list: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            (list["kind"].as_str(), list["apiVersion"].as_str()),
            (Some("ServiceList"), Some("v1"))
        );
        let names: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(list["items"][0].get("kind").is_none(), "{body}");
        assert_eq!(list["items"][0]["spec"]["clusterIP"], "10.96.0.1");
        assert_eq!(
            server.requests()[1].query["labelSelector"],
            "!service.kubernetes.io/service-proxy-name"
        );
        assert!(get(&server, "/api/v1/pods").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn watch_replays_and_expires() {
        let server = FakeApiServer::start().unwrap();
        server.apply(svc("a", json!({}))).unwrap();
        server.apply(svc("a", json!({"x": "y"}))).unwrap();
        assert!(server.delete("Service", "demo", "a"));
        let out = get(
            &server,
            "/api/v1/services?watch=1&resourceVersion=1&timeoutSeconds=0",
        );
        assert!(out.contains("Transfer-Encoding: chunked"), "{out}");
        assert!(!out.contains("\"ADDED\""), "{out}");
        let modified = out.find("\"MODIFIED\"").unwrap();
        let deleted = out.find("\"DELETED\"").unwrap();
        assert!(modified < deleted, "{out}");
        server.expire();
        let out = get(
            &server,
            "/api/v1/services?watch=1&resourceVersion=1&timeoutSeconds=0",
        );
        assert!(
            out.contains("\"code\":410") && out.contains("\"ERROR\""),
            "{out}"
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("%21a%2Fb%2Cc+d"), "!a/b,c d");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
