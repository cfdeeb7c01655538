//! eBPF mode: socket-level load balancing (Cilium's socket-LB). cgroup v2 sock_addr programs
//! (crates/ebpf-programs, embedded here) translate a Service address to a backend at
//! connect/sendmsg and back at recvmsg/getpeername; this backend fills their maps from the
//! desired state. Maps and program links are pinned under `--bpf-pin-path`, so a restart or
//! a crash of svcplane keeps every connection working; `cleanup` unpins (which detaches).
//!
//! North-south traffic (NodePorts, LoadBalancer IPs and externalIPs reached from outside the
//! node, source ranges, eTP, masquerade) is not seen by socket hooks: it is served by the
//! nftables backend's rules from the same desired state, in table `svcplane-ns` and on the
//! prerouting side only ([`Layout::NORTH_SOUTH`]).

pub mod plan;
pub mod sockdestroy;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use aya::{Ebpf, EbpfLoader};
use svcplane_ebpf_common::{
    Backend, CONFIG_HOSTNS_ONLY, Config, MAP_AFFINITY, MAP_BACKENDS, MAP_CONFIG, MAP_REVNAT,
    MAP_SERVICES, MAPS, PROGRAMS, PROTO_UDP, RevNatKey, RevNatValue, ServiceKey, ServiceValue,
    VERSION,
};
use svcplane_proxy::{Dataplane, DataplaneError, DesiredState, Diff, SyncReport};

use crate::nftables::{Layout, NftablesBackend};

use plan::{FrontEntry, IdPool, Image, Op, Owned, Owner, Scope};

/// The programs, built by build.rs for bpfel-unknown-none. Aligned copy at load time.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/svcplane-sock"));

/// Default pin directory.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/svcplane";

/// `--bpf-*` / `--cgroup-path` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbpfOptions {
    pub pin_path: PathBuf,
    /// cgroup v2 directory the programs attach to; `None`: the cgroup2 mount's root.
    pub cgroup_path: Option<PathBuf>,
    /// Service map entries: frontends plus one per backend slot.
    pub service_map_max: u32,
    pub backend_map_max: u32,
    pub revnat_map_max: u32,
    pub affinity_map_max: u32,
    /// Program the north-south nftables table too (`false`: the socket load balancer alone,
    /// for tests of it that run in their own process's network namespace).
    pub north_south: bool,
    /// `--ebpf-socket-lb-hostns-only`: translate only sockets of svcplane's own network
    /// namespace; pods' connections go through the north-south table.
    pub hostns_only: bool,
}

impl Default for EbpfOptions {
    fn default() -> Self {
        EbpfOptions {
            pin_path: PathBuf::from(DEFAULT_PIN_PATH),
            cgroup_path: None,
            // 64k service ports plus 256k backend slots.
            service_map_max: 65_536 + 262_144,
            backend_map_max: 262_144,
            revnat_map_max: 262_144,
            affinity_map_max: 65_536,
            north_south: true,
            hostns_only: false,
        }
    }
}

