//! The manifests directory: every `*.yaml`, `*.yml` and `*.json` file directly in it,
//! not in subdirectories (as `kubectl apply -f DIR` without `-R`; a ConfigMap volume is
//! flat too). Symlinks are followed, so a ConfigMap volume's `..data` swap works; hidden
//! files (`.*`, which covers vim's `.x.swp` and the ConfigMap `..data` machinery) and
//! editor backups (`*~`, `*.swp`) are skipped.
//!
//! The directory (not each file) is watched with notify, so rename-over and symlink
//! swaps are seen. A reload starts once the events stop for a moment ([`COALESCE`]) and
//! no manifest file is still being written (written to, not yet closed), but never later
//! than the longest wait ([`ManifestSource::debounce`]) after the first event. Then only
//! files that an event named or whose on-disk version (device, inode, mtime, size)
//! changed are read again, or every file after an overflow/rescan event.
//!
//! A reload costs what changed, not what is loaded: the objects of the files read again
//! are compared with what those files held before, and only the objects whose winning
//! definition changed go on (allocation runs again only when a Service changed; the
//! EndpointSlice controller only for the Services whose inputs changed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::ops::Bound;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use svcplane_model::{
    Change, EndpointSlice, Format, Kind, NamespacedName, Node, Object, ObjectKey, Pod, Service,
    SourceEvent, parse_manifest,
};
use tokio::time::Instant;

use crate::allocator::{self, AllocatorConfig, Outcome};
use crate::by_name::ordered_by_view;
use crate::endpointslice_controller::{derive_for_service, selects};
use crate::{IGNORED, Problem, ProblemSink, Source, SourceError, SourceFuture};
use svcplane_model::ByName;

/// How long the events must pause before a reload: one write is several events
/// (create/truncate, data, close; or a rename), and a tool writing several files
/// writes them back to back.
pub const COALESCE: Duration = Duration::from_millis(5);
/// The longest wait after the first event, for a file written to but not closed yet
/// (a slow writer, or one that never closes, such as a writable mmap).
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
        let paths = match wake {
            Wake::Rescan => {
                *self = Reread::All;
                return;
            }
            Wake::Writing(paths) | Wake::Done(paths) => paths,
        };
        match std::mem::take(self) {
            Reread::All => *self = Reread::All,
            Reread::Changed => *self = Reread::Named(file_names(paths).collect()),
            Reread::Named(mut names) => {
                names.extend(file_names(paths));
                *self = Reread::Named(names);
            }
        }
    }
}

/// What the notify callback tells the async side.
#[derive(Debug, Clone)]
enum Wake {
    /// Written to (or created): more is likely to come, up to the close.
    Writing(Vec<PathBuf>),
    /// A finished change: closed after writing, renamed, removed, attributes changed.
    Done(Vec<PathBuf>),
    Rescan,
}

