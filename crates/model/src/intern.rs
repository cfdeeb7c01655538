//! Shared copies of the names many endpoints repeat (node and zone names): one allocation
//! per distinct name, not one per endpoint. The objects hold `Arc<str>`s from here, and the
//! engine's endpoint records clone those `Arc`s, so a name costs one allocation however
//! many slices, service ports and states name it. Likewise an endpoint's (node, zone)
//! pair ([`shared_topology`]): one per node, not one per endpoint.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use crate::types::{EndpointPort, Topology};

/// A set of shared values (names by default) that forgets values nobody holds any more,
/// now and then.
#[derive(Debug)]
pub struct Interner<T: ?Sized = str> {
    names: HashSet<Arc<T>>,
    /// Values kept after the last prune.
    kept: usize,
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            names: HashSet::new(),
            kept: 0,
        }
    }
}

/// What an [`Interner`] holds: a value it can make the first shared copy of.
pub trait Share: Eq + Hash {
    fn share(&self) -> Arc<Self>;
}

impl Share for str {
    fn share(&self) -> Arc<str> {
        Arc::from(self)
    }
}

impl Share for Topology {
    fn share(&self) -> Arc<Topology> {
        Arc::new(self.clone())
    }
}

impl Share for [EndpointPort] {
    fn share(&self) -> Arc<[EndpointPort]> {
        Arc::from(self)
    }
}

impl<T: ?Sized + Share> Interner<T> {
    /// The shared copy of `name`.
    pub fn get(&mut self, name: &T) -> Arc<T> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        // Nodes come and go: forget the unused names once the set has doubled since the
        // last prune, so the cost is amortised over the insertions.
        if self.names.len() > 2 * self.kept + 64 {
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.kept = self.names.len();
        }
        let shared = name.share();
        self.names.insert(shared.clone());
        shared
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

static SHARED: Mutex<Option<Interner>> = Mutex::new(None);
static TOPOLOGIES: Mutex<Option<Interner<Topology>>> = Mutex::new(None);
static PORTS: Mutex<Option<Interner<[EndpointPort]>>> = Mutex::new(None);

/// The process-wide shared copy of `value` in `set` (see [`Interner`]), whichever source
/// and thread convert the object.
fn shared<T: ?Sized + Share>(set: &Mutex<Option<Interner<T>>>, value: &T) -> Arc<T> {
    // A panic elsewhere while holding the lock leaves a usable set (no invariant spans
    // the set's operations), so a poisoned lock is taken over.
    let mut set = set.lock().unwrap_or_else(PoisonError::into_inner);
    set.get_or_insert_with(Interner::default).get(value)
}

/// The shared copy of `name`: what conversions use for node and zone names.
pub fn shared_name(name: &str) -> Arc<str> {
    shared(&SHARED, name)
}

/// The shared copy of an endpoint's node and zone (their names shared too).
pub fn shared_topology(node_name: Option<&str>, zone: Option<&str>) -> Arc<Topology> {
    let topology = Topology {
        node_name: node_name.map(shared_name),
        zone: zone.map(shared_name),
    };
    shared(&TOPOLOGIES, &topology)
}

/// The shared copy of an EndpointSlice's port list.
pub fn shared_ports(ports: &[EndpointPort]) -> Arc<[EndpointPort]> {
    shared(&PORTS, ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_name() {
        let mut names: Interner = Interner::default();
        let a = names.get("node-a");
        let b = names.get("node-a");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(names.len(), 1);
        assert!(Arc::ptr_eq(&shared_name("zone-x"), &shared_name("zone-x")));
        let a = shared_topology(Some("node-a"), Some("zone-x"));
        assert!(Arc::ptr_eq(
            &a,
            &shared_topology(Some("node-a"), Some("zone-x"))
        ));
        assert!(!Arc::ptr_eq(&a, &shared_topology(Some("node-a"), None)));
        assert_eq!(a.zone.as_deref(), Some("zone-x"));
        let http = [EndpointPort {
            name: "http".into(),
            protocol: crate::Protocol::Tcp,
            port: 8080,
        }];
        assert!(Arc::ptr_eq(
            &shared_ports(&http),
            &shared_ports(&http.clone())
        ));
    }

    #[test]
    fn unused_names_are_forgotten() {
        let mut names: Interner = Interner::default();
        let mut held = Vec::new();
        // 1000 names, only the last 50 of each round of 100 still held by someone.
        for round in 0..10 {
            held.clear();
            for k in 0..100 {
                let name = names.get(&format!("node-{round}-{k}"));
                if k >= 50 {
                    held.push(name);
                }
            }
        }
        assert!(names.len() <= 2 * 100 + 64 + 1, "{}", names.len());
        // What is held stays shared.
        assert!(Arc::ptr_eq(&names.get("node-9-99"), &held[49]));
    }
}
