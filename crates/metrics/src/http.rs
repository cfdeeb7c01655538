//! The `/metrics` and `/healthz` + `/livez` HTTP servers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::health::ProxyHealth;
use crate::registry::Metrics;

/// A listener that could not be opened, naming the flag it came from.
#[derive(Debug, thiserror::Error)]
// The I/O error is in the message rather than a `source`, so error chains do not repeat it.
#[error("{flag} {addr}: cannot listen: {error}")]
pub struct BindError {
    pub flag: &'static str,
    pub addr: SocketAddr,
    pub error: std::io::Error,
}

/// Bind `addr` for the server configured by `flag` (e.g. `--metrics-bind-address`).
pub async fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    listen(addr).map_err(|error| BindError { flag, addr, error })
}

/// A listener on `addr`, as Go's `net.Listen("tcp", addr)` opens it for kube-proxy: an
/// unspecified address, `0.0.0.0` included, listens on every address of both families
/// (one `[::]` socket with IPV6_V6ONLY off, whatever `net.ipv6.bindv6only` says; an IPv4
/// client shows up as `::ffff:a.b.c.d`), or on every IPv4 address when the host has no
/// IPv6.
/// SO_REUSEADDR as tokio's own `bind`, so a port freed a moment ago can be taken again.
pub(crate) fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |addr: SocketAddr, dual_stack: bool| -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if dual_stack {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    };
    if !addr.ip().is_unspecified() {
        return open(addr, false);
    }
    let any6 = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), addr.port());
    match open(any6, true) {
        // No IPv6 on this host (e.g. disabled): IPv4 is all there is.
        Err(err) if err.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            let any4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port());
            open(any4, false)
        }
        other => other,
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct MetricsState {
    metrics: Arc<Metrics>,
    health: ProxyHealth,
}

/// `/metrics`: every metric, with the sync loop's status read at scrape time.
pub fn metrics_router(metrics: Arc<Metrics>, health: ProxyHealth) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .with_state(MetricsState { metrics, health })
}

async fn serve_metrics(State(st): State<MetricsState>) -> Response {
    st.metrics.observe_status(&st.health.status());
    if let Some(source) = st.health.source_status() {
        st.metrics.observe_source(&source);
    }
    ([(header::CONTENT_TYPE, OPENMETRICS)], st.metrics.encode()).into_response()
}

/// `/metrics` for a registry of its own (`svcplane dns`, which has no sync loop).
pub fn registry_router(registry: Arc<prometheus_client::registry::Registry>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(
                |State(registry): State<Arc<prometheus_client::registry::Registry>>| async move {
                    let mut out = String::new();
                    // Writing into a String cannot fail.
                    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                    ([(header::CONTENT_TYPE, OPENMETRICS)], out).into_response()
                },
            ),
        )
        .with_state(registry)
}

/// `/healthz` and `/livez` (kube-proxy: the same proxier health; livez ignores node
/// eligibility, which svcplane does not track, so both answer alike).
pub fn healthz_router(metrics: Arc<Metrics>, health: ProxyHealth) -> Router {
    let st = MetricsState { metrics, health };
    Router::new()
        .route(
            "/healthz",
            get(|State(st): State<MetricsState>| async move { answer(&st, false) }),
        )
        .route(
            "/livez",
            get(|State(st): State<MetricsState>| async move { answer(&st, true) }),
        )
        .with_state(st)
}

fn answer(st: &MetricsState, livez: bool) -> Response {
    let health = st.health.check();
    let code = health.code();
    st.metrics.health_answer(livez, code);
    json_response(code, health.body())
}

pub(crate) fn json_response(code: u16, body: String) -> Response {
    let status = if code == 200 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// Serve `router` on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}