fn err(what: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Tool {
        tool: "ebpf".into(),
        message: what.to_string(),
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo (cgroup2 is `/sys/fs/cgroup` on a
/// unified host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_root() -> Result<PathBuf, DataplaneError> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| err(format!("reading /proc/self/mountinfo: {e}")))?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or_else(|| err("no cgroup2 file system is mounted (needed for --proxy-mode ebpf)"))
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Mount bpffs on /sys/fs/bpf when the pin path is under it and nothing is mounted there
/// (as Cilium's agent does). A lock file serialises concurrent proxies, which would
/// otherwise stack two mounts and hide each other's pins.
fn ensure_bpffs(pin: &Path) -> Result<(), DataplaneError> {
    let base = Path::new("/sys/fs/bpf");
    if !pin.starts_with(base) {
        // Elsewhere the caller mounted bpffs: check it, since pins on another file system
        // fail with a less helpful error.
        let existing = pin.ancestors().find(|p| p.exists()).unwrap_or(pin);
        if !is_bpffs(existing) {
            return Err(err(format!(
                "--bpf-pin-path {}: {} is not on a bpf file system",
                pin.display(),
                existing.display()
            )));
        }
        return Ok(());
    }
    if is_bpffs(base) {
        return Ok(());
    }
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/svcplane-bpffs.lock")
        .map_err(|e| err(format!("/run/svcplane-bpffs.lock: {e}")))?;
    // SAFETY: flock on an fd we own; released when `lock` closes.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if is_bpffs(base) {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let (src, dst, ty) = (c("bpf"), c("/sys/fs/bpf"), c("bpf"));
    // SAFETY: valid C strings, no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(err(format!(
            "mounting bpffs on /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// An error and its sources (aya's Display leaves out the errno).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn pin_dir_join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

fn link_pin(pin: &Path, prog: &str) -> PathBuf {
    pin.join(format!("link_v{VERSION}_{prog}"))
}

/// What is loaded: the maps this process writes.
struct Loaded {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, u32, Backend>,
    /// Read only: which backend a connected socket was translated to (for SOCK_DESTROY).
    revnat: BpfHashMap<MapData, RevNatKey, RevNatValue>,
    _ebpf: Ebpf,
}

/// The eBPF backend.
pub struct EbpfBackend {
    options: EbpfOptions,
    loaded: Option<Loaded>,
    /// What the maps hold (read back from the pins at startup).
    image: Image,
    owned: HashMap<Owner, Owned>,
    svc_ids: IdPool,
    backend_ids: IdPool,
    /// ClusterIPs' wildcard entries and how many service ports (any protocol) have each.
    vips: HashMap<ServiceKey, u32>,
    /// The wildcard key each service port counts in `vips`.
    vip_of: HashMap<(svcplane_model::ServicePortName, svcplane_model::IpFamily), ServiceKey>,
    /// The north-south table (`None` with `north_south: false`).
    north_south: Option<NftablesBackend>,
}

impl EbpfBackend {
    pub fn new(options: EbpfOptions) -> Self {
        EbpfBackend {
            north_south: options
                .north_south
                .then(|| NftablesBackend::new().with_layout(Layout::NORTH_SOUTH)),
            options,
            loaded: None,
            image: Image::default(),
            owned: HashMap::new(),
            svc_ids: IdPool::default(),
            backend_ids: IdPool::default(),
            vips: HashMap::new(),
            vip_of: HashMap::new(),
        }
    }

    pub fn options(&self) -> &EbpfOptions {
        &self.options
    }

    /// Whether anything of this mode is pinned, or its north-south table exists (for other
    /// modes' startup cleanup).
    pub fn is_present(&self) -> bool {
        fs::read_dir(&self.options.pin_path)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
            || self.north_south.as_ref().is_some_and(|n| n.is_present())
    }

    /// Load the programs (reusing pinned maps), attach them to the cgroup, pin the links
    /// (replacing a previous run's, which detaches them only once the new ones are in place)
    /// and read the maps' contents.
    fn load(&mut self) -> Result<(), DataplaneError> {
        let o = &self.options;
        ensure_bpffs(&o.pin_path)?;
        fs::create_dir_all(&o.pin_path)
            .map_err(|e| err(format!("{}: {e}", o.pin_path.display())))?;
        let cgroup_path = match &o.cgroup_path {
            Some(p) => p.clone(),
            None => cgroup2_root()?,
        };
        let cgroup = fs::File::open(&cgroup_path)
            .map_err(|e| err(format!("cgroup {}: {e}", cgroup_path.display())))?;
        // include_bytes! gives 1-byte alignment; the ELF parser wants 8.
        let mut aligned: Vec<u64> = vec![0; OBJECT.len().div_ceil(8)];
        // SAFETY: the u64 buffer is at least OBJECT.len() bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), OBJECT.len())
        };
        bytes.copy_from_slice(OBJECT);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&o.pin_path)
            .map_max_entries(MAP_SERVICES, o.service_map_max)
            .map_max_entries(MAP_BACKENDS, o.backend_map_max)
            .map_max_entries(MAP_REVNAT, o.revnat_map_max)
            .map_max_entries(MAP_AFFINITY, o.affinity_map_max)
            .load(bytes)
            .map_err(|e| err(format!("loading the programs: {}", chain(&e))))?;
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| err(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(|e| err(format!("{name}: {e}")))?;
            prog.load()
                .map_err(|e| err(format!("verifying {name}: {}", chain(&e))))?;
            // A bpf_link (kernel >= 5.7) is always attached as with BPF_F_ALLOW_MULTI and
            // link_create refuses any flag: Single means "no flags" here. So the previous
            // run's links and these run side by side until the rename below.
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| {
                    err(format!(
                        "attaching {name} to {}: {}",
                        cgroup_path.display(),
                        chain(&e)
                    ))
                })?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|e| err(format!("{name}: {e}")))?
                .try_into()
                .map_err(|e| err(format!("{name}: {e}")))?;
            let path = link_pin(&o.pin_path, name);
            // bpffs refuses names with a dot.
            let tmp = pin_dir_join(&o.pin_path, &format!("link_v{VERSION}_{name}_new"));
            let _ = fs::remove_file(&tmp);
            let pinned = link
                .pin(&tmp)
                .map_err(|e| err(format!("pinning {}: {e}", tmp.display())))?;
            // Atomic replace: the previous link (if any) loses its pin and detaches.
            fs::rename(&tmp, &path).map_err(|e| err(format!("pinning {}: {e}", path.display())))?;
            drop(pinned);
        }
        let services: BpfHashMap<MapData, ServiceKey, ServiceValue> = ebpf
            .take_map(MAP_SERVICES)
            .ok_or_else(|| err("services map missing"))?
            .try_into()
            .map_err(|e| err(format!("{MAP_SERVICES}: {e}")))?;
        let backends: BpfHashMap<MapData, u32, Backend> = ebpf
            .take_map(MAP_BACKENDS)
            .ok_or_else(|| err("backends map missing"))?
            .try_into()
            .map_err(|e| err(format!("{MAP_BACKENDS}: {e}")))?;
        let revnat: BpfHashMap<MapData, RevNatKey, RevNatValue> = ebpf
            .take_map(MAP_REVNAT)
            .ok_or_else(|| err("reverse NAT map missing"))?
            .try_into()
            .map_err(|e| err(format!("{MAP_REVNAT}: {e}")))?;
        let mut config: aya::maps::Array<MapData, Config> = ebpf
            .take_map(MAP_CONFIG)
            .ok_or_else(|| err("config map missing"))?
            .try_into()
            .map_err(|e| err(format!("{MAP_CONFIG}: {e}")))?;
        let value = Config {
            host_netns_cookie: own_netns_cookie()?,
            flags: if o.hostns_only { CONFIG_HOSTNS_ONLY } else { 0 },
            pad: 0,
        };
        config
            .set(0, value, 0)
            .map_err(|e| err(format!("{MAP_CONFIG}: {e}")))?;
        self.image = read_image(&services, &backends);
        self.owned.clear();
        self.vips.clear();
        self.vip_of.clear();
        self.svc_ids = IdPool::default();
        self.backend_ids = IdPool::default();
        for e in self.image.frontends.values() {
            self.svc_ids.reserve(e.value.svc_id);
        }
        for id in self.image.backends.keys() {
            self.backend_ids.reserve(*id);
        }
        self.loaded = Some(Loaded {
            services,
            backends,
            revnat,
            _ebpf: ebpf,
        });
        Ok(())
    }

    /// Recompute the owners of the service ports the diff touches (all with `full`) into
    /// `new`; returns the keys and backend ids to diff: theirs, old and new, and on a full
    /// sync every key and id the maps hold (so entries nobody owns go). `stale` gets the
    /// backends UDP services lost (their connected sockets are destroyed after the sync).
    fn recompute(
        &mut self,
        desired: &DesiredState,
        diff: &Diff,
        new: &mut Image,
        stale: &mut BTreeSet<sockdestroy::Stale>,
    ) -> (BTreeSet<ServiceKey>, BTreeSet<u32>) {
        let mut keys = BTreeSet::new();
        let mut ids = BTreeSet::new();
        let full = diff.full;
        if full {
            keys.extend(self.image.frontends.keys().copied());
            ids.extend(self.image.backends.keys().copied());
        }
        // Wildcard entries whose count may have crossed zero (every one on a full sync).
        let mut vips_touched: BTreeSet<ServiceKey> = BTreeSet::new();
        for fam in desired.families() {
            let f = fam.family;
            let fd = diff.family(f);
            let touched: BTreeSet<_> = if full {
                fam.services
                    .keys()
                    .cloned()
                    .chain(
                        self.owned
                            .keys()
                            .filter(|(_, of, _)| *of == f)
                            .map(|(n, _, _)| n.clone()),
                    )
                    .collect()
            } else {
                fd.added
                    .iter()
                    .chain(&fd.changed)
                    .chain(&fd.removed)
                    .cloned()
                    .collect()
            };
            for name in touched {
                let sps = fam.services.get(&name);
                // Any protocol's ClusterIP counts (an SCTP-only Service's address rejects
                // TCP and UDP too, as the other modes' cluster-ips check does).
                let vip = sps.and_then(|s| s.cluster_ip).map(plan::wildcard_key);
                let vip_owner = (name.clone(), f);
                let old_vip = self.vip_of.remove(&vip_owner);
                if old_vip != vip {
                    if let Some(k) = old_vip
                        && let Some(n) = self.vips.get_mut(&k)
                    {
                        *n = n.saturating_sub(1);
                        vips_touched.insert(k);
                    }
                    if let Some(k) = vip {
                        *self.vips.entry(k).or_default() += 1;
                        vips_touched.insert(k);
                    }
                }
                if let Some(k) = vip {
                    self.vip_of.insert(vip_owner, k);
                }
                let plans = sps.map(|s| plan::plan_service(s, fam)).unwrap_or_default();
                for scope in [Scope::ClusterIp, Scope::External] {
                    let owner = (name.clone(), f, scope);
                    let previous = self.owned.remove(&owner);
                    if let Some(p) = &previous {
                        keys.extend(p.frontends.iter().copied());
                        ids.extend(p.backends.values().copied());
                    }
                    let new_plan = plans.iter().find(|p| p.scope == scope);
                    if let Some(p) = &previous
                        && p.frontends.iter().any(|k| k.proto == PROTO_UDP)
                    {
                        for &(ip, port) in p.backends.keys() {
                            let kept = new_plan.is_some_and(|n| n.backends.contains(&(ip, port)));
                            if !kept {
                                stale.insert((p.svc_id, ip, port));
                            }
                        }
                    }
                    match new_plan {
                        Some(sp) => {
                            let owned = plan::build_owned(
                                sp,
                                previous.as_ref(),
                                &mut self.svc_ids,
                                &mut self.backend_ids,
                                new,
                            );
                            keys.extend(owned.frontends.iter().copied());
                            ids.extend(owned.backends.values().copied());
                            if let Some(p) = &previous {
                                for (ep, id) in &p.backends {
                                    if !owned.backends.contains_key(ep) {
                                        self.backend_ids.release(*id);
                                    }
                                }
                            }
                            self.owned.insert(owner, owned);
                        }
                        None => {
                            if let Some(p) = previous {
                                self.svc_ids.release(p.svc_id);
                                for id in p.backends.values() {
                                    self.backend_ids.release(*id);
                                }
                            }
                        }
                    }
                }
            }
        }
        if full {
            vips_touched.extend(self.vips.keys().copied());
        }
        for k in vips_touched {
            keys.insert(k);
            match self.vips.get(&k) {
                Some(&n) if n > 0 => {
                    new.frontends.insert(k, plan::wildcard_entry());
                }
                _ => {
                    self.vips.remove(&k);
                }
            }
        }
        (keys, ids)
    }

    fn apply(&mut self, ops: &[Op]) -> Result<(), DataplaneError> {
        let l = self
            .loaded
            .as_mut()
            .ok_or_else(|| err("programs not loaded"))?;
        for op in ops {
            let r = match op {
                Op::PutBackend(id, b) => l.backends.insert(id, b, 0),
                Op::DelBackend(id) => l.backends.remove(id),
                Op::PutService(k, v) => l.services.insert(k, v, 0),
                Op::DelService(k) => l.services.remove(k),
            };
            match (op, r) {
                (_, Ok(())) => {}
                // Deleting what is already gone is what was wanted.
                (Op::DelBackend(_) | Op::DelService(_), Err(_)) => {}
                (op, Err(e)) => return Err(err(format!("{op:?}: {e}"))),
            }
        }
        Ok(())
    }

    fn names(&self) -> BTreeMap<u32, String> {
        self.owned
            .iter()
            .map(|((n, _, scope), o)| {
                let s = match scope {
                    Scope::ClusterIp => "ClusterIP",
                    Scope::External => "External",
                };
                (o.svc_id, format!("{n} {s}"))
            })
            .collect()
    }
}

