//! Shared copies of the names many endpoints repeat (node and zone names): one allocation
//! per distinct name, not one per endpoint. The objects hold `Arc<str>`s from here, and the
//! engine's endpoint records clone those `Arc`s, so a name costs one allocation however
//! many slices, service ports and states name it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

/// A set of shared names that forgets names nobody holds any more, now and then.
#[derive(Debug, Default)]
pub struct Interner {
    names: HashSet<Arc<str>>,
    /// Names kept after the last prune.
    kept: usize,
}

impl Interner {
    /// The shared copy of `name`.
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        // Nodes come and go: forget the unused names once the set has doubled since the
        // last prune, so the cost is amortised over the insertions.
        if self.names.len() > 2 * self.kept + 64 {
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.kept = self.names.len();
        }
        let shared: Arc<str> = Arc::from(name);
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

/// The process-wide shared copy of `name` (see [`Interner`]): what conversions use for
/// node and zone names, whichever source and thread convert the object.
pub fn shared_name(name: &str) -> Arc<str> {
    // A panic elsewhere while holding the lock leaves a usable set (no invariant spans
    // the set's operations), so a poisoned lock is taken over.
    let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    shared.get_or_insert_with(Interner::default).get(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_name() {
        let mut names = Interner::default();
        let a = names.get("node-a");
        let b = names.get("node-a");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(names.len(), 1);
        assert!(Arc::ptr_eq(&shared_name("zone-x"), &shared_name("zone-x")));
    }

    #[test]
    fn unused_names_are_forgotten() {
        let mut names = Interner::default();
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
