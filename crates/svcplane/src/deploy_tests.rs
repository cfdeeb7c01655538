//! deploy/'s manifests, checked against the real Kubernetes API types (k8s-openapi)
//! and against what svcplane itself needs: they are what users apply to replace
//! kube-proxy, and no cluster is available to try them on here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Every YAML document of every manifest in deploy/.
fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.expect("readable deploy/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/");
    for path in files {
        let text = std::fs::read_to_string(&path).expect("readable manifest");
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let file = file.unwrap_or_default();
        let parsed: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{file}: not valid YAML: {e}"));
        for doc in parsed.into_iter().filter(|d| !d.is_null()) {
            docs.push((file.clone(), doc));
        }
    }
    docs
}

/// Decodes `doc` as `T` and requires the round trip to give the document back:
/// k8s-openapi skips unknown fields, so a misspelt or misplaced field would
/// otherwise pass unnoticed (and be dropped by the API server's pruning).
fn strict<T: DeserializeOwned + serde::Serialize>(file: &str, doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: does not decode as its type: {e}"));
    let back = serde_json::to_value(&typed).expect("serializable");
    assert_eq!(
        &back, doc,
        "{file}: fields were lost decoding it as its k8s-openapi type (unknown or misplaced)"
    );
    typed
}

fn kind(doc: &Value) -> (&str, &str) {
    (
        doc["apiVersion"].as_str().unwrap_or(""),
        doc["kind"].as_str().unwrap_or(""),
    )
}

fn one<T: DeserializeOwned + serde::Serialize>(api_version: &str, wanted: &str) -> T {
    let docs = documents();
    let matching: Vec<_> = docs
        .iter()
        .filter(|(_, d)| kind(d) == (api_version, wanted))
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "expected exactly one {wanted} in deploy/"
    );
    let (file, doc) = matching[0];
    strict(file, doc)
}

#[test]
fn every_manifest_parses_as_its_api_type() {
    let docs = documents();
    for (file, doc) in &docs {
        match kind(doc) {
            ("apps/v1", "DaemonSet") => drop(strict::<DaemonSet>(file, doc)),
            ("v1", "ServiceAccount") => drop(strict::<ServiceAccount>(file, doc)),
            ("v1", "ConfigMap") => drop(strict::<ConfigMap>(file, doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                drop(strict::<ClusterRole>(file, doc))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                drop(strict::<ClusterRoleBinding>(file, doc))
            }
            other => panic!("{file}: unexpected object {other:?} in deploy/"),
        }
    }
    let kinds: BTreeSet<&str> = docs.iter().map(|(_, d)| kind(d).1).collect();
    let expected: BTreeSet<&str> = [
        "DaemonSet",
        "ServiceAccount",
        "ConfigMap",
        "ClusterRole",
        "ClusterRoleBinding",
    ]
    .into();
    assert_eq!(kinds, expected);
}

#[test]
fn the_strict_check_catches_a_misplaced_field() {
    // `hostNetwork` belongs in the pod spec, not the DaemonSet spec.
    let doc: Value = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "x"},
        "spec": {"hostNetwork": true, "selector": {}, "template": {}}
    });
    let result = std::panic::catch_unwind(|| strict::<DaemonSet>("inline", &doc));
    assert!(result.is_err(), "a misplaced field must not pass");
}