/// This process's network namespace cookie (`SO_NETNS_COOKIE`, kernel 5.14+), what
/// `bpf_get_netns_cookie` gives for its sockets.
fn own_netns_cookie() -> Result<u64, DataplaneError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(format!(
            "a socket for the netns cookie: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a valid u64 buffer of `len` bytes; `fd` is open.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    let e = std::io::Error::last_os_error();
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err(format!("SO_NETNS_COOKIE (kernel 5.14 or later): {e}")));
    }
    Ok(cookie)
}

/// The maps' contents, slots grouped under their frontend.
fn read_image(
    services: &BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: &BpfHashMap<MapData, u32, Backend>,
) -> Image {
    let mut img = Image::default();
    let mut slots: BTreeMap<ServiceKey, BTreeMap<u16, u32>> = BTreeMap::new();
    for (k, v) in services.iter().flatten() {
        let front = ServiceKey { slot: 0, ..k };
        if k.slot == 0 {
            img.frontends.insert(
                front,
                FrontEntry {
                    value: v,
                    slots: Vec::new(),
                },
            );
        } else {
            slots.entry(front).or_default().insert(k.slot, v.backend_id);
        }
    }
    for (front, s) in slots {
        let max = s.keys().copied().max().unwrap_or(0);
        let e = img.frontends.entry(front).or_insert(FrontEntry {
            value: ServiceValue::default(),
            slots: Vec::new(),
        });
        e.slots = (1..=max).map(|i| s.get(&i).copied().unwrap_or(0)).collect();
    }
    for (id, b) in backends.iter().flatten() {
        img.backends.insert(id, b);
    }
    img
}

