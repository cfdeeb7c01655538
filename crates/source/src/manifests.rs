//! The manifests directory: every `*.yaml`, `*.yml` and `*.json` file directly in it,
//! not in subdirectories (as `kubectl apply -f DIR` without `-R`; a ConfigMap volume is
//! flat too). Symlinks are followed, so a ConfigMap volume's `..data` swap works; hidden
//! files (`.*`, which covers vim's `.x.swp` and the ConfigMap `..data` machinery) and
//! editor backups (`*~`, `*.swp`) are skipped.
//!
//! The directory (not each file) is watched with notify, so rename-over and symlink
//! swaps are seen. Events are debounced; then only files that an event named or whose
//! on-disk version (device, inode, mtime, size) changed are read again, or every file
//! after an overflow/rescan event.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use svcplane_model::{
    Change, EndpointSlice, Format, Kind, NamespacedName, Node, Object, ObjectKey, Pod, Service,
    SourceEvent, parse_manifest,
};

use crate::allocator::{self, AllocatorConfig, Outcome};
use crate::endpointslice_controller::derive_endpoint_slices;
use crate::{IGNORED, Problem, ProblemSink, Source, SourceError, SourceFuture};

const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// How often to look for a watched directory that was removed.
const DIRECTORY_RETRY: Duration = Duration::from_secs(1);

/// What identifies one version of a file on disk (a rename-over changes the inode,
/// an in-place write the mtime or size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

/// Which files a reload reads again, besides those whose on-disk version changed.
#[derive(Debug, Default)]
enum Reread {
    /// Only changed versions (the first load reads everything anyway).
    #[default]
    Changed,
    /// Also these file names, which events named: a quick same-size rewrite can keep
    /// the coarse mtime.
    Named(BTreeSet<OsString>),
    /// Every file: the watcher lost events (inotify queue overflow) or asked for a rescan.
    All,
}

impl Reread {
    fn includes(&self, path: &Path) -> bool {
        match self {
            Reread::Changed => false,
            Reread::Named(names) => path.file_name().is_some_and(|n| names.contains(n)),
            Reread::All => true,
        }
    }

    fn add(&mut self, wake: Wake) {
        match (std::mem::take(self), wake) {
            (Reread::All, _) | (_, Wake::Rescan) => *self = Reread::All,
            (Reread::Changed, Wake::Paths(paths)) => {
                *self = Reread::Named(file_names(paths).collect())
            }
            (Reread::Named(mut names), Wake::Paths(paths)) => {
                names.extend(file_names(paths));
                *self = Reread::Named(names);
            }
        }
    }
}

/// What the notify callback tells the async side.
#[derive(Debug, Clone)]
enum Wake {
    Paths(Vec<PathBuf>),
    Rescan,
}

impl Wake {
    /// `None` for events that change nothing on disk: notify reports opens and reads
    /// too, and reloading on those would make every reload (which opens the files)
    /// trigger the next one.
    fn from_event(event: notify::Result<notify::Event>) -> Option<Wake> {
        use notify::event::{AccessKind, AccessMode, EventKind};
        match event {
            Ok(e) if e.need_rescan() => Some(Wake::Rescan),
            Ok(e) => match e.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                    Some(Wake::Paths(e.paths))
                }
                EventKind::Access(_) => None,
                _ => Some(Wake::Paths(e.paths)),
            },
            // An error (e.g. a queue overflow): events may be lost.
            Err(_) => Some(Wake::Rescan),
        }
    }
}

/// Events name paths as the watcher saw them (possibly canonicalised); the directory
/// is flat, so the file name identifies the file.
fn file_names(paths: Vec<PathBuf>) -> impl Iterator<Item = OsString> {
    paths
        .into_iter()
        .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
}

#[derive(Debug, Default)]
struct FileState {
    version: Option<FileVersion>,
    /// Shared with `emitted`: a reload clones only pointers, and an object of an unchanged
    /// file is recognised as unchanged by pointer (10k services would otherwise cost
    /// ~100 ms of deep copies and comparisons per change).
    objects: BTreeMap<ObjectKey, Arc<Object>>,
}