fn container<'a>(containers: &'a [Container], name: &str) -> &'a Container {
    containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn daemonset_is_a_node_critical_host_network_proxy() {
    let ds: DaemonSet = one("apps/v1", "DaemonSet");
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let spec = ds.spec.expect("spec");
    let strategy = spec.update_strategy.expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.expect("rollingUpdate");
    assert_eq!(
        rolling.max_unavailable,
        Some(IntOrString::String("10%".into()))
    );
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    // The node's resolver: cluster DNS is behind a ClusterIP this pod programs.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    // The service account's token and CA, which the kubeconfig names, are mounted.
    assert_ne!(pod.automount_service_account_token, Some(false));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // One toleration that matches every taint: operator Exists, no key, no effect.
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    assert_eq!(tolerations.len(), 1, "{tolerations:?}");
    let t = &tolerations[0];
    assert_eq!(t.operator.as_deref(), Some("Exists"));
    assert!(t.key.is_none() && t.effect.is_none() && t.value.is_none());

    let sa: ServiceAccount = one("v1", "ServiceAccount");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(sa.metadata.namespace.as_deref(), Some("kube-system"));

    let proxy = container(&pod.containers, "svcplane");
    let args = proxy.args.clone().unwrap_or_default();
    assert_eq!(args, ["proxy", "--config", "/var/lib/svcplane/config.conf"]);
    let env = proxy.env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(field, Some("spec.nodeName"));
    let security = proxy.security_context.as_ref().expect("securityContext");
    assert_eq!(security.privileged, Some(true));

    for (probe, path) in [
        (proxy.liveness_probe.as_ref(), "/livez"),
        (proxy.readiness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(10256));
    }

    // hostPath volumes: path, type, and where the proxy container mounts them.
    let volumes = pod.volumes.clone().unwrap_or_default();
    let mounts = proxy.volume_mounts.clone().unwrap_or_default();
    for (path, type_, read_only) in [
        ("/run/xtables.lock", "FileOrCreate", false),
        ("/lib/modules", "Directory", true),
        ("/sys/fs/bpf", "DirectoryOrCreate", false),
        ("/sys/fs/cgroup", "Directory", false),
    ] {
        let volume = volumes
            .iter()
            .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == path))
            .unwrap_or_else(|| panic!("no hostPath volume for {path}"));
        let host = volume.host_path.as_ref().expect("hostPath");
        assert_eq!(host.type_.as_deref(), Some(type_), "{path}");
        let mount = mounts
            .iter()
            .find(|m| m.name == volume.name)
            .unwrap_or_else(|| panic!("{path} is not mounted"));
        assert_eq!(mount.mount_path, path);
        assert_eq!(mount.read_only.unwrap_or(false), read_only, "{path}");
    }

    // The config volume is the ConfigMap, mounted where --config points.
    let cm: ConfigMap = one("v1", "ConfigMap");
    let config_volume = volumes
        .iter()
        .find(|v| v.config_map.is_some())
        .expect("a ConfigMap volume");
    assert_eq!(
        config_volume.config_map.as_ref().map(|c| c.name.clone()),
        cm.metadata.name.clone()
    );
    let config_mount = mounts
        .iter()
        .find(|m| m.name == config_volume.name)
        .expect("the ConfigMap is mounted");
    assert_eq!(config_mount.mount_path, "/var/lib/svcplane");
    assert!(cm.data.unwrap_or_default().contains_key("config.conf"));

    // The init container removes kube-proxy's leftovers only, never svcplane's rules.
    let init = pod.init_containers.clone().unwrap_or_default();
    let cleanup = container(&init, "cleanup-kube-proxy");
    // It reads the proxy's config (ipvs.excludeCIDRs: IPVS virtual servers there stay),
    // mounted where the proxy container has it.
    assert_eq!(
        cleanup.args.clone().unwrap_or_default(),
        [
            "cleanup",
            "--kube-proxy",
            "--config",
            "/var/lib/svcplane/config.conf"
        ]
    );
    assert_eq!(cleanup.image, proxy.image);
    let init_config_mount = cleanup
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == config_volume.name)
        .expect("the init container mounts the ConfigMap");
    assert_eq!(init_config_mount.mount_path, config_mount.mount_path);
}

#[test]
fn rbac_is_exactly_the_least_privilege_set() {
    let role: ClusterRole = one("rbac.authorization.k8s.io/v1", "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource, verbs) in [
        ("", "services", &["get", "list", "watch"][..]),
        ("", "nodes", &["get", "list", "watch"]),
        (
            "discovery.k8s.io",
            "endpointslices",
            &["get", "list", "watch"],
        ),
        ("", "events", &["create", "patch"]),
        ("events.k8s.io", "events", &["create", "patch"]),
    ] {
        for verb in verbs {
            expected.insert((group.to_string(), resource.to_string(), verb.to_string()));
        }
    }
    assert_eq!(granted, expected);

    let binding: ClusterRoleBinding = one("rbac.authorization.k8s.io/v1", "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(binding.role_ref.name.clone()), role.metadata.name);
    let sa: ServiceAccount = one("v1", "ServiceAccount");
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(subjects[0].name.clone()), sa.metadata.name);
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
}