impl EbpfBackend {
    /// The socket load balancer's half of a sync: the maps.
    fn sync_maps(
        &mut self,
        desired: &Arc<DesiredState>,
        diff: &Diff,
    ) -> Result<SyncReport, DataplaneError> {
        let mut diff = diff.clone();
        if self.loaded.is_none() {
            self.load()?;
            diff.full = true;
        }
        // The periodic check: the pins must still be there, else reload and sync in full.
        if diff.is_empty() {
            let intact = PROGRAMS
                .iter()
                .all(|p| link_pin(&self.options.pin_path, p).exists())
                && MAPS.iter().all(|m| self.options.pin_path.join(m).exists());
            if intact {
                return Ok(SyncReport::default());
            }
            self.loaded = None;
            self.load()?;
            diff.full = true;
        }
        // `new` holds only the recomputed owners' entries (everything on a full sync), so a
        // partial sync costs what changed, not the size of the maps.
        let mut new = Image::default();
        let mut stale = BTreeSet::new();
        let (keys, ids) = self.recompute(desired, &diff, &mut new, &mut stale);
        let ops = plan::image_ops(&self.image, &new, &keys, &ids);
        let result = self.apply(&ops);
        if result.is_err() {
            // What the kernel holds is unknown now: read it back on the next (full) sync.
            self.loaded = None;
        }
        result?;
        for k in &keys {
            match new.frontends.remove(k) {
                Some(e) => self.image.frontends.insert(*k, e),
                None => self.image.frontends.remove(k),
            };
        }
        for id in &ids {
            match new.backends.remove(id) {
                Some(b) => self.image.backends.insert(*id, b),
                None => self.image.backends.remove(id),
            };
        }
        self.destroy_stale_udp(&stale);
        Ok(SyncReport {
            full: diff.full,
            size: ops.len(),
            ..SyncReport::default()
        })
    }

