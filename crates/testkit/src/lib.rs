//! The netns test kit: what root tests and the lab use to get real kernel state
//! without touching the host's. Every namespace is uniquely named per process and
//! per call, and is deleted when its guard drops, even when a test panics.
//!
//! - [`Netns`], [`Daemon`], [`wait_until`], [`skip_unless_root`]: the building blocks.
//! - [`Cluster`]: a virtual cluster (bridge, nodes, pods with echo servers, an external
//!   client) for real-traffic tests, with [`Cluster::run_proxy`] to run `svcplane proxy`
//!   on a node and [`Cluster::manifests`] to write matching manifests.
//! - [`tcp_request`] / [`udp_request`] / [`udp_request_bound`] / [`EchoServer`]: sockets
//!   inside any namespace.

mod cgroup;
mod cluster;
pub mod fake_apiserver;
mod net;

pub use cgroup::{Cgroup, CgroupMember, bpf_test_mounts, cgroup2_mount, in_cgroup};
pub use cluster::{
    CLIENT_V4, CLIENT_V6, CLUSTER_CIDR, Client, Cluster, ClusterBuilder, ClusterPlan, Manifests,
    Node, PlannedNode, PlannedPod, Pod, PodSpec, ProxyHandle, ProxyLaunch, SERVICE_CIDRS,
    metric_value, parse_echo,
};
pub use fake_apiserver::{ApiRequest, ApiResource, FakeApiServer};
pub use net::{
    EchoReply, EchoServer, Proto, RequestError, http_get, in_netns, tcp_request, udp_request,
    udp_request_bound,
};

use std::io;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// True when running as root (effective uid 0), read from /proc so no libc binding is needed.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// For root tests: `Some(reason)` when the test must skip (not root, or a tool is missing).
/// Prints the reason so the skip is visible in test output.
pub fn skip_unless_root(tools: &[&str]) -> bool {
    if !is_root() {
        eprintln!("SKIP: this test needs root (network namespaces); CI runs as root");
        return true;
    }
    for tool in tools {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            eprintln!("SKIP: `{tool}` is not installed (make deps installs it)");
            return true;
        }
    }
    false
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A scratch network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create `<prefix>-<pid>-<n>`; the prefix says which test owns it.
    pub fn new(prefix: &str) -> io::Result<Netns> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        // Loopback up, so local services in the namespace work.
        run_checked(&mut ns.command("ip", &["link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// The namespace's name (under /run/netns).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs inside the namespace (`ip netns exec NAME PROGRAM ARGS`).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        cmd
    }

    /// Run a program in the namespace with `stdin` fed to it; returns its output.
    pub fn run_with_input(&self, program: &str, args: &[&str], stdin: &str) -> io::Result<Output> {
        use std::io::Write;
        let mut child = self
            .command(program, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes())?;
        }
        child.wait_with_output()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Run a command; an error carrying its stderr when it fails.
pub fn run_checked(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_is_created_and_removed() {
        if skip_unless_root(&["ip"]) {
            return;
        }
        let name = {
            let ns = Netns::new("svcplane-kit").unwrap();
            let out = run_checked(&mut ns.command("ip", &["-o", "link", "show", "lo"])).unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).contains("UP"));
            ns.name().to_string()
        };
        let list = run_checked(Command::new("ip").args(["netns", "list"])).unwrap();
        assert!(!String::from_utf8_lossy(&list.stdout).contains(&name));
    }
}

/// A background process (e.g. `svcplane proxy` in a namespace), killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Option<std::process::Child>,
}

impl Daemon {
    /// Spawn `cmd` (stdin closed; stdout and stderr inherited, so test output shows them).
    pub fn spawn(mut cmd: Command) -> io::Result<Daemon> {
        let child = cmd.stdin(Stdio::null()).spawn()?;
        Ok(Daemon { child: Some(child) })
    }

    /// Its process id, while not yet stopped.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(mut self) -> io::Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| io::Error::other("already stopped"))?;
        run_checked(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
        child.wait()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Poll `check` every 50 ms until it returns true or `timeout` passes. Waiting is not
/// asserting on speed: the timeout only bounds how long a broken test hangs.
pub fn wait_until(timeout: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
