use std::fmt;

use crate::types::Kind;

/// A value svcplane cannot program. Names the object, the field and the offending
/// value, e.g.
/// `Service default/web: spec.ports[0].port: invalid value "0": must be between 1 and 65535`.
///
/// As an `Err` it rejects the whole object. In [`Converted::warnings`] it is a single
/// value that was ignored while the rest of the object was kept, as kube-proxy ignores
/// (and logs) an unparsable externalIP or an endpoint of the wrong IP family.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidObject {
    pub kind: Kind,
    /// `namespace/name` (or just `name` when cluster-scoped or unknown).
    pub object: String,
    /// JSON path of the field, e.g. `spec.ports[0].port`.
    pub field: String,
    /// The offending value as written (empty when the field is missing).
    pub value: String,
    /// What is wrong, e.g. `must be between 1 and 65535`.
    pub reason: String,
}

impl fmt::Display for InvalidObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}: invalid value {:?}: {}",
            self.kind, self.object, self.field, self.value, self.reason
        )
    }
}

/// A converted object, and the values ignored to keep it (each reported, never silent).
#[derive(Debug, Clone, PartialEq)]
pub struct Converted<T> {
    pub object: T,
    pub warnings: Vec<InvalidObject>,
}

impl<T> Converted<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Converted<U> {
        Converted {
            object: f(self.object),
            warnings: self.warnings,
        }
    }
}

/// A manifest file (or one document of it) that is not valid YAML/JSON or not a
/// Kubernetes object at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line of the problem within the file (1 when unknown).
    pub line: usize,
    pub reason: String,
}