    /// Destroy the connected UDP sockets translated to a backend their Service lost. Never
    /// fails the sync (the maps are written): failures are logged.
    fn destroy_stale_udp(&self, stale: &BTreeSet<sockdestroy::Stale>) {
        let Some(l) = self.loaded.as_ref().filter(|_| !stale.is_empty()) else {
            return;
        };
        let translated = |cookie: u64, ip: std::net::IpAddr, port: u16| {
            let key = RevNatKey {
                cookie,
                addr: plan::addr_words(ip),
                port: port.to_be(),
                pad: [0; 6],
            };
            l.revnat.get(&key, 0).ok().map(|v| v.svc_id)
        };
        let outcome = sockdestroy::destroy(stale, &translated);
        if outcome.destroyed > 0 {
            tracing::info!(
                sockets = outcome.destroyed,
                "destroyed connected UDP sockets whose backend was removed"
            );
        }
        for e in &outcome.errors {
            tracing::warn!(error = %e, "cannot destroy connected UDP sockets of a removed backend");
        }
    }
}

impl Dataplane for EbpfBackend {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn sync(
        &mut self,
        desired: &Arc<DesiredState>,
        diff: &Diff,
    ) -> Result<SyncReport, DataplaneError> {
        let first = self.loaded.is_none();
        let maps = self.sync_maps(desired, diff)?;
        let Some(ns) = self.north_south.as_mut() else {
            if first {
                // Started with --ebpf-north-south=false: a table an earlier run left would
                // keep serving what this one was told to leave alone.
                let mut old = NftablesBackend::new().with_layout(Layout::NORTH_SOUTH);
                if old.is_present() {
                    match old.cleanup() {
                        Ok(()) => tracing::info!(
                            table = old.table(),
                            "removed the north-south table an earlier run left (--ebpf-north-south=false)"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot remove the north-south table an earlier run left")
                        }
                    }
                }
            }
            return Ok(maps);
        };
        // Its own full/partial decision and periodic check (an empty diff probes the table).
        let ns = ns.sync(desired, diff)?;
        Ok(SyncReport {
            full: maps.full || ns.full,
            size: maps.size + ns.size,
            ..ns
        })
    }