impl Wake {
    /// `None` for events that change nothing on disk: notify reports opens and reads
    /// too, and reloading on those would make every reload (which opens the files)
    /// trigger the next one.
    fn from_event(event: notify::Result<notify::Event>) -> Option<Wake> {
        use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
        match event {
            Ok(e) if e.need_rescan() => Some(Wake::Rescan),
            Ok(e) => match e.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                    Some(Wake::Done(e.paths))
                }
                EventKind::Access(_) => None,
                EventKind::Modify(ModifyKind::Data(_)) | EventKind::Create(_) => {
                    Some(Wake::Writing(e.paths))
                }
                _ => Some(Wake::Done(e.paths)),
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

/// Manifest files being written (an event said so, no close yet): a reload waits for
/// them, up to the longest wait. Other names (temporary files, swap files, which
/// editors keep open) are not waited for.
fn track_writes(open: &mut BTreeSet<OsString>, wake: &Wake) {
    match wake {
        Wake::Writing(paths) => open.extend(
            paths
                .iter()
                .filter(|p| is_manifest_name(p))
                .filter_map(|p| p.file_name().map(|n| n.to_os_string())),
        ),
        Wake::Done(paths) => {
            for name in paths.iter().filter_map(|p| p.file_name()) {
                open.remove(name);
            }
        }
        Wake::Rescan => {}
    }
}

#[derive(Debug, Default)]
struct FileState {
    version: Option<FileVersion>,
    /// The file's valid objects (shared with the merged view and the engine).
    objects: FileObjects,
}

/// A file's objects, sorted by key in an exactly sized slice (a `BTreeMap`'s nodes took
/// twice the bytes): built once per read of the file, then only looked up.
#[derive(Debug, Default)]
struct FileObjects(Box<[(Key, Object)]>);

impl FileObjects {
    fn get(&self, key: &ObjectKey) -> Option<&Object> {
        let at = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[at].1)
    }

    fn contains_key(&self, key: &ObjectKey) -> bool {
        self.get(key).is_some()
    }

    fn keys(&self) -> impl Iterator<Item = &Key> {
        self.0.iter().map(|(k, _)| k)
    }

    fn iter(&self) -> impl Iterator<Item = (&Key, &Object)> {
        self.0.iter().map(|(k, o)| (k, o))
    }
}

impl From<BTreeMap<Key, Object>> for FileObjects {
    fn from(objects: BTreeMap<Key, Object>) -> Self {
        FileObjects(objects.into_iter().collect())
    }
}

/// The manifests directory as a [`Source`]: watched (see the module docs), with the
/// standalone EndpointSlice controller run for the Services whose inputs changed.
/// Pods are consumed by that controller and not forwarded.
pub struct ManifestSource {
    dir: PathBuf,
    debounce: Duration,
    files: BTreeMap<Arc<Path>, FileState>,
    /// Which files define each key, in path order: the last one wins.
    definers: HashMap<Key, Definers>,
    /// The winning definitions, by kind (by name), as the allocator and the controller
    /// read them.
    services: BTreeSet<ByName<Service>>,
    pods: BTreeSet<ByName<Pod>>,
    nodes: BTreeMap<String, Arc<Node>>,
    /// Manifest EndpointSlices per (namespace, service-name label): a Service with one
    /// gets no derived slices.
    covered: BTreeSet<Covering>,
    /// The Services after allocation (what the engine gets), by name; a Service that
    /// could not be allocated is absent.
    allocated_services: BTreeSet<ByName<Service>>,
    /// Derived EndpointSlices, by key, with the Service they were derived for (those
    /// shadowed by a manifest slice of the same name too).
    derived: BTreeMap<Key, (NamespacedName, Object)>,
    derived_by_service: HashMap<NamespacedName, Vec<Key>>,
    /// What the engine has been sent, to send only differences.
    emitted: HashMap<Key, Object>,
    /// Conflicts reported per key (duplicate definitions, a manifest slice with a derived
    /// slice's name), so an unchanged conflict is not reported on every reload.
    conflicts: HashMap<Key, Vec<Problem>>,
    /// Allocation problems reported, likewise.
    allocation_problems: BTreeSet<String>,
    /// What the allocator gives a Service without clusterIP or nodePort (the API server's job).
    allocator: AllocatorConfig,
    /// What was allocated per Service, to log each allocation once (and when it moves).
    allocated: BTreeMap<NamespacedName, String>,
}

/// A manifest EndpointSlice with a service-name label, ordered by (namespace, service,
/// slice name): the index of which Services have manifest slices, holding no copies of
/// the names (a map of (namespace, service) string pairs was 10k pairs of copies).
#[derive(Debug)]
struct Covering(Arc<EndpointSlice>);

/// (namespace, service, slice name), borrowed from a [`Covering`] or from a lookup's
/// bound.
trait CoverView {
    fn parts(&self) -> (&str, &str, &str);
}

impl CoverView for Covering {
    fn parts(&self) -> (&str, &str, &str) {
        let s = &self.0;
        (
            &s.name.namespace,
            s.service_name.as_deref().unwrap_or_default(),
            &s.name.name,
        )
    }
}

impl CoverView for (&str, &str, &str) {
    fn parts(&self) -> (&str, &str, &str) {
        *self
    }
}

ordered_by_view!(Covering, CoverView);

/// The files that define one key, in path order: almost always one, kept inline (a `Vec`
/// per key was 20k allocations at 10k Services).
#[derive(Debug)]
enum Definers {
    One(Arc<Path>),
    /// Two or more.
    Many(Vec<Arc<Path>>),
}

impl Definers {
    fn paths(&self) -> &[Arc<Path>] {
        match self {
            Definers::One(path) => std::slice::from_ref(path),
            Definers::Many(paths) => paths,
        }
    }

    fn insert(&mut self, path: &Arc<Path>) {
        let mut paths = match self {
            Definers::One(one) if one == path => return,
            Definers::One(one) => vec![one.clone()],
            Definers::Many(paths) => std::mem::take(paths),
        };
        if let Err(at) = paths.binary_search(path) {
            paths.insert(at, path.clone());
        }
        *self = Definers::Many(paths);
    }

