//! Shared objects kept in a set by their own name: a "name → object" index that holds no
//! copy of the name (at 10k Services, maps keyed by name copies held tens of thousands of
//! them). The sources and the engine both keep their objects this way.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::{EndpointSlice, NamespacedName, Pod, Service, ServicePortName};

/// A value that carries its own name: what a [`ByName`] of it is keyed by.
pub trait Named {
    type Name: Ord + Hash;
    fn name(&self) -> &Self::Name;
}

impl Named for Service {
    type Name = NamespacedName;
    fn name(&self) -> &NamespacedName {
        &self.name
    }
}

impl Named for EndpointSlice {
    type Name = NamespacedName;
    fn name(&self) -> &NamespacedName {
        &self.name
    }
}

impl Named for Pod {
    type Name = NamespacedName;
    fn name(&self) -> &NamespacedName {
        &self.name
    }
}

/// An `Arc<T>` compared, ordered, hashed and looked up (`Borrow`) by `T`'s name only, so
/// that a `BTreeSet<ByName<T>>` (or `HashSet`) is a map from the name to the value.
#[derive(Debug)]
pub struct ByName<T>(pub Arc<T>);

impl<T> Clone for ByName<T> {
    fn clone(&self) -> Self {
        ByName(self.0.clone())
    }
}

impl<T: Named> PartialEq for ByName<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name()
    }
}

impl<T: Named> Eq for ByName<T> {}

impl<T: Named> PartialOrd for ByName<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T: Named> Ord for ByName<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.name().cmp(other.0.name())
    }
}

impl<T: Named> Hash for ByName<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.name().hash(state);
    }
}

// One impl per name type (a generic `Borrow<T::Name>` would overlap `Borrow<T> for T`).
impl<T: Named<Name = NamespacedName>> Borrow<NamespacedName> for ByName<T> {
    fn borrow(&self) -> &NamespacedName {
        self.0.name()
    }
}

impl<T: Named<Name = ServicePortName>> Borrow<ServicePortName> for ByName<T> {
    fn borrow(&self) -> &ServicePortName {
        self.0.name()
    }
}