    fn render(&self, desired: &DesiredState) -> Result<String, DataplaneError> {
        let mut b = EbpfBackend::new(self.options.clone());
        let mut new = Image::default();
        let diff = Diff::between(None, desired, true);
        b.recompute(desired, &diff, &mut new, &mut BTreeSet::new());
        let mut out = format!(
            "# eBPF socket-LB maps under {} (services {}, backends {})\n",
            self.options.pin_path.display(),
            new.frontends.len(),
            new.backends.len()
        );
        out.push_str(&plan::render_table(&new, &b.names()));
        if let Some(ns) = &self.north_south {
            out.push_str(&format!(
                "\n# North-south (from outside the node): nftables table {}, prerouting side only\n",
                ns.table()
            ));
            out.push_str(&ns.render(desired)?);
        }
        Ok(out)
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        if let Some(ns) = self.north_south.as_mut() {
            ns.cleanup()?;
        }
        self.loaded = None;
        self.image = Image::default();
        self.owned.clear();
        self.vips.clear();
        self.vip_of.clear();
        let dir = &self.options.pin_path;
        let entries = match fs::read_dir(dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(err(format!("{}: {e}", dir.display()))),
        };
        // Links first (removing the last reference detaches the programs), then maps; every
        // version's names, so an upgrade's cleanup also removes what an older svcplane left.
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort_by_key(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("link_"))
        });
        for f in files {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with("link_") || name.starts_with("SVCP_") {
                fs::remove_file(&f).map_err(|e| err(format!("{}: {e}", f.display())))?;
            }
        }
        match fs::remove_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(format!(
                "{} (left in place: not empty?): {e}",
                dir.display()
            ))),
        }
    }
}
