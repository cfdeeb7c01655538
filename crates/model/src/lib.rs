//! svcplane's model: Kubernetes objects (k8s-openapi types) parsed from YAML/JSON
//! and converted into compact, validated internal types.
//!
//! Flow: `parse` (text → k8s-openapi objects) → `convert` (validate + compact).

mod by_name;
mod convert;
mod error;
mod intern;
mod parse;
mod types;
pub mod validate;

pub use by_name::{ByName, Named};
pub use convert::{
    DEFAULT_NAMESPACE, DEFAULT_SESSION_AFFINITY_TIMEOUT, HEADLESS_LABEL, IPVS_SCHEDULER_ANNOTATION,
    IPVS_SCHEDULERS, LAST_CHANGE_TRIGGER_TIME_ANNOTATION, MAX_SESSION_AFFINITY_TIMEOUT,
    SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, ZONE_LABEL, endpoint_slice_from_k8s,
    node_from_k8s, pod_from_k8s, service_from_k8s,
};
pub use error::{Converted, InvalidObject, ParseError};
pub use intern::{Interner, Share, shared_name, shared_ports, shared_topology};
pub use types::*;
pub use validate::{is_dns1035_label, is_dns1123_label, is_dns1123_subdomain, is_iana_svc_name};

/// Input syntax of a manifest file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// By file extension: `.yaml`/`.yml` → YAML, `.json` → JSON, otherwise `None`.
    pub fn from_path(path: &std::path::Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// What one manifest file yields.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Parsed {
    /// Valid objects of the kinds svcplane uses (Service, EndpointSlice, Node, Pod).
    pub objects: Vec<Object>,
    /// Objects of those kinds that failed validation; every other object is still in `objects`.
    pub invalid: Vec<InvalidObject>,
    /// Values ignored in objects that were kept (in `objects`), e.g. one unparsable externalIP.
    pub warnings: Vec<InvalidObject>,
    /// Kinds svcplane does not use (Deployment, ConfigMap, ...), as `apiVersion/kind`, skipped.
    pub ignored: Vec<String>,
}

/// Parse a whole manifest file: multi-document YAML (`---`), a JSON value, or a
/// `kind: List` of items. `Err` when the text itself is not valid YAML/JSON
/// (the caller keeps the file's previous objects).
///
/// Documents that are not Kubernetes objects, or of other kinds, land in
/// [`Parsed::ignored`]; an object that does not fit its k8s-openapi type or fails
/// validation lands in [`Parsed::invalid`] and the file's other objects still load.
pub fn parse_manifest(text: &str, format: Format) -> Result<Parsed, ParseError> {
    parse::parse_manifest(text, format)
}