    /// Remove `path`; true when no file is left.
    fn remove(&mut self, path: &Arc<Path>) -> bool {
        match self {
            Definers::One(one) => one == path,
            Definers::Many(paths) => {
                paths.retain(|p| p != path);
                if let [last] = paths.as_slice() {
                    *self = Definers::One(last.clone());
                }
                false
            }
        }
    }
}

/// The keys whose definitions a reload changed, each with its winning definition
/// before the reload (recorded before the key's first update).
type Before = BTreeMap<Key, Option<Object>>;

/// An object's key, allocated once when its file is read and shared by every map that
/// holds it (20k keys × five maps would otherwise be ~10 MB of copies).
type Key = Arc<ObjectKey>;

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestSource {
            dir: dir.into(),
            debounce: DEFAULT_DEBOUNCE,
            files: BTreeMap::new(),
            definers: HashMap::new(),
            services: BTreeSet::new(),
            pods: BTreeSet::new(),
            nodes: BTreeMap::new(),
            covered: BTreeSet::new(),
            allocated_services: BTreeSet::new(),
            derived: BTreeMap::new(),
            derived_by_service: HashMap::new(),
            emitted: HashMap::new(),
            conflicts: HashMap::new(),
            allocation_problems: BTreeSet::new(),
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

    /// The longest wait between the first event and the reload (default 100 ms), for a
    /// manifest file still being written; finished writes and renames are read
    /// [`COALESCE`] after the last event.
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
        let mut before = Before::new();
        let gone: Vec<Arc<Path>> = self
            .files
            .keys()
            .filter(|p| !present.contains_key(&***p))
            .cloned()
            .collect();
        for path in gone {
            let keys: Vec<Key> = self.files[&path].objects.keys().cloned().collect();
            for key in &keys {
                self.record_before(&mut before, key);
            }
            self.files.remove(&path);
            for key in &keys {
                self.undefine(key, &path);
            }
        }
        for (path, version) in present {
            let path: Arc<Path> = match self.files.get_key_value(path.as_path()) {
                Some((p, state)) => {
                    if state.version == Some(version) && !reread.includes(p) {
                        continue;
                    }
                    p.clone()
                }
                None => Arc::from(path),
            };
            let state = self.files.entry(path.clone()).or_default();
            let new = match load_file(&path, &state.objects, problems) {
                Loaded::Objects(objects) => objects,
                Loaded::Broken => {
                    // Remember the version so an unchanged broken file is not re-reported.
                    state.version = Some(version);
                    continue;
                }
                Loaded::Unreadable => continue,
            };
            state.version = Some(version);
            let old = &state.objects;
            let removed: Vec<Key> = old
                .keys()
                .filter(|k| !new.contains_key(k))
                .cloned()
                .collect();
            let differ: Vec<Key> = new
                .iter()
                .filter(|(k, obj)| old.get(k).is_none_or(|o| !(o.ptr_eq(obj) || o == *obj)))
                .map(|(k, _)| k.clone())
                .collect();
            for key in removed.iter().chain(&differ) {
                self.record_before(&mut before, key);
            }
            if let Some(state) = self.files.get_mut(&path) {
                state.objects = new;
            }
            for key in &removed {
                self.undefine(key, &path);
            }
            for key in &differ {
                self.define(key, &path);
            }
        }
        Ok(self.propagate(before, problems))
    }

    /// The winning definition of `key` now.
    fn winner(&self, key: &ObjectKey) -> Option<&Object> {
        let path = self.definers.get(key)?.paths().last()?;
        self.files.get(path)?.objects.get(key)
    }

    /// Note `key`'s winner before its first change in this reload.
    fn record_before(&self, before: &mut Before, key: &Key) {
        if !before.contains_key(key) {
            before.insert(key.clone(), self.winner(key).cloned());
        }
    }

    fn define(&mut self, key: &Key, path: &Arc<Path>) {
        match self.definers.get_mut(&**key) {
            Some(paths) => paths.insert(path),
            None => {
                self.definers
                    .insert(key.clone(), Definers::One(path.clone()));
            }
        }
    }

    fn undefine(&mut self, key: &ObjectKey, path: &Arc<Path>) {
        if let Some(paths) = self.definers.get_mut(key)
            && paths.remove(path)
        {
            self.definers.remove(key);
        }
    }

