//! `svcplane proxy --proxy-mode nftables` for real (as root, in a scratch network
//! namespace): it programs the example, follows manifest edits, leaves its rules in
//! place on SIGTERM, and `svcplane cleanup` removes them.
//! Real traffic through these rules is the nftables-mode issue's virtual cluster.

use std::path::Path;
use std::time::Duration;

use svcplane_testkit::{Daemon, Netns, run_checked, skip_unless_root, wait_until};

const WAIT: Duration = Duration::from_secs(20);

fn copy_example(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cluster");
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

fn table(ns: &Netns, family: &str) -> Option<String> {
    let out = ns
        .command("nft", &["list", "table", family, "svcplane"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn has(ns: &Netns, family: &str, needle: &str) -> bool {
    table(ns, family).is_some_and(|t| t.contains(needle))
}

#[test]
fn proxy_programs_follows_edits_and_cleans_up() {
    if skip_unless_root(&["nft", "ip"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    copy_example(dir.path());
    let ns = Netns::new("svcplane-proxy").unwrap();
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_svcplane"), &["proxy"]);
    cmd.args(["--proxy-mode", "nftables", "--hostname-override", "node-a"])
        .args(["--cluster-cidr", "10.244.0.0/16,fd00:244::/32"])
        .args([
            "--min-sync-period",
            "0s",
            "--metrics-bind-address",
            "127.0.0.1:0",
        ])
        .arg("--manifests")
        .arg(dir.path());
    let mut proxy = Daemon::spawn(cmd).unwrap();

    assert!(
        wait_until(WAIT, || has(&ns, "ip", "10.96.0.10")),
        "the web ClusterIP was never programmed: {:?}",
        table(&ns, "ip")
    );
    assert!(has(&ns, "ip6", "fd00:96::10"));
    assert!(
        !has(&ns, "ip", "10.96.0.99"),
        "the invalid service must not be programmed"
    );

    // A new Service in a new file reaches the kernel without a restart.
    std::fs::write(
        dir.path().join("new.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: late, namespace: demo}\nspec:\n  clusterIP: 10.96.5.5\n  ports: [{port: 80}]\n",
    )
    .unwrap();
    assert!(
        wait_until(WAIT, || has(&ns, "ip", "10.96.5.5")),
        "new service not programmed"
    );

    // A broken edit of services.yaml keeps everything that file defined.
    std::fs::write(dir.path().join("services.yaml"), "kind: [").unwrap();
    std::fs::remove_file(dir.path().join("new.yaml")).unwrap();
    assert!(
        wait_until(WAIT, || !has(&ns, "ip", "10.96.5.5")),
        "deleted service still programmed"
    );
    assert!(
        has(&ns, "ip", "10.96.0.10"),
        "a broken file must not remove its services"
    );
    assert!(proxy.is_running());

    // SIGTERM: the proxy exits cleanly and leaves the rules, as kube-proxy does.
    let status = proxy.terminate().unwrap();
    assert!(status.success(), "proxy exited with {status}");
    assert!(has(&ns, "ip", "10.96.0.10"));

    run_checked(&mut ns.command(
        env!("CARGO_BIN_EXE_svcplane"),
        &["cleanup", "--proxy-mode", "nftables"],
    ))
    .unwrap();
    assert!(table(&ns, "ip").is_none() && table(&ns, "ip6").is_none());
    // Cleanup is idempotent.
    let again = ns
        .command(env!("CARGO_BIN_EXE_svcplane"), &["cleanup"])
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}