/// The manifests directory as a [`Source`]: watched (see the module docs), with the
/// standalone EndpointSlice controller run over the whole object set after each reload.
/// Pods are consumed by that controller and not forwarded.
pub struct ManifestSource {
    dir: PathBuf,
    debounce: Duration,
    files: BTreeMap<PathBuf, FileState>,
    /// What the engine has been sent, to send only differences.
    emitted: BTreeMap<ObjectKey, Arc<Object>>,
    /// Conflicts already reported, so an unchanged conflict is not reported on every reload.
    reported_conflicts: BTreeSet<String>,
    /// What a Service without clusterIP or nodePort is given (the API server's job).
    allocator: AllocatorConfig,
    /// What was allocated per Service, to log each allocation once (and when it moves).
    allocated: BTreeMap<NamespacedName, String>,
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestSource {
            dir: dir.into(),
            debounce: DEFAULT_DEBOUNCE,
            files: BTreeMap::new(),
            emitted: BTreeMap::new(),
            reported_conflicts: BTreeSet::new(),
            allocator: AllocatorConfig::default(),
            allocated: BTreeMap::new(),
        }
    }

    /// The ranges ClusterIPs and nodePorts are allocated from (default: no ClusterIP
    /// range, kube-apiserver's node-port range).
    pub fn allocator(mut self, config: AllocatorConfig) -> Self {
        self.allocator = config;
        self
    }

    /// How long to collect file events before reloading.
    pub fn debounce(mut self, d: Duration) -> Self {
        self.debounce = d;
        self
    }

    /// Load the directory once: the full object set after the EndpointSlice controller
    /// (as `Change::Apply`s in key order) and the problems found. Used by `svcplane render`.
    /// Called again, it returns only the differences since the previous call.
    pub fn load_once(&mut self) -> Result<(Vec<Change>, Vec<Problem>), SourceError> {
        let mut problems = Vec::new();
        let changes = self.reload(&Reread::Changed, &mut problems)?;
        Ok((changes, problems))
    }

    /// Re-read what changed on disk (and what `reread` names) and return the changes
    /// against what was emitted.
    fn reload(
        &mut self,
        reread: &Reread,
        problems: &mut Vec<Problem>,
    ) -> Result<Vec<Change>, SourceError> {
        let present = list_manifest_files(&self.dir)?;
        self.files.retain(|path, _| present.contains_key(path));
        for (path, version) in present {
            let state = self.files.entry(path.clone()).or_default();
            if state.version == Some(version) && !reread.includes(&path) {
                continue;
            }
            load_file(&path, version, state, problems);
        }
        let mut conflicts = Vec::new();
        let mut desired = self.merged_objects(&mut conflicts);
        self.allocate(&mut desired, &mut conflicts);
        // Report a conflict when it appears, not again on every later reload.
        let current: BTreeSet<String> = conflicts.iter().map(|p| p.to_string()).collect();
        problems.extend(
            conflicts
                .into_iter()
                .filter(|p| !self.reported_conflicts.contains(&p.to_string())),
        );
        self.reported_conflicts = current;
        Ok(self.diff_against_emitted(desired))
    }

    /// All files' objects (a key defined twice: the later file in path order wins), with
    /// derived EndpointSlices added and Pods left out (the engine does not use them).
    /// Conflicts go to `conflicts`.
    fn merged_objects(&self, conflicts: &mut Vec<Problem>) -> BTreeMap<ObjectKey, Arc<Object>> {
        let mut merged: BTreeMap<ObjectKey, (&Path, &Arc<Object>)> = BTreeMap::new();
        for (path, state) in &self.files {
            for (key, obj) in &state.objects {
                if let Some((first, _)) = merged.insert(key.clone(), (path, obj)) {
                    conflicts.push(Problem {
                        file: Some(path.clone()),
                        message: format!(
                            "{key} is also defined in {}; using this file's (the later path wins)",
                            first.display()
                        ),
                    });
                }
            }
        }
        let mut services: Vec<&Service> = Vec::new();
        let mut slices: Vec<&EndpointSlice> = Vec::new();
        let mut pods: Vec<&Pod> = Vec::new();
        let mut nodes: BTreeMap<String, &Node> = BTreeMap::new();
        for (_, obj) in merged.values() {
            match obj.as_ref() {
                Object::Service(s) => services.push(s),
                Object::EndpointSlice(s) => slices.push(s),
                Object::Pod(p) => pods.push(p),
                Object::Node(n) => {
                    nodes.insert(n.name.clone(), n);
                }
            }
        }
        let derived = derive_endpoint_slices(services, slices, &pods, &nodes);
        let mut out: BTreeMap<ObjectKey, Arc<Object>> = merged
            .iter()
            .filter(|(key, _)| key.kind != Kind::Pod)
            .map(|(key, (_, obj))| (key.clone(), Arc::clone(obj)))
            .collect();
        for slice in derived {
            let service = slice.service_name.clone().unwrap_or_default();
            let obj = Object::EndpointSlice(slice);
            let key = obj.key();
            if let Some((path, _)) = merged.get(&key) {
                // A manifest slice already has the derived name: what the user wrote wins.
                conflicts.push(Problem {
                    file: Some(path.to_path_buf()),
                    message: format!(
                        "{key} has the name of a slice derived for Service {}/{service}; \
                         keeping the manifest's slice instead",
                        key.name.namespace
                    ),
                });
                continue;
            }
            out.insert(key, Arc::new(obj));
        }
        out
    }

    /// Fill in what the manifests left to the API server (see [`crate::allocator`]);
    /// a Service that cannot get it is dropped and reported. Each allocation is logged
    /// once, and again when it changes.
    fn allocate(
        &mut self,
        desired: &mut BTreeMap<ObjectKey, Arc<Object>>,
        problems: &mut Vec<Problem>,
    ) {
        let services: Vec<&Service> = desired
            .values()
            .filter_map(|o| match o.as_ref() {
                Object::Service(s) => Some(s),
                _ => None,
            })
            .collect();
        let outcomes = allocator::allocate(&self.allocator, &services);
        let mut allocated = BTreeMap::new();
        for (name, outcome) in outcomes {
            let key = ObjectKey {
                kind: Kind::Service,
                name: name.clone(),
            };
            let (service, notes) = match outcome {
                Outcome::Allocated(s, notes) => (s, notes),
                Outcome::Partial(s, notes, e) => {
                    problems.push(Problem {
                        file: None,
                        message: format!("{e}; {IGNORED}"),
                    });
                    (s, notes)
                }
                Outcome::Failed(e) => {
                    problems.push(Problem {
                        file: None,
                        message: format!("{e}; skipped"),
                    });
                    desired.remove(&key);
                    continue;
                }
            };
            if !notes.is_empty() && self.allocated.get(&name) != Some(&notes) {
                let verb = if self.allocated.contains_key(&name) {
                    "reallocated"
                } else {
                    "allocated"
                };
                tracing::info!("Service {name}: {verb} {notes}");
            }
            allocated.insert(name, notes);
            desired.insert(key, Arc::new(Object::Service(*service)));
        }
        self.allocated = allocated;
    }

    fn diff_against_emitted(&mut self, desired: BTreeMap<ObjectKey, Arc<Object>>) -> Vec<Change> {
        let mut changes = Vec::new();
        for key in self.emitted.keys() {
            if !desired.contains_key(key) {
                changes.push(Change::Delete(key.clone()));
            }
        }
        for (key, obj) in &desired {
            match self.emitted.get(key) {
                Some(old) if Arc::ptr_eq(old, obj) || old == obj => {}
                _ => changes.push(Change::Apply(Object::clone(obj))),
            }
        }
        self.emitted = desired;
        changes
    }

    async fn watch(
        mut self,
        tx: tokio::sync::mpsc::Sender<SourceEvent>,
        problems: ProblemSink,
    ) -> Result<(), SourceError> {
        // A missing or unreadable directory is a clear error naming it, before notify's.
        list_manifest_files(&self.dir)?;
        let (wake_tx, mut wake_rx) = tokio::sync::mpsc::unbounded_channel::<Wake>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Reload compares file versions, so a spurious wake-up costs only a listing.
                if let Some(wake) = Wake::from_event(event) {
                    let _ = wake_tx.send(wake);
                }
            })
            .map_err(|e| self.watch_error(e))?;
        // Watched before the first load, so no change between the two is missed.
        watcher
            .watch(&self.dir, RecursiveMode::NonRecursive)
            .map_err(|e| self.watch_error(e))?;

        let report = |found: Vec<Problem>| {
            for p in &found {
                tracing::warn!("{p}");
                problems(p);
            }
        };
        let mut found = Vec::new();
        let initial = self.reload(&Reread::Changed, &mut found)?;
        report(found);
        if tx.send(SourceEvent::Changes(initial)).await.is_err()
            || tx.send(SourceEvent::Synced).await.is_err()
        {
            return Ok(());
        }
        // Which directory the watch is on; `None` once it is gone (removed, or replaced:
        // the watch stays with the old one), until it can be watched again.
        let mut watched = dir_identity(&self.dir);
        let mut last_watch_error = None;
        loop {
            let first = tokio::select! {
                wake = wake_rx.recv() => match wake {
                    Some(wake) => Some(wake),
                    // The watcher is gone (it lives in this function, so this does not happen).
                    None => return Ok(()),
                },
                () = tx.closed() => return Ok(()),
                // No events come from a lost directory: look for it again now and then.
                () = tokio::time::sleep(DIRECTORY_RETRY), if watched.is_none() => None,
            };
            let mut reread = Reread::Changed;
            if let Some(first) = &first {
                // Debounce: an editor's save or a ConfigMap swap is several events.
                reread.add(first.clone());
                tokio::time::sleep(self.debounce).await;
            }
            while let Ok(more) = wake_rx.try_recv() {
                reread.add(more);
            }
            let mut found = Vec::new();
            let current = dir_identity(&self.dir);
            if current != watched {
                let _ = watcher.unwatch(&self.dir);
                watched = None;
                if current.is_some() {
                    match watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
                        Ok(()) => {
                            tracing::info!(
                                dir = %self.dir.display(),
                                "watching the manifests directory again"
                            );
                            watched = current;
                            last_watch_error = None;
                        }
                        Err(e) => {
                            let message = self.watch_error(e).to_string();
                            if last_watch_error.as_ref() != Some(&message) {
                                found.push(Problem {
                                    file: None,
                                    message: message.clone(),
                                });
                                last_watch_error = Some(message);
                            }
                        }
                    }
                }
                // Events were missed while the watch was on the old directory.
                reread.add(Wake::Rescan);
            } else if first.is_none() {
                // A retry tick, and the directory is still missing: already reported.
                continue;
            }
            let changes = match self.reload(&reread, &mut found) {
                Ok(c) => c,
                Err(err) => {
                    // The directory itself vanished or became unreadable: keep what was loaded.
                    found.push(Problem {
                        file: None,
                        message: format!("{err}; keeping the objects loaded before"),
                    });
                    Vec::new()
                }
            };
            report(found);
            if !changes.is_empty() {
                tracing::debug!(changes = changes.len(), "manifests changed");
                if tx.send(SourceEvent::Changes(changes)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }

    fn watch_error(&self, e: notify::Error) -> SourceError {
        SourceError::Watch {
            path: self.dir.clone(),
            message: e.to_string(),
        }
    }
}