    /// From the keys whose definitions changed to the changes for the engine: the
    /// kind indexes, allocation (when a Service changed), the EndpointSlice controller
    /// (for the Services whose inputs changed), conflicts, and the difference against
    /// what was emitted.
    fn propagate(&mut self, before: Before, problems: &mut Vec<Problem>) -> Vec<Change> {
        let mut candidates: BTreeSet<Key> = BTreeSet::new();
        let mut dirty: BTreeSet<NamespacedName> = BTreeSet::new();
        let mut services_changed = false;
        let mut all_dirty = false;
        for (key, before) in before {
            let after = self.winner(&key).cloned();
            // Conflicts depend on the definers, which changed even if the winner did not.
            candidates.insert(key.clone());
            let same = match (&before, &after) {
                (Some(b), Some(a)) => b.ptr_eq(a) || b == a,
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            match key.kind {
                Kind::Service => {
                    services_changed = true;
                    match &after {
                        Some(Object::Service(s)) => {
                            self.services.replace(ByName(s.clone()));
                        }
                        _ => {
                            self.services.remove(&key.name);
                        }
                    }
                }
                Kind::EndpointSlice => {
                    for obj in [&before, &after].into_iter().flatten() {
                        if let Object::EndpointSlice(s) = obj
                            && let Some(svc) = &s.service_name
                        {
                            dirty.insert(NamespacedName {
                                namespace: key.name.namespace.clone(),
                                name: svc.clone(),
                            });
                        }
                    }
                    if let Some(Object::EndpointSlice(s)) = &before {
                        self.cover(s, false);
                    }
                    if let Some(Object::EndpointSlice(s)) = &after {
                        self.cover(s, true);
                    }
                    if let Some((owner, _)) = self.derived.get(&key) {
                        dirty.insert(owner.clone());
                    }
                }
                Kind::Pod => {
                    for obj in [&before, &after].into_iter().flatten() {
                        if let Object::Pod(p) = obj {
                            dirty.extend(self.services_selecting(p));
                        }
                    }
                    match &after {
                        Some(Object::Pod(p)) => {
                            self.pods.replace(ByName(p.clone()));
                        }
                        _ => {
                            self.pods.remove(&key.name);
                        }
                    }
                }
                Kind::Node => {
                    // Zones of derived endpoints: rare, so every derived slice again.
                    all_dirty = true;
                    match &after {
                        Some(Object::Node(n)) => {
                            self.nodes.insert(key.name.name.to_string(), n.clone());
                        }
                        _ => {
                            self.nodes.remove(&*key.name.name);
                        }
                    }
                }
            }
        }
        if services_changed {
            for name in self.allocate(problems) {
                candidates.insert(Arc::new(ObjectKey {
                    kind: Kind::Service,
                    name: name.clone(),
                }));
                dirty.insert(name);
            }
        }
        if all_dirty {
            dirty.extend(self.allocated_services.iter().map(|s| s.0.name.clone()));
            dirty.extend(self.derived_by_service.keys().cloned());
        }
        self.derive(&dirty, &mut candidates);
        self.emit(candidates, problems)
    }

    /// Count `slice` as covering its Service (`add`), or no more.
    fn cover(&mut self, slice: &Arc<EndpointSlice>, add: bool) {
        if slice.service_name.is_none() {
            return;
        }
        if add {
            self.covered.replace(Covering(slice.clone()));
        } else {
            self.covered.remove(&Covering(slice.clone()));
        }
    }

    /// Whether a manifest EndpointSlice belongs to Service `name`.
    fn is_covered(&self, name: &NamespacedName) -> bool {
        let from: &dyn CoverView = &(&*name.namespace, &*name.name, "");
        self.covered
            .range::<dyn CoverView, _>((Bound::Included(from), Bound::Unbounded))
            .next()
            .is_some_and(|c| {
                let (ns, svc, _) = c.parts();
                (ns, svc) == (&*name.namespace, &*name.name)
            })
    }

    /// The Services of `pod`'s namespace whose selector selects it.
    fn services_selecting(&self, pod: &Pod) -> Vec<NamespacedName> {
        let from = NamespacedName::new(pod.name.namespace.clone(), "");
        self.allocated_services
            .range::<NamespacedName, _>(&from..)
            .map(|s| &s.0)
            .take_while(|s| s.name.namespace == pod.name.namespace)
            .filter(|s| s.selector.as_ref().is_some_and(|sel| selects(sel, pod)))
            .map(|s| s.name.clone())
            .collect()
    }

    /// Fill in what the manifests left to the API server (see [`crate::allocator`]);
    /// a Service that cannot get it is dropped and reported (once while it stays so).
    /// Each allocation is logged once, and again when it changes. Returns the Services
    /// whose allocated version changed.
    fn allocate(&mut self, problems: &mut Vec<Problem>) -> Vec<NamespacedName> {
        let services: Vec<&Service> = self.services.iter().map(|s| s.0.as_ref()).collect();
        let mut outcomes = allocator::allocate(&self.allocator, &services);
        let mut allocated = BTreeMap::new();
        let mut found = BTreeSet::new();
        let mut result = BTreeSet::new();
        for ByName(written) in &self.services {
            let name = &written.name;
            let service = match outcomes.remove(name) {
                None => written.clone(),
                Some(Outcome::Allocated(s, notes)) => {
                    self.log_allocation(name, &notes);
                    allocated.insert(name.clone(), notes);
                    Arc::new(*s)
                }
                Some(Outcome::Partial(s, notes, e)) => {
                    found.insert(format!("{e}; {IGNORED}"));
                    self.log_allocation(name, &notes);
                    allocated.insert(name.clone(), notes);
                    Arc::new(*s)
                }
                Some(Outcome::Failed(e)) => {
                    found.insert(format!("{e}; skipped"));
                    continue;
                }
            };
            // Unchanged: keep the previous allocation (and its Arc).
            let service = match self.allocated_services.get(name) {
                Some(ByName(old)) if Arc::ptr_eq(old, &service) || **old == *service => old.clone(),
                _ => service,
            };
            result.insert(ByName(service));
        }
        for message in &found {
            if !self.allocation_problems.contains(message) {
                problems.push(Problem {
                    file: None,
                    message: message.clone(),
                });
            }
        }
        self.allocation_problems = found;
        self.allocated = allocated;
        let old = std::mem::replace(&mut self.allocated_services, result);
        let mut changed: Vec<NamespacedName> = old
            .iter()
            .filter(|ByName(s)| {
                self.allocated_services
                    .get(&s.name)
                    .is_none_or(|new| !Arc::ptr_eq(&new.0, s))
            })
            .map(|s| s.0.name.clone())
            .collect();
        changed.extend(
            self.allocated_services
                .iter()
                .filter(|s| !old.contains(*s))
                .map(|s| s.0.name.clone()),
        );
        changed
    }

    fn log_allocation(&self, name: &NamespacedName, notes: &str) {
        if !notes.is_empty() && self.allocated.get(name).map(String::as_str) != Some(notes) {
            let verb = if self.allocated.contains_key(name) {
                "reallocated"
            } else {
                "allocated"
            };
            tracing::info!("Service {name}: {verb} {notes}");
        }
    }

    /// Run the EndpointSlice controller for the `dirty` Services; the derived slices
    /// that appeared, changed or went away become candidates.
    fn derive(&mut self, dirty: &BTreeSet<NamespacedName>, candidates: &mut BTreeSet<Key>) {
        if dirty.is_empty() {
            return;
        }
        let nodes: BTreeMap<String, &Node> = self
            .nodes
            .iter()
            .map(|(name, n)| (name.clone(), n.as_ref()))
            .collect();
        for name in dirty {
            let mut previous = HashMap::new();
            for key in self.derived_by_service.remove(name).unwrap_or_default() {
                candidates.insert(key.clone());
                if let Some((_, obj)) = self.derived.remove(&key) {
                    previous.insert(key, obj);
                }
            }
            let Some(ByName(svc)) = self.allocated_services.get(name) else {
                continue;
            };
            if self.is_covered(name) {
                continue;
            }
            let from = NamespacedName::new(name.namespace.clone(), "");
            let pods = self
                .pods
                .range::<NamespacedName, _>(&from..)
                .map(|p| p.0.as_ref())
                .take_while(|p| p.name.namespace == name.namespace);
            let mut keys = Vec::new();
            for slice in derive_for_service(svc, pods, &nodes) {
                let mut obj = Object::from(slice);
                let key = Arc::new(obj.key());
                // Unchanged: the previous allocation, which the engine already shares.
                if let Some(old) = previous.remove(&key)
                    && old == obj
                {
                    obj = old;
                }
                candidates.insert(key.clone());
                keys.push(key.clone());
                self.derived.insert(key, (name.clone(), obj));
            }
            if !keys.is_empty() {
                self.derived_by_service.insert(name.clone(), keys);
            }
        }
    }

    /// What the engine should have for `key`: the allocated Service, the winning
    /// manifest definition, or a derived slice (a manifest slice of the same name wins).
    fn desired(&self, key: &ObjectKey) -> Option<Object> {
        match key.kind {
            Kind::Service => self
                .allocated_services
                .get(&key.name)
                .map(|s| Object::Service(s.0.clone())),
            Kind::EndpointSlice => self
                .winner(key)
                .or_else(|| self.derived.get(key).map(|(_, obj)| obj))
                .cloned(),
            Kind::Node => self.winner(key).cloned(),
            Kind::Pod => None,
        }
    }

    /// The conflicts of `key` now: defined in several files, or a manifest slice named as
    /// a derived one.
    fn conflicts_of(&self, key: &ObjectKey) -> Vec<Problem> {
        let mut found = Vec::new();
        if let Some(paths) = self.definers.get(key).map(Definers::paths) {
            for pair in paths.windows(2) {
                found.push(Problem {
                    file: Some(pair[1].to_path_buf()),
                    message: format!(
                        "{key} is also defined in {}; using this file's (the later path wins)",
                        pair[0].display()
                    ),
                });
            }
            if let (Some(path), Some((service, _))) = (paths.last(), self.derived.get(key)) {
                // A manifest slice already has the derived name: what the user wrote wins.
                found.push(Problem {
                    file: Some(path.to_path_buf()),
                    message: format!(
                        "{key} has the name of a slice derived for Service {service}; \
                         keeping the manifest's slice instead"
                    ),
                });
            }
        }
        found
    }

    /// Report the candidates' new conflicts and send what differs from what was emitted
    /// (deletes first, then applies, each in key order).
    fn emit(&mut self, candidates: BTreeSet<Key>, problems: &mut Vec<Problem>) -> Vec<Change> {
        let mut deletes = Vec::new();
        let mut applies = Vec::new();
        for key in candidates {
            let conflicts = self.conflicts_of(&key);
            let old = self.conflicts.remove(&key).unwrap_or_default();
            problems.extend(conflicts.iter().filter(|p| !old.contains(p)).cloned());
            if !conflicts.is_empty() {
                self.conflicts.insert(key.clone(), conflicts);
            }
            match (self.desired(&key), self.emitted.get(&key)) {
                (Some(new), Some(old)) if new.ptr_eq(old) || new == *old => {}
                (Some(new), _) => {
                    self.emitted.insert(key, new.clone());
                    applies.push(Change::Apply(new));
                }
                (None, Some(_)) => {
                    self.emitted.remove(&key);
                    deletes.push(Change::Delete(Arc::unwrap_or_clone(key)));
                }
                (None, None) => {}
            }
        }
        deletes.extend(applies);
        deletes
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
            let woken = first.is_some();
            if let Some(first) = first {
                // Coalesce: one save or ConfigMap swap is several events, and a file
                // being written is read once it is closed (see the module docs).
                let start = Instant::now();
                let latest = start + self.debounce;
                let mut open = BTreeSet::new();
                track_writes(&mut open, &first);
                reread.add(first);
                let mut quiet = start + COALESCE;
                loop {
                    let deadline = if open.is_empty() {
                        quiet.min(latest)
                    } else {
                        latest
                    };
                    match tokio::time::timeout_at(deadline, wake_rx.recv()).await {
                        Ok(Some(more)) => {
                            track_writes(&mut open, &more);
                            reread.add(more);
                            quiet = Instant::now() + COALESCE;
                        }
                        Ok(None) => return Ok(()),
                        Err(_) => break,
                    }
                }
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
            } else if !woken {
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

/// Whether a file of this name is read: `*.yaml`, `*.yml`, `*.json`, not hidden and not
/// an editor's backup or swap file.
fn is_manifest_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !(name.starts_with('.')
        || name.ends_with('~')
        || name.ends_with(".swp")
        || Format::from_path(path).is_none())
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
        if !is_manifest_name(&path) {
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

/// What reading one file gave.
enum Loaded {
    /// Its objects (an invalid object that had a valid version in `previous` keeps it).
    Objects(FileObjects),
    /// Not valid YAML/JSON: its previous objects stay (reported).
    Broken,
    /// Could not be read: its previous objects stay, and it is tried again (reported).
    Unreadable,
}

/// Read one file, whose objects were `previous`. A file that does not parse keeps its
/// previous objects; an object that became invalid keeps its previous valid version
/// (nothing that worked is lost).
fn load_file(path: &Path, previous: &FileObjects, problems: &mut Vec<Problem>) -> Loaded {
    let problem = |message: String| Problem {
        file: Some(path.to_path_buf()),
        message,
    };
    let Some(format) = Format::from_path(path) else {
        return Loaded::Unreadable;
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            problems.push(problem(format!(
                "cannot read: {e}; keeping its previous objects"
            )));
            return Loaded::Unreadable;
        }
    };
    let parsed = match parse_manifest(&text, format) {
        Ok(p) => p,
        Err(e) => {
            problems.push(problem(format!("{e}; keeping its previous objects")));
            return Loaded::Broken;
        }
    };
    drop(text);
    let mut objects: BTreeMap<Key, Object> = BTreeMap::new();
    for obj in parsed.objects {
        let key = Arc::new(obj.key());
        // Unchanged: keep the previous allocation, which the engine already shares.
        let obj = match previous.get(&key) {
            Some(old) if *old == obj => old.clone(),
            _ => obj,
        };
        if objects.insert(key.clone(), obj).is_some() {
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
        let previous = previous
            .iter()
            .find(|(key, _)| key.kind == invalid.kind && key.name.to_string() == invalid.object);
        match previous {
            Some((key, obj)) if !objects.contains_key(key) => {
                problems.push(problem(format!(
                    "{invalid}; keeping its previous valid version"
                )));
                objects.insert(key.clone(), obj.clone());
            }
            _ => problems.push(problem(format!("{invalid}; skipped"))),
        }
    }
    Loaded::Objects(objects.into())
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
            Change::Apply(Object::Service(s)) if &*s.name.name == name => Some(s.ports[0].port),
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
                Change::Apply(Object::Service(s)) => Some((s.name.name.to_string(), (**s).clone())),
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
            Change::Apply(Object::Service(s)) if &*s.name.name == "wide" => Some(s),
            _ => None,
        });
        let service = service.expect("the Service is applied");
        assert_eq!(service.ports[0].node_port, Some(3001));
        assert_eq!(
            service.rare.external_ips,
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

    /// The oracle for the incremental reload: after every edit, what the changes sent so
    /// far add up to equals what a fresh source loads from the same directory, through
    /// allocation, the EndpointSlice controller, conflicts and removals; and an edit of
    /// Pods sends only the slices derived from them.
    #[test]
    fn incremental_reloads_add_up_to_a_fresh_load() {
        let dir = tempfile::tempdir().unwrap();
        let config = AllocatorConfig {
            cluster_ip_ranges: allocator::parse_service_cluster_ip_range("10.96.0.0/16").unwrap(),
            ..AllocatorConfig::default()
        };
        // Rename-over, so each version is a new inode (no mtime granularity question).
        let put = |name: &str, text: &str| {
            let tmp = dir.path().join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.path().join(name)).unwrap();
        };
        let service = |name: &str, extra: &str| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
                 spec:\n  selector: {{app: {name}}}\n  ports: [{{port: 80, targetPort: 8080}}]\n{extra}"
            )
        };
        let pod = |name: &str, app: &str, ip: &str| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: {app}}}}}\n\
                 spec: {{nodeName: n1, containers: [{{name: c, image: x}}]}}\n\
                 status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
            )
        };
        let node = |zone: &str| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n"
            )
        };
        let slice = |name: &str, service: &str, ip: &str| {
            format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {name}, namespace: demo, labels: {{kubernetes.io/service-name: {service}}}}}\n\
                 addressType: IPv4\nendpoints: [{{addresses: [{ip}]}}]\nports: [{{port: 9}}]\n"
            )
        };
        let services = service("web", "")
            + &service("api", "  clusterIP: 10.96.0.10\n")
            + &service("np", "  type: NodePort\n");
        put("10-svc.yaml", &services);
        put(
            "20-pods.yaml",
            &(pod("web-1", "web", "10.244.0.1")
                + &pod("web-2", "web", "10.244.0.2")
                + &pod("api-1", "api", "10.244.0.3")),
        );
        put("30-node.yaml", &node("a"));

        let src =
            std::cell::RefCell::new(ManifestSource::new(dir.path()).allocator(config.clone()));
        let mut state: BTreeMap<ObjectKey, Object> = BTreeMap::new();
        let mut step = |what: &str| -> Vec<Change> {
            let (changes, _) = src.borrow_mut().load_once().unwrap();
            for change in &changes {
                match change {
                    Change::Apply(obj) => {
                        state.insert(obj.key(), obj.clone());
                    }
                    Change::Delete(key) => {
                        assert!(state.remove(key).is_some(), "{what}: {key} was not there");
                    }
                }
            }
            let (fresh, _) = ManifestSource::new(dir.path())
                .allocator(config.clone())
                .load_once()
                .unwrap();
            let fresh: BTreeMap<ObjectKey, Object> = fresh
                .into_iter()
                .map(|c| match c {
                    Change::Apply(obj) => (obj.key(), obj),
                    Change::Delete(key) => panic!("a fresh load deletes {key}"),
                })
                .collect();
            assert_eq!(state, fresh, "{what}");
            changes
        };
        let initial = step("initial");
        assert!(initial.len() >= 5, "{initial:?}");
        assert!(step("nothing changed").is_empty());

        put(
            "20-pods.yaml",
            &(pod("web-1", "web", "10.244.0.1")
                + &pod("web-2", "api", "10.244.0.2")
                + &pod("api-1", "api", "10.244.0.3")),
        );
        let changes = step("a Pod moves from web to api");
        let keys: Vec<String> = changes
            .iter()
            .map(|c| match c {
                Change::Apply(o) => o.key().to_string(),
                Change::Delete(k) => format!("-{k}"),
            })
            .collect();
        assert_eq!(
            keys,
            [
                "EndpointSlice demo/api-svcplane-ipv4-0",
                "EndpointSlice demo/web-svcplane-ipv4-0"
            ]
        );
        put("30-node.yaml", &node("b"));
        step("the Node's zone changes");
        put("40-slices.yaml", &slice("web-manual", "web", "10.244.9.1"));
        step("a manifest slice covers web");
        put(
            "40-slices.yaml",
            &(slice("web-manual", "web", "10.244.9.1")
                + &slice("api-svcplane-ipv4-0", "other", "10.244.9.2")),
        );
        step("a manifest slice with a derived slice's name");
        std::fs::remove_file(dir.path().join("40-slices.yaml")).unwrap();
        step("the manifest slices go");
        put("50-dup.yaml", &service("api", "  clusterIP: 10.96.0.11\n"));
        step("api defined twice");
        put(
            "10-svc.yaml",
            &(service("api", "  clusterIP: 10.96.0.10\n") + &service("np", "  type: NodePort\n")),
        );
        step("web removed");
        std::fs::remove_file(dir.path().join("50-dup.yaml")).unwrap();
        step("the second api goes");
        // A broken file keeps its objects (which a fresh load never had): nothing is sent.
        put("20-pods.yaml", "kind: [");
        let (changes, problems) = src.borrow_mut().load_once().unwrap();
        assert!(
            changes.is_empty() && problems.len() == 1,
            "{changes:?} {problems:?}"
        );
        put("20-pods.yaml", &pod("web-1", "web", "10.244.0.1"));
        step("the Pods' file fixed");
        put(
            "10-svc.yaml",
            &(services + &service("web2", "  clusterIP: 10.96.0.12\n")),
        );
        step("web back, web2 new");
    }

    /// A selector Service and one ready Pod it selects.
    const WEB_APP: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec:\n  clusterIP: 10.96.0.1\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: demo, labels: {app: web}}\nspec: {nodeName: n1, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.244.0.5, conditions: [{type: Ready, status: \"True\"}]}\n";

    #[test]
    fn derived_slices_replace_pods() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.yaml"), WEB_APP).unwrap();
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
        assert_eq!(slice.endpoints[0].addresses()[0].to_string(), "10.244.0.5");
        assert_eq!(slice.ports[0].port, 8080);
    }

    /// A manifest slice labelled for a Service stops the derived ones (a slice of another
    /// Service whose name starts the same does not), and they come back without it.
    #[test]
    fn a_manifest_slice_covers_its_service_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.yaml"), WEB_APP).unwrap();
        let slice = |svc: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-manual, namespace: demo, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{port: 9090}}]\nendpoints: [{{addresses: [10.244.9.9]}}]\n"
            )
        };
        let derived = |changes: &[Change]| {
            changes
                .iter()
                .filter_map(|c| match c {
                    Change::Apply(Object::EndpointSlice(s)) if &*s.name.name != "web-manual" => {
                        Some(s.ports[0].port)
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        std::fs::write(dir.path().join("other.yaml"), slice("web2")).unwrap();
        let mut src = ManifestSource::new(dir.path());
        let (changes, _) = src.load_once().unwrap();
        assert!(derived(&changes).contains(&8080), "{changes:?}");
        std::fs::write(dir.path().join("manual.yaml"), slice("web")).unwrap();
        let (changes, _) = src.load_once().unwrap();
        assert!(
            changes
                .iter()
                .any(|c| matches!(c, Change::Delete(k) if k.kind == Kind::EndpointSlice)),
            "{changes:?}"
        );
        std::fs::remove_file(dir.path().join("manual.yaml")).unwrap();
        let (changes, _) = src.load_once().unwrap();
        assert_eq!(derived(&changes), [8080], "{changes:?}");
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

    /// A file still open for writing is not read half-written: the reload waits for its
    /// close (bounded by the longest wait, 30 s here), then reads it whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_being_written_is_read_once_closed() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let (sink, collected) = collecting_sink();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let source: Box<dyn Source> =
            Box::new(ManifestSource::new(dir.path()).debounce(Duration::from_secs(30)));
        let _task = tokio::spawn(source.run(tx, sink));
        assert!(next_changes(&mut rx).await.is_empty());
        assert_eq!(rx.recv().await, Some(SourceEvent::Synced));

        let text = svc_yaml("a", "10.96.0.1", 80);
        let (head, tail) = text.split_at(text.len() / 2);
        let mut file = std::fs::File::create(dir.path().join("a.yaml")).unwrap();
        file.write_all(head.as_bytes()).unwrap();
        // Many coalescing pauses long: a reload now would read half a Service.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.try_recv().is_err(), "read before the close");
        file.write_all(tail.as_bytes()).unwrap();
        drop(file);
        assert_eq!(applied_port(&next_changes(&mut rx).await, "a"), Some(80));
        assert!(collected.lock().unwrap().is_empty(), "{collected:?}");
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
    fn definers_stay_in_path_order_and_inline_when_one() {
        let [a, b, c]: [Arc<Path>; 3] =
            ["/m/a.yaml", "/m/b.yaml", "/m/c.yaml"].map(|p| Path::new(p).into());
        let mut d = Definers::One(b.clone());
        d.insert(&b);
        assert!(matches!(d, Definers::One(_)));
        d.insert(&c);
        d.insert(&a);
        assert_eq!(d.paths(), [a.clone(), b.clone(), c.clone()]);
        assert!(!d.remove(&c));
        assert!(!d.remove(&a));
        assert!(matches!(&d, Definers::One(p) if *p == b));
        assert!(!d.remove(&a), "not a definer: nothing changes");
        assert!(d.remove(&b));
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
                Change::Apply(Object::Service(s)) => Some(s.name.name.as_ref()),
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
                Change::Apply(Object::EndpointSlice(s)) => Some(&**s),
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
        reread.add(Wake::Done(vec![PathBuf::from("/elsewhere/d/a.yaml")]));
        assert!(
            reread.includes(Path::new("/d/a.yaml")),
            "matched by file name"
        );
        assert!(!reread.includes(Path::new("/d/b.yaml")));
        reread.add(Wake::Done(vec![PathBuf::from("/d/b.yaml")]));
        assert!(reread.includes(Path::new("/d/a.yaml")) && reread.includes(Path::new("/d/b.yaml")));
        reread.add(Wake::Rescan);
        reread.add(Wake::Done(vec![PathBuf::from("/d/c.yaml")]));
        assert!(reread.includes(Path::new("/d/z.yaml")));

        let overflow = Wake::from_event(Err(notify::Error::generic("queue overflow")));
        assert!(matches!(overflow, Some(Wake::Rescan)));
        let rescan =
            notify::Event::new(notify::EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert!(matches!(Wake::from_event(Ok(rescan)), Some(Wake::Rescan)));
        let modify = notify::Event::new(notify::EventKind::Any).add_path("/d/a.yaml".into());
        assert!(matches!(Wake::from_event(Ok(modify)), Some(Wake::Done(p)) if p.len() == 1));
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
