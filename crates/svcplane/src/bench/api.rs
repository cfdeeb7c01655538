//! `svcplane bench sync --source api`: the same generated objects served by the test
//! kit's fake Kubernetes API server (plain HTTP/1.1, the real list/watch protocol; a real
//! cluster is HTTPS), inside the bench's network namespace, and the proxy run with a
//! kubeconfig naming it. A round's change is the changing slice applied to the server.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use svcplane_source::kube::proxy_label_selector;
use svcplane_testkit::{ApiResource, FakeApiServer, Netns};

/// The resources the proxy lists, with their names in the report.
const LISTED: [(ApiResource, &str); 3] = [
    (ApiResource::Services, "services"),
    (ApiResource::EndpointSlices, "endpointslices"),
    (ApiResource::Nodes, "nodes"),
];

/// The fake API server of one bench run and the kubeconfig naming it.
pub(super) struct ApiFeed {
    server: FakeApiServer,
    kubeconfig: PathBuf,
    endpoints: u32,
}

impl ApiFeed {
    /// A server listening inside `ns` (where the proxy runs), holding `documents` (the
    /// manifests bench's YAML) and the proxy's Node `node`; its kubeconfig in `dir`.
    pub(super) fn start(
        ns: &Netns,
        dir: &Path,
        documents: &str,
        endpoints: u32,
        node: &str,
    ) -> Result<ApiFeed> {
        let listener = svcplane_testkit::in_netns(ns.name(), || TcpListener::bind("127.0.0.1:0"))
            .context("entering the bench namespace")?
            .context("binding the fake API server")?;
        let server = FakeApiServer::serve(listener).context("starting the fake API server")?;
        server
            .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))
            .context("adding the Node")?;
        for document in yaml_documents(documents) {
            server
                .apply(document?)
                .context("adding an object to the fake API server")?;
        }
        let kubeconfig = dir.join("kubeconfig");
        server
            .write_kubeconfig(&kubeconfig)
            .context("writing the kubeconfig")?;
        Ok(ApiFeed {
            server,
            kubeconfig,
            endpoints,
        })
    }

    pub(super) fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A round's change: the changing slice of round `round`, applied (MODIFIED).
    pub(super) fn apply_changing(&self, round: u32) -> Result<()> {
        let yaml = super::changing_slice_yaml(self.endpoints, round);
        for document in yaml_documents(&yaml) {
            self.server
                .apply(document?)
                .context("applying the change")?;
        }
        Ok(())
    }

    /// The server's own time to answer the proxy's two big lists (with its selector), each
    /// alone, as a client in `ns` sees it: so the proxy's list time can be told from the
    /// fake's.
    pub(super) fn time_lists(&self, ns: &Netns) -> Result<String> {
        let mut out = Vec::new();
        for (resource, name) in &LISTED[..2] {
            let target = format!(
                "{}?labelSelector={}&resourceVersion=0",
                resource.path(),
                proxy_label_selector().replace('!', "%21")
            );
            let started = Instant::now();
            let (status, body) = svcplane_testkit::http_get(
                ns.name(),
                self.server.addr(),
                &target,
                Duration::from_secs(60),
            )
            .with_context(|| format!("listing {name} from the fake API server"))?;
            if status != 200 {
                bail!("the fake API server answered {target} with {status}");
            }
            out.push(format!(
                "{name} {:.0} ms ({:.1} MB)",
                started.elapsed().as_secs_f64() * 1e3,
                body.len() as f64 / 1e6
            ));
        }
        Ok(out.join(", "))
    }

    /// How long after `started` the proxy opened its first watch of each resource: its
    /// list was answered, read and converted by then (kube's watcher starts the watch once
    /// the list's objects are consumed). The latest of the three, and each.
    pub(super) fn lists_done(&self, started: Instant) -> Result<(Duration, String)> {
        let requests = self.server.requests();
        let mut latest = Duration::ZERO;
        let mut each = Vec::new();
        for (resource, name) in LISTED {
            let watch = requests
                .iter()
                .find(|r| r.path == resource.path() && r.is_watch())
                .ok_or_else(|| anyhow!("the proxy never watched {name}"))?;
            let after = watch.at.saturating_duration_since(started);
            latest = latest.max(after);
            each.push(format!("{name} {:.2} s", after.as_secs_f64()));
        }
        Ok((latest, each.join(", ")))
    }
}

/// The `---`-separated YAML documents of `text` as JSON objects (what the fake serves).
fn yaml_documents(text: &str) -> impl Iterator<Item = Result<Value>> + '_ {
    text.split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_saphyr::from_str::<Value>(d).context("a generated YAML document"))
}
