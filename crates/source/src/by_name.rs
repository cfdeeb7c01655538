//! Objects of any kind kept in a sorted set by their own namespace and name (`ByKey`; one
//! kind's objects: `svcplane_model::ByName`), holding no copy of the key.

use svcplane_model::{Object, ObjectKey};

/// A set ordered by a borrowed view: `$set` (and `dyn $view`) compared and ordered by
/// `parts()`, and `$set` borrowed as `dyn $view`, so the set is looked up by any value
/// with the same view (an `ObjectKey`, a bound).
macro_rules! ordered_by_view {
    ($set:ty, $view:ident) => {
        ordered_by_view!(@ord $set);
        ordered_by_view!(@ord dyn $view + '_);

        impl<'a> std::borrow::Borrow<dyn $view + 'a> for $set {
            fn borrow(&self) -> &(dyn $view + 'a) {
                self
            }
        }
    };
    (@ord $t:ty) => {
        impl PartialEq for $t {
            fn eq(&self, other: &Self) -> bool {
                self.parts() == other.parts()
            }
        }

        impl Eq for $t {}

        impl PartialOrd for $t {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl Ord for $t {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.parts().cmp(&other.parts())
            }
        }
    };
}
pub(crate) use ordered_by_view;

/// An object's namespace and name, borrowed: what a set of one kind's objects is looked up
/// by, whether from an [`ObjectKey`] or from an object (a Node's name is no
/// `NamespacedName`, so `Borrow<NamespacedName>` cannot serve).
pub(crate) trait NameView {
    fn parts(&self) -> (&str, &str);
}

impl NameView for ObjectKey {
    fn parts(&self) -> (&str, &str) {
        (&self.name.namespace, &self.name.name)
    }
}

impl NameView for ByKey {
    fn parts(&self) -> (&str, &str) {
        match &self.0 {
            Object::Service(s) => (&s.name.namespace, &s.name.name),
            Object::EndpointSlice(s) => (&s.name.namespace, &s.name.name),
            Object::Pod(p) => (&p.name.namespace, &p.name.name),
            Object::Node(n) => ("", &n.name),
        }
    }
}

/// An object in a set of objects of one kind, compared, ordered and looked up (as a
/// `&dyn NameView`) by its namespace and name: a map from the key to the object that
/// holds no copy of the key.
#[derive(Debug, Clone)]
pub(crate) struct ByKey(pub Object);

ordered_by_view!(ByKey, NameView);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use svcplane_model::{ByName, Format, Kind, NamespacedName, parse_manifest};

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

        // The same by key, from an `ObjectKey`.
        let mut objects = BTreeSet::new();
        objects.replace(ByKey(Object::Service(svc("b", "web", 80))));
        objects.replace(ByKey(Object::Service(svc("a", "web", 80))));
        objects.replace(ByKey(Object::Service(svc("b", "web", 81))));
        assert_eq!(objects.len(), 2);
        let key = ObjectKey {
            kind: Kind::Service,
            name: b.clone(),
        };
        let found = objects.get(&key as &dyn NameView).map(|o| o.0.clone());
        assert!(matches!(found, Some(Object::Service(s)) if s.ports[0].port == 81));
        assert!(objects.remove(&key as &dyn NameView));
        assert!(!objects.contains(&key as &dyn NameView));
    }
}