impl Source for ManifestSource {
    fn run(
        self: Box<Self>,
        tx: tokio::sync::mpsc::Sender<SourceEvent>,
        problems: ProblemSink,
    ) -> SourceFuture {
        Box::pin((*self).watch(tx, problems))
    }
}

/// Which directory `dir` names now (symlinks followed); `None` when it is gone.
fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

/// Manifest files directly in `dir`, with their on-disk versions.
fn list_manifest_files(dir: &Path) -> Result<BTreeMap<PathBuf, FileVersion>, SourceError> {
    let read_err = |source| SourceError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.')
            || name.ends_with('~')
            || name.ends_with(".swp")
            || Format::from_path(&path).is_none()
        {
            continue;
        }
        // metadata() follows symlinks: a ConfigMap mount's `x.yaml -> ..data/x.yaml`.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        files.insert(
            path,
            FileVersion {
                dev: meta.dev(),
                ino: meta.ino(),
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
                len: meta.len(),
            },
        );
    }
    Ok(files)
}

/// Read one file into `state`. A file that does not parse keeps its previous objects; an
/// object that became invalid keeps its previous valid version (nothing that worked is lost).
fn load_file(
    path: &Path,
    version: FileVersion,
    state: &mut FileState,
    problems: &mut Vec<Problem>,
) {
    let problem = |message: String| Problem {
        file: Some(path.to_path_buf()),
        message,
    };
    let Some(format) = Format::from_path(path) else {
        return;
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            problems.push(problem(format!(
                "cannot read: {e}; keeping its previous objects"
            )));
            return;
        }
    };
    let parsed = match parse_manifest(&text, format) {
        Ok(p) => p,
        Err(e) => {
            problems.push(problem(format!("{e}; keeping its previous objects")));
            // Remember the version so an unchanged broken file is not re-reported each wake-up.
            state.version = Some(version);
            return;
        }
    };
    let mut objects: BTreeMap<ObjectKey, Arc<Object>> = BTreeMap::new();
    for obj in parsed.objects {
        let key = obj.key();
        if objects.insert(key.clone(), Arc::new(obj)).is_some() {
            problems.push(problem(format!(
                "{key} is defined twice in this file; the later document wins"
            )));
        }
    }
    // Kinds the proxy does not read (a Deployment next to its Service, as people keep
    // them): a note, not a problem, so they count as no invalid object.
    for kind in &parsed.ignored {
        tracing::info!(
            "{}: {kind}: not a kind svcplane reads (Services, EndpointSlices, Nodes, Pods); skipped",
            path.display()
        );
    }
    for warning in parsed.warnings {
        problems.push(problem(format!("{warning}; {IGNORED}")));
    }
    for invalid in parsed.invalid {
        let previous = state
            .objects
            .iter()
            .find(|(key, _)| key.kind == invalid.kind && key.name.to_string() == invalid.object);
        match previous {
            Some((key, obj)) if !objects.contains_key(key) => {
                problems.push(problem(format!(
                    "{invalid}; keeping its previous valid version"
                )));
                objects.insert(key.clone(), Arc::clone(obj));
            }
            _ => problems.push(problem(format!("{invalid}; skipped"))),
        }
    }
    state.objects = objects;
    state.version = Some(version);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use svcplane_model::NamespacedName;

    fn svc_yaml(name: &str, ip: &str, port: u32) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: {port}}}]\n"
        )
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            kind: Kind::Service,
            name: NamespacedName::new("demo", name),
        }
    }

    fn applied_port(changes: &[Change], name: &str) -> Option<u16> {
        changes.iter().find_map(|c| match c {
            Change::Apply(Object::Service(s)) if s.name.name == name => Some(s.ports[0].port),
            _ => None,
        })
    }

    #[test]
    fn load_once_reports_problems_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), svc_yaml("a", "10.96.0.1", 80)).unwrap();
        std::fs::write(
            dir.path().join("bad.yaml"),
            svc_yaml("bad", "10.96.0.2", 70000),
        )
        .unwrap();
        std::fs::write(dir.path().join("broken.json"), "{ not json").unwrap();
        std::fs::write(
            dir.path().join(".hidden.yaml"),
            svc_yaml("hidden", "10.96.0.3", 80),
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
        let (changes, problems) = ManifestSource::new(dir.path()).load_once().unwrap();
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(applied_port(&changes, "a"), Some(80));
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(
            text.iter().any(|p| p.contains("bad.yaml")
                && p.contains("demo/bad")
                && p.contains("spec.ports[0].port")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|p| p.contains("broken.json") && p.contains("line 1")),
            "{text:?}"
        );
    }

    /// As `kubectl expose` writes them: allocated (ClusterIP from the given range, a
    /// nodePort from the default one), the same on a second source (a restart); a Service
    /// that cannot be allocated is reported once and skipped, the others stay; other
    /// kinds are skipped without a problem.
    #[test]
    fn services_without_cluster_ip_or_node_port_are_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let exposed = |name: &str, extra: &str| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
                 spec:\n  selector: {{app: web}}\n  ports: [{{port: 80, targetPort: 8080}}]\n{extra}"
            )
        };
        let text = exposed("web", "")
            + &exposed("np", "  type: NodePort\n")
            + &exposed("v6", "  ipFamilies: [IPv6]\n")
            + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: demo}\n";
        std::fs::write(dir.path().join("svc.yaml"), text).unwrap();
        let config = AllocatorConfig {
            cluster_ip_ranges: allocator::parse_service_cluster_ip_range("10.96.0.0/16").unwrap(),
            ..AllocatorConfig::default()
        };
        let load = || {
            ManifestSource::new(dir.path())
                .allocator(config.clone())
                .load_once()
                .unwrap()
        };
        let (changes, problems) = load();
        let services: BTreeMap<String, Service> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Apply(Object::Service(s)) => Some((s.name.name.clone(), s.clone())),
                _ => None,
            })
            .collect();
        let net: ipnet::IpNet = "10.96.0.0/16".parse().unwrap();
        assert!(net.contains(&services["web"].cluster_ips[0]));
        assert_ne!(services["web"].cluster_ips, services["np"].cluster_ips);
        let node_port = services["np"].ports[0].node_port.unwrap();
        assert!((30000..=32767).contains(&node_port));
        // No IPv6 range: that one is reported and skipped, once.
        assert!(!services.contains_key("v6"));
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 1, "{text:?}");
        assert!(
            text[0].starts_with("Service demo/v6: spec.ipFamilies[0]")
                && text[0].ends_with("skipped"),
            "{text:?}"
        );
        // A restart allocates the same.
        let (again, _) = load();
        assert_eq!(again, changes);
        // Without a range: every Service lacking a clusterIP is reported, none applied.
        let (changes, problems) = ManifestSource::new(dir.path()).load_once().unwrap();
        assert!(
            changes
                .iter()
                .all(|c| !matches!(c, Change::Apply(Object::Service(_)))),
            "{changes:?}"
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    /// Any nodePort (the node-port range is the API server's policy), and a value
    /// kube-proxy would ignore costs only that value, reported by object and field.
    #[test]
    fn wide_node_ports_load_and_bad_values_cost_only_themselves() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("wide.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: wide, namespace: demo}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.5\n  externalIPs: [not-an-ip, 198.51.100.7]\n  ports: [{port: 80, nodePort: 3001}]\n",
        )
        .unwrap();
        let (changes, problems) = ManifestSource::new(dir.path()).load_once().unwrap();
        let service = changes.iter().find_map(|c| match c {
            Change::Apply(Object::Service(s)) if s.name.name == "wide" => Some(s),
            _ => None,
        });
        let service = service.expect("the Service is applied");
        assert_eq!(service.ports[0].node_port, Some(3001));
        assert_eq!(
            service.external_ips,
            vec!["198.51.100.7".parse::<std::net::IpAddr>().unwrap()]
        );
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 1, "{text:?}");
        assert!(
            text[0].ends_with(
                "wide.yaml: Service demo/wide: spec.externalIPs[0]: invalid value \"not-an-ip\": must be a valid IP address; ignored, the rest of the object is used"
            ),
            "{text:?}"
        );
    }

    #[test]
    fn missing_directory_names_the_path() {
        let err = ManifestSource::new("/nonexistent/svcplane-x")
            .load_once()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/svcplane-x"));
    }

    #[test]
    fn reload_sends_only_differences_and_keeps_what_worked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.yaml");
        std::fs::write(
            &file,
            svc_yaml("a", "10.96.0.1", 80) + "---\n" + &svc_yaml("b", "10.96.0.2", 81),
        )
        .unwrap();
        let mut src = ManifestSource::new(dir.path());
        let (changes, _) = src.load_once().unwrap();
        assert_eq!(changes.len(), 2);
        // Nothing changed on disk: nothing to send.
        assert!(src.load_once().unwrap().0.is_empty());

        // b becomes invalid: its previous valid version is kept, a changes.
        std::fs::write(
            &file,
            svc_yaml("a", "10.96.0.1", 90) + "---\n" + &svc_yaml("b", "10.96.0.2", 0),
        )
        .unwrap();
        let (changes, problems) = src.load_once().unwrap();
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(applied_port(&changes, "a"), Some(90));
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("keeping its previous valid version"))
        );

        // Broken syntax: everything from the file stays.
        std::fs::write(&file, "kind: [").unwrap();
        let (changes, problems) = src.load_once().unwrap();
        assert!(changes.is_empty());
        assert!(problems[0].to_string().contains("svc.yaml"));

        // File removed: its objects are deleted.
        std::fs::remove_file(&file).unwrap();
        let (changes, _) = src.load_once().unwrap();
        let mut deleted: Vec<ObjectKey> = changes
            .into_iter()
            .filter_map(|c| match c {
                Change::Delete(k) => Some(k),
                _ => None,
            })
            .collect();
        deleted.sort();
        assert_eq!(deleted, vec![key("a"), key("b")]);
    }

    #[test]
    fn derived_slices_replace_pods() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("app.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec:\n  clusterIP: 10.96.0.1\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: demo, labels: {app: web}}\nspec: {nodeName: n1, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.244.0.5, conditions: [{type: Ready, status: \"True\"}]}\n",
        )
        .unwrap();
        let (changes, problems) = ManifestSource::new(dir.path()).load_once().unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert!(
            !changes
                .iter()
                .any(|c| matches!(c, Change::Apply(Object::Pod(_))))
        );
        let slice = changes
            .iter()
            .find_map(|c| match c {
                Change::Apply(Object::EndpointSlice(s)) => Some(s),
                _ => None,
            })
            .expect("derived slice");
        assert_eq!(slice.service_name.as_deref(), Some("web"));
        assert_eq!(slice.endpoints[0].addresses[0].to_string(), "10.244.0.5");
        assert_eq!(slice.ports[0].port, 8080);
    }

    async fn next_changes(rx: &mut tokio::sync::mpsc::Receiver<SourceEvent>) -> Vec<Change> {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(SourceEvent::Changes(c))) => c,
            other => panic!("expected changes, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watcher_follows_edits_new_files_renames_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        std::fs::write(&a, svc_yaml("a", "10.96.0.1", 80)).unwrap();
        let collected: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink_store = collected.clone();
        let sink: ProblemSink = Arc::new(move |p| sink_store.lock().unwrap().push(p.to_string()));
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let source: Box<dyn Source> =
            Box::new(ManifestSource::new(dir.path()).debounce(Duration::from_millis(50)));
        let task = tokio::spawn(source.run(tx, sink));

        assert_eq!(applied_port(&next_changes(&mut rx).await, "a"), Some(80));
        assert_eq!(rx.recv().await, Some(SourceEvent::Synced));

        // In-place edit.
        std::fs::write(&a, svc_yaml("a", "10.96.0.1", 81)).unwrap();
        assert_eq!(applied_port(&next_changes(&mut rx).await, "a"), Some(81));

        // New file.
        std::fs::write(dir.path().join("b.json"), r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"b","namespace":"demo"},"spec":{"clusterIP":"10.96.0.2","ports":[{"port":82}]}}"#).unwrap();
        assert_eq!(applied_port(&next_changes(&mut rx).await, "b"), Some(82));

        // Atomic rename-over (write a temp file, rename onto the watched name).
        let tmp = dir.path().join(".a.yaml.tmp");
        std::fs::write(&tmp, svc_yaml("a", "10.96.0.1", 83)).unwrap();
        std::fs::rename(&tmp, &a).unwrap();
        assert_eq!(applied_port(&next_changes(&mut rx).await, "a"), Some(83));

        // A broken write is reported and changes nothing; the next good write goes through.
        std::fs::write(&a, "spec: [").unwrap();
        std::fs::write(&a, svc_yaml("a", "10.96.0.1", 84)).unwrap();
        assert_eq!(applied_port(&next_changes(&mut rx).await, "a"), Some(84));

        // Delete.
        std::fs::remove_file(dir.path().join("b.json")).unwrap();
        assert_eq!(next_changes(&mut rx).await, vec![Change::Delete(key("b"))]);

        drop(rx);
        // The source ends once the receiver is gone, without waiting for a file event.
        let done = tokio::time::timeout(Duration::from_secs(10), task).await;
        assert!(matches!(done, Ok(Ok(Ok(())))), "{done:?}");
    }

    type Collected = Arc<Mutex<Vec<String>>>;

    fn collecting_sink() -> (ProblemSink, Collected) {
        let collected: Collected = Arc::default();
        let store = collected.clone();
        let sink: ProblemSink = Arc::new(move |p| store.lock().unwrap().push(p.to_string()));
        (sink, collected)
    }

    /// Start a watching source; returns its receiver after the initial batch and Synced.
    async fn start(
        dir: &Path,
        sink: ProblemSink,
    ) -> (
        tokio::sync::mpsc::Receiver<SourceEvent>,
        Vec<Change>,
        tokio::task::JoinHandle<Result<(), SourceError>>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let source: Box<dyn Source> =
            Box::new(ManifestSource::new(dir).debounce(Duration::from_millis(50)));
        let task = tokio::spawn(source.run(tx, sink));
        let initial = next_changes(&mut rx).await;
        assert_eq!(rx.recv().await, Some(SourceEvent::Synced));
        (rx, initial, task)
    }

    /// Wait (generously) until a collected problem satisfies `pred`.
    async fn wait_for_problem(collected: &Collected, pred: impl Fn(&str) -> bool) -> String {
        for _ in 0..200 {
            if let Some(p) = collected.lock().unwrap().iter().find(|p| pred(p)) {
                return p.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no such problem; got {:?}", collected.lock().unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watcher_keeps_objects_of_a_broken_file_and_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        std::fs::write(&a, svc_yaml("a", "10.96.0.1", 80)).unwrap();
        let (sink, collected) = collecting_sink();
        let (mut rx, initial, _task) = start(dir.path(), sink).await;
        assert_eq!(applied_port(&initial, "a"), Some(80));

        std::fs::write(&a, "kind: Service\nspec: [\n").unwrap();
        let problem = wait_for_problem(&collected, |p| p.contains("a.yaml")).await;
        assert!(problem.contains("line "), "{problem}");
        assert!(
            problem.contains("keeping its previous objects"),
            "{problem}"
        );

        // A good file written afterwards comes through; the broken one sent nothing
        // (no Delete of `a` in between).
        std::fs::write(dir.path().join("b.yaml"), svc_yaml("b", "10.96.0.2", 81)).unwrap();
        let changes = next_changes(&mut rx).await;
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(applied_port(&changes, "b"), Some(81));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watcher_reports_invalid_objects_and_applies_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, collected) = collecting_sink();
        let (mut rx, initial, _task) = start(dir.path(), sink).await;
        assert!(initial.is_empty());

        std::fs::write(
            dir.path().join("mixed.yaml"),
            svc_yaml("good", "10.96.0.1", 80) + "---\n" + &svc_yaml("bad", "10.96.0.2", 0),
        )
        .unwrap();
        let changes = next_changes(&mut rx).await;
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(applied_port(&changes, "good"), Some(80));
        let problem = wait_for_problem(&collected, |p| p.contains("demo/bad")).await;
        assert!(problem.contains("mixed.yaml"), "{problem}");
        assert!(problem.contains("spec.ports[0].port"), "{problem}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reading_a_file_does_not_wake_the_watcher_again() {
        // Opening a file is an inotify event too; were it a wake-up, every reload would
        // read the files it read last time again, forever (and re-report their problems).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.yaml"), svc_yaml("bad", "10.96.0.2", 0)).unwrap();
        let (sink, collected) = collecting_sink();
        let (mut rx, _initial, _task) = start(dir.path(), sink).await;
        std::fs::write(dir.path().join("bad.yaml"), svc_yaml("bad", "10.96.0.3", 0)).unwrap();
        // The initial load and the edit each report `bad` once.
        for _ in 0..200 {
            if collected.lock().unwrap().len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Several debounce periods: a feedback loop would report the same problem again.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let reports = collected.lock().unwrap().len();
        assert_eq!(reports, 2, "{:?}", collected.lock().unwrap());
        assert!(rx.try_recv().is_err(), "nothing changed, nothing sent");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watcher_follows_a_configmap_volume_data_swap() {
        // The kubelet's layout: `x.yaml -> ..data/x.yaml`, `..data -> ..<timestamp>`;
        // an update writes a new timestamped dir and renames a new `..data` symlink over.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let v1 = root.join("..2026_01_01_00_00_00.1");
        std::fs::create_dir(&v1).unwrap();
        std::fs::write(v1.join("svc.yaml"), svc_yaml("a", "10.96.0.1", 80)).unwrap();
        std::os::unix::fs::symlink("..2026_01_01_00_00_00.1", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/svc.yaml", root.join("svc.yaml")).unwrap();
        let (sink, _collected) = collecting_sink();
        let (mut rx, initial, _task) = start(root, sink).await;
        assert_eq!(initial.len(), 1, "{initial:?}");
        assert_eq!(applied_port(&initial, "a"), Some(80));

        let v2 = root.join("..2026_01_01_00_01_00.2");
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v2.join("svc.yaml"), svc_yaml("a", "10.96.0.1", 81)).unwrap();
        std::os::unix::fs::symlink("..2026_01_01_00_01_00.2", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        std::fs::remove_dir_all(&v1).unwrap();
        assert_eq!(applied_port(&next_changes(&mut rx).await, "a"), Some(81));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_removed_and_recreated_directory_is_watched_again() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("manifests");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), svc_yaml("a", "10.96.0.1", 80)).unwrap();
        let (sink, collected) = collecting_sink();
        let (mut rx, initial, _task) = start(&dir, sink).await;
        assert_eq!(applied_port(&initial, "a"), Some(80));

        std::fs::remove_dir_all(&dir).unwrap();
        let problem = wait_for_problem(&collected, |p| p.contains("keeping the objects")).await;
        assert!(problem.contains("manifests"), "{problem}");

        // Appears whole (built aside, renamed into place), as a deployment tool would.
        let staged = parent.path().join("staged");
        std::fs::create_dir(&staged).unwrap();
        std::fs::write(staged.join("b.yaml"), svc_yaml("b", "10.96.0.2", 81)).unwrap();
        std::fs::rename(&staged, &dir).unwrap();
        // `a`'s file went first (removing a directory removes its files), so its Delete
        // may come in an earlier batch than `b`.
        let mut seen = Vec::new();
        while applied_port(&seen, "b").is_none() {
            seen.extend(next_changes(&mut rx).await);
        }
        assert_eq!(applied_port(&seen, "b"), Some(81));
        assert!(seen.contains(&Change::Delete(key("a"))), "{seen:?}");

        // And the new directory's events arrive.
        std::fs::write(dir.join("b.yaml"), svc_yaml("b", "10.96.0.2", 82)).unwrap();
        assert_eq!(applied_port(&next_changes(&mut rx).await, "b"), Some(82));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watching_a_missing_directory_fails_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        let (sink, _) = collecting_sink();
        let source: Box<dyn Source> = Box::new(ManifestSource::new(&missing));
        let err = source.run(tx, sink).await.unwrap_err();
        assert!(matches!(err, SourceError::ReadDir { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&*missing.to_string_lossy()),
            "{err}"
        );
    }

    #[test]
    fn same_object_in_two_files_later_path_wins_and_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("10-a.yaml");
        let second = dir.path().join("20-a.yaml");
        std::fs::write(&first, svc_yaml("a", "10.96.0.1", 80)).unwrap();
        std::fs::write(&second, svc_yaml("a", "10.96.0.1", 90)).unwrap();
        let mut src = ManifestSource::new(dir.path());
        let (changes, problems) = src.load_once().unwrap();
        assert_eq!(applied_port(&changes, "a"), Some(90));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].file.as_deref(), Some(second.as_path()));
        assert!(problems[0].message.contains("10-a.yaml"), "{problems:?}");

        // Unchanged conflict: not reported again.
        let (changes, problems) = src.load_once().unwrap();
        assert!(changes.is_empty() && problems.is_empty(), "{problems:?}");

        // The winner goes away: the other definition takes over.
        std::fs::remove_file(&second).unwrap();
        let (changes, problems) = src.load_once().unwrap();
        assert_eq!(applied_port(&changes, "a"), Some(80));
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn same_object_twice_in_one_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            svc_yaml("a", "10.96.0.1", 80) + "---\n" + &svc_yaml("a", "10.96.0.1", 81),
        )
        .unwrap();
        let (changes, problems) = ManifestSource::new(dir.path()).load_once().unwrap();
        assert_eq!(applied_port(&changes, "a"), Some(81));
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("defined twice in this file")),
            "{problems:?}"
        );
    }

    #[test]
    fn editor_temp_files_and_subdirectories_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("a.yaml~"), svc_yaml("backup", "10.96.0.1", 80)).unwrap();
        std::fs::write(root.join("a.yaml.swp"), "binary").unwrap();
        std::fs::write(root.join(".a.yaml.swp"), "binary").unwrap();
        std::fs::write(root.join(".#a.yaml"), svc_yaml("lock", "10.96.0.1", 80)).unwrap();
        std::fs::create_dir(root.join("sub.yaml")).unwrap();
        std::fs::create_dir(root.join("nested")).unwrap();
        std::fs::write(
            root.join("nested/b.yaml"),
            svc_yaml("nested", "10.96.0.2", 80),
        )
        .unwrap();
        std::fs::write(root.join("c.yml"), svc_yaml("c", "10.96.0.3", 80)).unwrap();
        let (changes, problems) = ManifestSource::new(root).load_once().unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        let names: Vec<&str> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Apply(Object::Service(s)) => Some(s.name.name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(names, vec!["c"]);
    }

    #[test]
    fn a_manifest_slice_with_a_derived_name_wins_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("app.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec:\n  clusterIP: 10.96.0.1\n  selector: {app: web}\n  ports: [{port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-svcplane-ipv4-0, namespace: demo, labels: {kubernetes.io/service-name: other}}\naddressType: IPv4\nendpoints: [{addresses: [10.244.9.9]}]\nports: [{port: 9}]\n",
        )
        .unwrap();
        let (changes, problems) = ManifestSource::new(dir.path()).load_once().unwrap();
        let slices: Vec<&EndpointSlice> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Apply(Object::EndpointSlice(s)) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(slices.len(), 1, "{slices:?}");
        assert_eq!(slices[0].service_name.as_deref(), Some("other"));
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("derived for Service demo/web")),
            "{problems:?}"
        );
    }

    #[test]
    fn rescan_rereads_everything_and_names_accumulate() {
        let mut reread = Reread::Changed;
        assert!(!reread.includes(Path::new("/d/a.yaml")));
        reread.add(Wake::Paths(vec![PathBuf::from("/elsewhere/d/a.yaml")]));
        assert!(
            reread.includes(Path::new("/d/a.yaml")),
            "matched by file name"
        );
        assert!(!reread.includes(Path::new("/d/b.yaml")));
        reread.add(Wake::Paths(vec![PathBuf::from("/d/b.yaml")]));
        assert!(reread.includes(Path::new("/d/a.yaml")) && reread.includes(Path::new("/d/b.yaml")));
        reread.add(Wake::Rescan);
        reread.add(Wake::Paths(vec![PathBuf::from("/d/c.yaml")]));
        assert!(reread.includes(Path::new("/d/z.yaml")));

        let overflow = Wake::from_event(Err(notify::Error::generic("queue overflow")));
        assert!(matches!(overflow, Some(Wake::Rescan)));
        let rescan =
            notify::Event::new(notify::EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert!(matches!(Wake::from_event(Ok(rescan)), Some(Wake::Rescan)));
        let modify = notify::Event::new(notify::EventKind::Any).add_path("/d/a.yaml".into());
        assert!(matches!(Wake::from_event(Ok(modify)), Some(Wake::Paths(p)) if p.len() == 1));
    }

    #[test]
    fn opens_and_reads_are_not_wake_ups_but_finished_writes_are() {
        use notify::event::{AccessKind, AccessMode, EventKind};
        let event = |kind| Ok(notify::Event::new(kind).add_path("/d/a.yaml".into()));
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
        ] {
            assert!(Wake::from_event(event(kind)).is_none(), "{kind:?}");
        }
        let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(Wake::from_event(event(written)).is_some());
    }
}