#[test]
fn configmap_is_accepted_by_svcplanes_own_parser_without_warnings() {
    let cm: ConfigMap = one("v1", "ConfigMap");
    let data = cm.data.unwrap_or_default();
    let text = data.get("config.conf").expect("config.conf");
    let cfg = crate::config::parse_file_config(text).expect("svcplane accepts it");
    assert!(cfg.warnings.is_empty(), "warnings: {:?}", cfg.warnings);
    assert_eq!(cfg.mode.as_deref(), Some("nftables"));
    assert!(cfg.cluster_cidrs.is_some_and(|c| !c.is_empty()));
    assert_eq!(
        cfg.metrics_bind_address.map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:10249")
    );
    assert_eq!(
        cfg.healthz_bind_address.map(|a| a.to_string()).as_deref(),
        Some("0.0.0.0:10256")
    );
    // The ConfigMap's kubeconfig, where the DaemonSet mounts it (checked there).
    assert_eq!(
        cfg.kubeconfig.as_deref(),
        Some(Path::new("/var/lib/svcplane/kubeconfig.conf"))
    );
    assert!(data.contains_key("kubeconfig.conf"));
}

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const PLACEHOLDER: &str = "https://API-SERVER-ADDRESS.invalid:6443";

/// The ConfigMap's `kubeconfig.conf`.
fn deploy_kubeconfig() -> String {
    let cm: ConfigMap = one("v1", "ConfigMap");
    let data = cm.data.unwrap_or_default();
    data.get("kubeconfig.conf")
        .expect("kubeconfig.conf")
        .clone()
}

#[test]
fn kubeconfig_is_kubeadms_shape_with_the_service_account_and_a_placeholder_server() {
    let text = deploy_kubeconfig();
    let kc: Value = serde_saphyr::from_str(&text).expect("kubeconfig.conf is YAML");
    assert_eq!(kc["kind"], "Config");
    let current = kc["current-context"].as_str().expect("current-context");
    let context = kc["contexts"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == current))
        .expect("the current context");
    let cluster = kc["clusters"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["name"] == context["context"]["cluster"])
        })
        .expect("its cluster");
    let user = kc["users"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["name"] == context["context"]["user"]))
        .expect("its user");
    assert_eq!(cluster["cluster"]["server"], PLACEHOLDER);
    assert_eq!(
        cluster["cluster"]["certificate-authority"],
        format!("{SA_DIR}/ca.crt")
    );
    assert_eq!(user["user"]["tokenFile"], format!("{SA_DIR}/token"));
}

/// The API client options `svcplane proxy --config` resolves from the ConfigMap's
/// config.conf, its kubeconfig being at `kubeconfig` instead of the mount path.
fn options_from_the_configmap(kubeconfig: &Path) -> svcplane_source::ApiClientOptions {
    let cm: ConfigMap = one("v1", "ConfigMap");
    let data = cm.data.unwrap_or_default();
    let text = data.get("config.conf").expect("config.conf").replace(
        "/var/lib/svcplane/kubeconfig.conf",
        kubeconfig.to_str().expect("UTF-8 temp path"),
    );
    let config_path = kubeconfig.with_file_name("config.conf");
    std::fs::write(&config_path, text).expect("write config.conf");
    let engine = crate::settings::EngineSettings::resolve(&crate::cli::EngineArgs {
        hostname_override: Some("node-a".into()),
        config: Some(config_path),
        ..crate::cli::EngineArgs::default()
    })
    .expect("the ConfigMap's config.conf");
    let api = crate::cli::ApiArgs::default();
    match crate::commands::object_source_with(&engine, &api, true) {
        Ok(crate::commands::ObjectSource::Api(o)) => o,
        other => panic!("not the API source: {other:?}"),
    }
}

