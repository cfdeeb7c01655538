//! healthCheckNodePort servers (`pkg/proxy/healthcheck/service_health.go`): one HTTP server
//! per eTP Local service, answering on every path with the service's local endpoint count,
//! 200 when it is > 0 (and the proxy is healthy), 503 otherwise.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use svcplane_proxy::HealthCheck;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::health::ProxyHealth;
use crate::http::json_response;
use crate::registry::AppliedState;

struct Running {
    check: watch::Sender<HealthCheck>,
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Dropping the serve future closes the listener, freeing the port.
        self.task.abort();
    }
}

#[derive(Clone)]
struct ServerState {
    check: watch::Receiver<HealthCheck>,
    proxy: Option<ProxyHealth>,
}

/// The set of running healthCheckNodePort servers.
pub struct HealthCheckServers {
    bind_ip: IpAddr,
    proxy: Option<ProxyHealth>,
    running: BTreeMap<u16, Running>,
}

impl HealthCheckServers {
    /// Servers listen on `bind_ip` (kube-proxy: every address, `0.0.0.0`); an unspecified
    /// address of either family means every address of both families, as Go's listener
    /// does for kube-proxy. With `proxy`, a service also answers 503 while the proxy itself
    /// is unhealthy (`serviceProxyHealthy`).
    pub fn new(bind_ip: IpAddr, proxy: Option<ProxyHealth>) -> HealthCheckServers {
        HealthCheckServers {
            bind_ip,
            proxy,
            running: BTreeMap::new(),
        }
    }

    /// Ports with a running server.
    pub fn ports(&self) -> Vec<u16> {
        self.running.keys().copied().collect()
    }

    /// Where the server for `port` listens.
    pub fn local_addr(&self, port: u16) -> Option<SocketAddr> {
        self.running.get(&port).map(|r| r.local_addr)
    }

    /// Start servers for new ports, stop those no longer wanted, update the answers of the
    /// rest. A port that cannot be bound is returned and retried on the next update (as
    /// kube-proxy, which retries on every sync).
    pub async fn update(
        &mut self,
        checks: &BTreeMap<u16, HealthCheck>,
    ) -> Vec<(u16, std::io::Error)> {
        self.running.retain(|port, _| checks.contains_key(port));
        let mut failed = Vec::new();
        for (&port, check) in checks {
            if let Some(r) = self.running.get(&port) {
                r.check.send_if_modified(|c| {
                    let changed = c != check;
                    if changed {
                        *c = check.clone();
                    }
                    changed
                });
                continue;
            }
            match self.start(port, check.clone()).await {
                Ok(r) => {
                    tracing::debug!(port, service = %check.service, "healthCheckNodePort server started");
                    self.running.insert(port, r);
                }
                Err(err) => failed.push((port, err)),
            }
        }
        failed
    }

    async fn start(&self, port: u16, check: HealthCheck) -> std::io::Result<Running> {
        let listener = crate::http::listen(SocketAddr::new(self.bind_ip, port))?;
        let local_addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(check);
        let router = Router::new().fallback(answer).with_state(ServerState {
            check: rx,
            proxy: self.proxy.clone(),
        });
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, router).await {
                tracing::warn!(port, "healthCheckNodePort server stopped: {err}");
            }
        });
        Ok(Running {
            check: tx,
            local_addr,
            task,
        })
    }

    /// Follow the applied desired state until its sender is dropped.
    pub async fn run(mut self, mut applied: AppliedState) {
        loop {
            let checks = applied
                .borrow_and_update()
                .as_ref()
                .map(|state| state.health_checks.clone());
            // Only the checks are kept while waiting: holding the state would keep the
            // engine from reusing it for the next one (it then copies every service).
            if let Some(checks) = checks {
                for (port, err) in self.update(&checks).await {
                    tracing::warn!(
                        port,
                        "cannot serve healthCheckNodePort {port}: {err}; retrying on the next sync"
                    );
                }
            }
            if applied.changed().await.is_err() {
                return;
            }
        }
    }
}

async fn answer(State(st): State<ServerState>) -> Response {
    let check = st.check.borrow().clone();
    let proxy_healthy = st.proxy.as_ref().is_none_or(|p| p.check().healthy);
    let body = serde_json::json!({
        "service": {
            "namespace": &*check.service.namespace,
            "name": &*check.service.name,
        },
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    let code = if check.local_endpoints > 0 && proxy_healthy {
        200
    } else {
        503
    };
    json_response(code, body.to_string())
}
