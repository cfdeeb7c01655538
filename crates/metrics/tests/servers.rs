//! The HTTP servers over real sockets on 127.0.0.1, with a plain HTTP/1.1 client.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use svcplane_metrics::{HealthCheckServers, Metrics, ProxyHealth, SyncRecorder, http};
use svcplane_model::IpFamily;
use svcplane_model::NamespacedName;
use svcplane_proxy::sync_loop::{SyncObserver, SyncOutcome, SyncStatus};
use svcplane_proxy::{DesiredState, FamilyState, HealthCheck, SyncReport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// GET `path`; (status code, body), or the connection error.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await?;
    let code = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {raw:?}"));
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

async fn get_ok(addr: SocketAddr, path: &str) -> (u16, String) {
    get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"))
}

/// A port free right now on 127.0.0.1 (healthCheckNodePorts are fixed numbers).
fn free_port() -> u16 {
    std::net::TcpListener::bind((LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

fn checks(entries: &[(u16, &str, usize)]) -> BTreeMap<u16, HealthCheck> {
    entries
        .iter()
        .map(|&(port, name, n)| {
            (
                port,
                HealthCheck {
                    service: NamespacedName::new("ns", name),
                    local_endpoints: n,
                },
            )
        })
        .collect()
}

fn state(entries: &[(u16, &str, usize)]) -> Arc<DesiredState> {
    Arc::new(DesiredState {
        node_name: "node-a".into(),
        node_zone: None,
        v4: FamilyState::empty(IpFamily::V4),
        v6: FamilyState::empty(IpFamily::V6),
        health_checks: checks(entries),
    })
}

fn synced_status() -> SyncStatus {
    SyncStatus {
        last_success: Some(SystemTime::now()),
        successful_syncs: 1,
        synced_once: true,
        ..SyncStatus::default()
    }
}

/// Poll `f` until it returns true; false after 10 s (a bound for a hung server, not a speed check).
async fn eventually<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn healthz_livez_and_metrics() {
    let metrics = Arc::new(Metrics::new());
    let (status_tx, status_rx) = watch::channel(SyncStatus::default());
    let health = ProxyHealth::new(status_rx, Duration::from_secs(30));

    let hl = http::bind("--healthz-bind-address", (LOCALHOST, 0).into())
        .await
        .unwrap();
    let haddr = hl.local_addr().unwrap();
    tokio::spawn(http::serve(
        hl,
        http::healthz_router(metrics.clone(), health.clone()),
    ));
    let ml = http::bind("--metrics-bind-address", (LOCALHOST, 0).into())
        .await
        .unwrap();
    let maddr = ml.local_addr().unwrap();
    tokio::spawn(http::serve(
        ml,
        http::metrics_router(metrics.clone(), health),
    ));

    // Before the first sync: 503 with the reason.
    let (code, body) = get_ok(haddr, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["reason"], "no successful sync yet");
    assert_eq!(v["nodeEligible"], true);
    assert_eq!(get_ok(haddr, "/livez").await.0, 503);

    status_tx.send_replace(synced_status());
    let (code, body) = get_ok(haddr, "/healthz").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["lastUpdated"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(v.get("reason").is_none());
    assert_eq!(get_ok(haddr, "/livez").await.0, 200);
    assert_eq!(get_ok(haddr, "/nope").await.0, 404);

    // A change queued long ago and never applied: unhealthy.
    status_tx.send_modify(|s| s.oldest_pending = Some(SystemTime::now() - Duration::from_secs(61)));
    let (code, body) = get_ok(haddr, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not applied yet"), "{body}");

    let (code, text) = get_ok(maddr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(text.contains("# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram"));
    assert!(
        text.contains("kubeproxy_proxy_healthz_total{code=\"503\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("kubeproxy_proxy_healthz_total{code=\"200\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("kubeproxy_proxy_livez_total{code=\"200\"} 1"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"));
}

#[tokio::test]
async fn bind_error_names_flag_and_address() {
    let taken = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
    let addr = taken.local_addr().unwrap();
    let err = http::bind("--metrics-bind-address", addr)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("--metrics-bind-address") && msg.contains(&addr.to_string()),
        "{msg}"
    );
}

/// `0.0.0.0` serves both families, as Go's `net.Listen` does for kube-proxy's servers;
/// a specific address only itself.
#[tokio::test]
async fn unspecified_ipv4_listens_on_both_families() {
    let any = http::bind("--healthz-bind-address", (Ipv4Addr::UNSPECIFIED, 0).into())
        .await
        .unwrap();
    let port = any.local_addr().unwrap().port();
    for ip in [LOCALHOST, IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        TcpStream::connect((ip, port))
            .await
            .unwrap_or_else(|e| panic!("{ip} port {port}: {e}"));
    }
    let one = http::bind("--healthz-bind-address", (LOCALHOST, 0).into())
        .await
        .unwrap();
    let port = one.local_addr().unwrap().port();
    assert!(
        TcpStream::connect((Ipv6Addr::LOCALHOST, port))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn health_check_servers_follow_the_desired_state() {
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let mut servers = HealthCheckServers::new(LOCALHOST, None);
    let at = |p: u16| SocketAddr::new(LOCALHOST, p);

    let failed = servers
        .update(&checks(&[(p1, "web", 2), (p2, "db", 0)]))
        .await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(servers.ports(), {
        let mut v = vec![p1, p2];
        v.sort();
        v
    });
    let (code, body) = get_ok(at(p1), "/").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["service"]["namespace"], "ns");
    assert_eq!(v["service"]["name"], "web");
    assert_eq!(v["localEndpoints"], 2);
    assert_eq!(v["serviceProxyHealthy"], true);
    // Any path answers, as kube-proxy's.
    assert_eq!(get_ok(at(p1), "/healthz").await.0, 200);
    let (code, body) = get_ok(at(p2), "/").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"localEndpoints\":0"), "{body}");

    // p1 loses its local endpoints, p2 goes away, p3 appears.
    let failed = servers
        .update(&checks(&[(p1, "web", 0), (p3, "cache", 1)]))
        .await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(get_ok(at(p1), "/").await.0, 503);
    assert_eq!(get_ok(at(p3), "/").await.0, 200);
    assert!(
        eventually(|| async { get(at(p2), "/").await.is_err() }).await,
        "server on {p2} still answers after removal"
    );

    servers.update(&BTreeMap::new()).await;
    assert!(servers.ports().is_empty());
    assert!(eventually(|| async { get(at(p1), "/").await.is_err() }).await);
    assert!(eventually(|| async { get(at(p3), "/").await.is_err() }).await);
}

#[tokio::test]
async fn busy_port_is_reported_and_retried() {
    let taken = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut servers = HealthCheckServers::new(LOCALHOST, None);
    let failed = servers.update(&checks(&[(port, "web", 1)])).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, port);
    assert!(servers.ports().is_empty());
    drop(taken);
    let failed = servers.update(&checks(&[(port, "web", 1)])).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(get_ok(SocketAddr::new(LOCALHOST, port), "/").await.0, 200);
}

#[tokio::test]
async fn unhealthy_proxy_makes_services_unhealthy() {
    let port = free_port();
    let (status_tx, status_rx) = watch::channel(SyncStatus::default());
    let health = ProxyHealth::new(status_rx, Duration::from_secs(30));
    let mut servers = HealthCheckServers::new(LOCALHOST, Some(health));
    servers.update(&checks(&[(port, "web", 3)])).await;
    let addr = SocketAddr::new(LOCALHOST, port);
    let (code, body) = get_ok(addr, "/").await;
    assert_eq!(code, 503);
    assert!(body.contains("\"serviceProxyHealthy\":false"), "{body}");
    status_tx.send_replace(synced_status());
    assert_eq!(get_ok(addr, "/").await.0, 200);
}

fn outcome(ok: bool, desired: Arc<DesiredState>) -> SyncOutcome {
    SyncOutcome {
        duration: Duration::from_millis(1),
        full: true,
        result: if ok {
            Ok(SyncReport {
                full: true,
                ..SyncReport::default()
            })
        } else {
            Err("boom".into())
        },
        pending_services: 0,
        pending_endpoint_slices: 0,
        service_ports: 0,
        queued_since: None,
        trigger_times: Vec::new(),
        diff: svcplane_proxy::Diff::between(None, &desired, true),
        desired,
    }
}

#[tokio::test]
async fn run_follows_successful_syncs() {
    let (p1, p2) = (free_port(), free_port());
    let (recorder, applied) = SyncRecorder::new(Arc::new(Metrics::new()));
    let task = tokio::spawn(HealthCheckServers::new(LOCALHOST, None).run(applied));
    let at = |p: u16| SocketAddr::new(LOCALHOST, p);

    recorder.on_sync(&outcome(true, state(&[(p1, "web", 1)])));
    assert!(eventually(|| async { matches!(get(at(p1), "/").await, Ok((200, _))) }).await);

    // A failed sync changes nothing.
    recorder.on_sync(&outcome(false, state(&[(p2, "db", 1)])));
    tokio::task::yield_now().await;
    assert!(get(at(p2), "/").await.is_err());

    recorder.on_sync(&outcome(true, state(&[(p2, "db", 1)])));
    assert!(eventually(|| async { matches!(get(at(p2), "/").await, Ok((200, _))) }).await);
    assert!(eventually(|| async { get(at(p1), "/").await.is_err() }).await);

    // The recorder gone (the proxy stopping): the task ends and its servers close.
    drop(recorder);
    task.await.unwrap();
    assert!(eventually(|| async { get(at(p2), "/").await.is_err() }).await);
}

#[tokio::test]
async fn health_check_servers_on_the_unspecified_address_answer_both_families() {
    if std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_err() {
        eprintln!("SKIP: no IPv6 loopback on this host");
        return;
    }
    let port = free_port();
    let mut servers = HealthCheckServers::new(Ipv4Addr::UNSPECIFIED.into(), None);
    let failed = servers.update(&checks(&[(port, "web", 1)])).await;
    assert!(failed.is_empty(), "{failed:?}");
    // kube-proxy's Go listener on 0.0.0.0 serves IPv6 too: a dual-stack node's IPv6
    // load balancer must get an answer, not a refused connection.
    for ip in [LOCALHOST, IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        let (code, body) = get_ok(SocketAddr::new(ip, port), "/").await;
        assert_eq!(code, 200, "{ip}: {body}");
    }
}