/// The ConfigMap's kubeconfig in `dir`, with the service account's files (`token`
/// holding `token`, a CA) in `dir/sa` and the server replaced by `server` if given.
fn write_deploy_kubeconfig(dir: &Path, token: &str, server: Option<&str>) -> PathBuf {
    let sa = dir.join("sa");
    std::fs::create_dir_all(&sa).expect("mkdir");
    std::fs::write(sa.join("ca.crt"), TEST_CA).expect("ca.crt");
    std::fs::write(sa.join("token"), token).expect("token");
    let mut text = deploy_kubeconfig().replace(SA_DIR, sa.to_str().expect("UTF-8"));
    if let Some(server) = server {
        text = text.replace(PLACEHOLDER, server);
    }
    let path = dir.join("kubeconfig.conf");
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn the_filled_in_kubeconfig_reaches_the_api_with_the_service_account_token() {
    let server = svcplane_testkit::FakeApiServer::start().expect("fake API server");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_deploy_kubeconfig(dir.path(), "sa-t0ken", Some(&server.url()));
    let options = options_from_the_configmap(&kubeconfig);
    assert_eq!(options.kubeconfig.as_deref(), Some(kubeconfig.as_path()));
    runtime().block_on(async {
        let config = svcplane_source::api_config(&options)
            .await
            .expect("the kubeconfig loads");
        let client = svcplane_source::client_from_config(config, &options).expect("a client");
        let source = Box::new(svcplane_source::KubeSource::new(client, "node-a"));
        let status = source.status();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let problems: svcplane_source::ProblemSink = std::sync::Arc::new(|_| {});
        let task = tokio::spawn(svcplane_source::Source::run(source, tx, problems));
        // Nothing to list: the first batch is empty, then Synced.
        let synced = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while let Some(event) = rx.recv().await {
                if matches!(event, svcplane_model::SourceEvent::Synced) {
                    return true;
                }
            }
            false
        });
        assert_eq!(
            synced.await.ok(),
            Some(true),
            "the source never synced: {:?}",
            *status.borrow()
        );
        task.abort();
    });
    let requests = server.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        // The token file's content. (kube's client, unlike client-go, does not trim a
        // trailing newline; the kubelet's projected token has none.)
        assert_eq!(r.authorization.as_deref(), Some("Bearer sa-t0ken"), "{r:?}");
    }
}

#[test]
fn an_unfilled_placeholder_is_an_error_naming_the_field_and_the_advice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_deploy_kubeconfig(dir.path(), "t0ken", None);
    let options = options_from_the_configmap(&kubeconfig);
    let err = runtime()
        .block_on(svcplane_source::api_config(&options))
        .expect_err("the placeholder must not be used")
        .to_string();
    for part in [
        kubeconfig.to_str().expect("UTF-8"),
        "the server of cluster \"default\"",
        "API-SERVER-ADDRESS.invalid",
        "placeholder",
        "kubectl config view --minify",
        "Running in a cluster: replacing kube-proxy",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
}

/// A self-signed CA (the service account's `ca.crt` stand-in): kube parses it at load.
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBjjCCATOgAwIBAgIUA5L7QKfApnkKjsPCz5J0bPE+EgUwCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQc3ZjcGxhbmUtdGVzdC1jYTAgFw0yNjEyMDYwOTUzMzJaGA8y
MTI2MTExMjA5NTMzMlowGzEZMBcGA1UEAwwQc3ZjcGxhbmUtdGVzdC1jYTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABAxLuPxzbx4d9Wh9hHY01O13NtNqpIzbu9a5
yR7xgrfW99dv3rWcVx/VgEh/k/0z3mTtZf6aMN3/70iXiFO5JX6jUzBRMB0GA1Ud
DgQWBBSoBXeV4CN6D26kVpzXb8A6NMZfRTAfBgNVHSMEGDAWgBSoBXeV4CN6D26k
VpzXb8A6NMZfRTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQCu
fCyi85CWZwzLdpMCbMaEjLDLU2+1+ImGWSY+YBbFbgIhALVRnb6AWGoDdULqPccQ
gmttn/TKusa0iIuUJbdz6IU9
-----END CERTIFICATE-----
";

#[test]
fn dockerfile_builds_with_the_workspace_toolchain_and_lock_file() {
    let dockerfile =
        std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("deploy/Dockerfile");
    let workspace =
        std::fs::read_to_string(deploy_dir().join("../Cargo.toml")).expect("Cargo.toml");
    let rust_version = workspace
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .expect("workspace rust-version");
    assert!(
        dockerfile.contains(&format!("FROM rust:{rust_version}-bookworm AS build")),
        "the builder image must be the workspace's rust-version ({rust_version})"
    );
    assert!(dockerfile.contains("cargo build --release --locked -p svcplane"));
    assert!(dockerfile.contains("FROM debian:bookworm-slim"));
    for package in ["nftables", "iptables", "conntrack"] {
        assert!(
            dockerfile.contains(package),
            "runtime image lacks {package}"
        );
    }
}
