//! Objects kept in a sorted set by their own name: a "name → object" index that holds no
//! copy of the name (10k Services in two such maps were 20k name copies as keys).

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::sync::Arc;

use svcplane_model::{NamespacedName, Pod, Service};

/// An object that carries its namespace/name.
pub(crate) trait Named {
    fn name(&self) -> &NamespacedName;
}

impl Named for Service {
    fn name(&self) -> &NamespacedName {
        &self.name
    }
}

impl Named for Pod {
    fn name(&self) -> &NamespacedName {
        &self.name
    }
}

/// An `Arc<T>` compared, ordered and looked up (`Borrow`) by `T`'s name, so that a
/// `BTreeSet<ByName<T>>` is a map from the name to the object.
#[derive(Debug)]
pub(crate) struct ByName<T>(pub Arc<T>);

impl<T> Clone for ByName<T> {
    fn clone(&self) -> Self {
        ByName(self.0.clone())
    }
}

impl<T: Named> Borrow<NamespacedName> for ByName<T> {
    fn borrow(&self) -> &NamespacedName {
        self.0.name()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use svcplane_model::{Format, Object, parse_manifest};

    #[test]
    fn a_set_by_name_is_a_map_from_the_name() {
        let svc = |ns: &str, name: &str, port: u16| {
            let text = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
                 spec: {{clusterIP: 10.96.0.1, ports: [{{port: {port}}}]}}\n"
            );
            match parse_manifest(&text, Format::Yaml)
                .unwrap()
                .objects
                .remove(0)
            {
                Object::Service(s) => s,
                other => panic!("{other:?}"),
            }
        };
        let mut set = BTreeSet::new();
        set.replace(ByName(svc("b", "web", 80)));
        set.replace(ByName(svc("a", "web", 80)));
        // The same name again replaces the object.
        let old = set.replace(ByName(svc("b", "web", 81)));
        assert_eq!(old.map(|o| o.0.ports[0].port), Some(80));
        assert_eq!(set.len(), 2);
        let b = NamespacedName::new("b", "web");
        assert_eq!(set.get(&b).map(|s| s.0.ports[0].port), Some(81));
        let from = NamespacedName::new("b", "");
        let names: Vec<&NamespacedName> = set
            .range::<NamespacedName, _>(&from..)
            .map(|s| &s.0.name)
            .collect();
        assert_eq!(names, [&b]);
        assert!(set.remove(&b));
        assert_eq!(set.len(), 1);
    }
}
