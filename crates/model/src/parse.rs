//! Text → documents (`serde_json::Value`) → k8s-openapi objects → validated types.
//!
//! Each document is parsed once into a `Value`, dispatched on `apiVersion`/`kind`
//! and deserialized from that `Value` by reference; only a document that fails
//! is deserialized a second time, with path tracking, to name the bad field.
//!
//! One document at a time: it is parsed, converted and dropped before the next is
//! parsed, so a file of 20k objects never has 20k `Value`s (about 20× the text) alive
//! at once — that was the proxy's peak heap.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::convert::{
    endpoint_slice_from_k8s, node_from_k8s, object_ref, pod_from_k8s, service_from_k8s,
};
use crate::error::{Converted, InvalidObject, ParseError};
use crate::types::{Kind, Object};
use crate::{Format, Parsed};

/// `kind: List` inside `kind: List` is legal but never deep in practice; the cap
/// only stops pathological input from recursing without bound.
const MAX_LIST_DEPTH: usize = 16;

pub(crate) fn parse_manifest(text: &str, format: Format) -> Result<Parsed, ParseError> {
    let mut parsed = Parsed::default();
    match format {
        Format::Yaml => {
            for (first_line, chunk) in yaml_chunks(text) {
                for document in yaml_documents(chunk, first_line)? {
                    dispatch(document, &mut parsed, 0);
                }
            }
        }
        Format::Json => {
            // A stream, so concatenated JSON values work and an empty file yields nothing.
            for document in serde_json::Deserializer::from_str(text).into_iter::<JsonDocument>() {
                let document = document.map_err(|e| ParseError {
                    line: e.line().max(1),
                    reason: json_reason(&e),
                })?;
                absorb(&mut parsed, document.0);
            }
        }
    }
    Ok(parsed)
}

/// The YAML text cut at its document markers (`---` at the start of a line), each piece
/// with the number of lines before it. YAML forbids a marker inside a document's content
/// (a `---` line always starts a new document), so every piece holds whole documents.
/// Directives (`%YAML`) belong to the document after them: text with any is one piece.
fn yaml_chunks(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let directives = text.starts_with('%') || text.contains("\n%");
    let mut rest = text;
    let mut line = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len();
        if !directives {
            // The next marker line after this piece's first line.
            let mut offset = 0;
            while let Some(nl) = rest[offset..].find('\n') {
                let next = offset + nl + 1;
                if is_document_marker(&rest[next..]) {
                    end = next;
                    break;
                }
                offset = next;
            }
        }
        let (chunk, tail) = rest.split_at(end);
        let first_line = line;
        line += chunk.matches('\n').count();
        rest = tail;
        Some((first_line, chunk))
    })
}

/// `---` followed by a space, a tab, a line end or the end of the text.
fn is_document_marker(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|after| after.is_empty() || after.starts_with([' ', '\t', '\n', '\r']))
}

fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    // Manifest directories hold tens of thousands of objects, often in one file.
    // These limits scale with the input size; the alias/anchor limits that guard
    // against amplification ("billion laughs") stay at their defaults.
    budget.max_documents = usize::MAX;
    budget.max_nodes = usize::MAX;
    budget.max_events = usize::MAX;
    budget.max_total_scalar_bytes = usize::MAX;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.with_snippet = false;
    options.emit_comments = false;
    options
}

/// The documents of `text`, which starts at line `first_line + 1` of the file.
fn yaml_documents(text: &str, first_line: usize) -> Result<Vec<Value>, ParseError> {
    serde_saphyr::from_multiple_with_options::<Value>(text, yaml_options()).map_err(|e| {
        let line = e
            .location()
            .map(|l| usize::try_from(l.line()).unwrap_or(usize::MAX))
            .filter(|&l| l > 0)
            .unwrap_or(1);
        ParseError {
            line: line.saturating_add(first_line),
            reason: yaml_reason(&e),
        }
    })
}

/// The error's message without the trailing location, which `ParseError` carries itself.
fn yaml_reason(e: &serde_saphyr::Error) -> String {
    let text = e.to_string();
    let first_line = text.lines().next().unwrap_or_default();
    match first_line.rfind(" at line ") {
        Some(pos) => first_line[..pos].to_string(),
        None => first_line.to_string(),
    }
}

fn absorb(parsed: &mut Parsed, more: Parsed) {
    parsed.objects.extend(more.objects);
    parsed.invalid.extend(more.invalid);
    parsed.warnings.extend(more.warnings);
    parsed.ignored.extend(more.ignored);
}

/// One top-level JSON value, converted while it is read: a list's `items` go one at a
/// time, so an 18 MB `kubectl get -o json` List is never one `Value` tree (about 20× the
/// text). Items that name their own apiVersion and kind are converted at once (if the
/// value turns out not to be a list, they are dropped again, as an unknown field); items
/// that do not wait for the list's kind, if it comes after them.
struct JsonDocument(Parsed);

/// The JSON scalars, as `Value`s handed to `self.other` (both visitors treat them as
/// written).
macro_rules! scalars_to_other {
    () => {
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(self.other(Value::Bool(v)))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(self.other(Value::from(v)))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(self.other(Value::from(v)))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(self.other(Value::from(v)))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(self.other(Value::String(v.to_owned())))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(self.other(Value::Null))
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(self.other(Value::Null))
        }
    };
}

impl<'de> serde::Deserialize<'de> for JsonDocument {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl DocumentVisitor {
    fn other(self, value: Value) -> JsonDocument {
        let mut parsed = Parsed::default();
        dispatch(value, &mut parsed, 0);
        JsonDocument(parsed)
    }
}

impl<'de> serde::de::Visitor<'de> for DocumentVisitor {
    type Value = JsonDocument;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    scalars_to_other!();

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<JsonDocument, A::Error> {
        let mut values = Vec::new();
        while let Some(v) = seq.next_element::<Value>()? {
            values.push(v);
        }
        Ok(self.other(Value::Array(values)))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<JsonDocument, A::Error> {
        let mut fields = serde_json::Map::new();
        let mut items = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" && items.is_none() {
                items = Some(map.next_value_seed(ItemsVisitor { fields: &fields })?);
            } else {
                let value = map.next_value::<Value>()?;
                fields.insert(key, value);
            }
        }
        Ok(JsonDocument(finish_document(fields, items)))
    }
}

/// A JSON object read with its first `items` taken out: as a list (see
/// [`dispatch_list`], which this follows) or, if it is none, as written.
fn finish_document(mut fields: serde_json::Map<String, Value>, items: Option<Items>) -> Parsed {
    let mut parsed = Parsed::default();
    let kind = fields
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match items {
        Some(Items::Streamed {
            parsed: done,
            waiting,
        }) if kind.ends_with("List") && !fields.contains_key("items") => {
            parsed = done;
            let item_kind = kind.strip_suffix("List").unwrap_or_default().to_string();
            let api_version = Value::String(
                str_field_of(&fields, "apiVersion")
                    .unwrap_or_default()
                    .to_string(),
            );
            for mut item in waiting {
                if !item_kind.is_empty()
                    && let Some(map) = item.as_object_mut()
                {
                    map.entry("apiVersion")
                        .or_insert_with(|| api_version.clone());
                    map.entry("kind")
                        .or_insert_with(|| Value::String(item_kind.clone()));
                }
                dispatch(item, &mut parsed, 1);
            }
        }
        // Not a list (its items are an unknown field), or a second `items`, which is the
        // one a `Value` keeps.
        Some(Items::Streamed { .. }) | None => dispatch(Value::Object(fields), &mut parsed, 0),
        Some(Items::Other(value)) => {
            fields.entry("items").or_insert(value);
            dispatch(Value::Object(fields), &mut parsed, 0);
        }
    }
    parsed
}

/// What a JSON object's `items` gave.
enum Items {
    /// An array: the items converted so far, and those waiting for the list's kind.
    Streamed { parsed: Parsed, waiting: Vec<Value> },
    /// Anything else, kept as written.
    Other(Value),
}

/// Reads `items`, given the fields of its object read before it.
struct ItemsVisitor<'a> {
    fields: &'a serde_json::Map<String, Value>,
}

impl ItemsVisitor<'_> {
    fn other(self, value: Value) -> Items {
        Items::Other(value)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for ItemsVisitor<'_> {
    type Value = Items;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Items, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ItemsVisitor<'_> {
    type Value = Items;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    scalars_to_other!();

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Items, A::Error> {
        let mut value = serde_json::Map::new();
        while let Some((k, v)) = map.next_entry::<String, Value>()? {
            value.insert(k, v);
        }
        Ok(Items::Other(Value::Object(value)))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Items, A::Error> {
        // The item kind, if the list's kind came before its items (as the API server
        // writes lists); kubectl writes `kind` after `items`.
        let kind = self.fields.get("kind").and_then(Value::as_str);
        let known = kind.and_then(|k| k.strip_suffix("List")).map(|item_kind| {
            let api_version = str_field_of(self.fields, "apiVersion").unwrap_or_default();
            (api_version, item_kind)
        });
        let mut parsed = Parsed::default();
        let mut waiting = Vec::new();
        while let Some(mut item) = seq.next_element::<Value>()? {
            let own = !str_field(&item, "apiVersion")
                .unwrap_or_default()
                .is_empty()
                && !str_field(&item, "kind").unwrap_or_default().is_empty();
            // Once one waits, the rest wait too: document order decides duplicates.
            if !waiting.is_empty() || !(own || known.is_some()) {
                waiting.push(item);
                continue;
            }
            if let Some((api_version, item_kind)) = known
                && !item_kind.is_empty()
                && let Some(map) = item.as_object_mut()
            {
                map.entry("apiVersion")
                    .or_insert_with(|| Value::String(api_version.to_string()));
                map.entry("kind")
                    .or_insert_with(|| Value::String(item_kind.to_string()));
            }
            dispatch(item, &mut parsed, 1);
        }
        Ok(Items::Streamed { parsed, waiting })
    }
}

fn json_reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(pos) => text[..pos].to_string(),
        None => text,
    }
}

fn str_field_of<'a>(map: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key).and_then(Value::as_str)
}

fn str_field<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

fn dispatch(document: Value, parsed: &mut Parsed, depth: usize) {
    if document.is_null() {
        return;
    }
    if !document.is_object() {
        parsed.ignored.push(format!(
            "<not a Kubernetes object: a {}>",
            value_kind(&document)
        ));
        return;
    }
    let api_version = str_field(&document, "apiVersion").unwrap_or_default();
    let kind = str_field(&document, "kind").unwrap_or_default();
    match (api_version, kind) {
        ("v1", "Service") => decode_into(
            &document,
            Kind::Service,
            parsed,
            |s: k8s_openapi::api::core::v1::Service| {
                service_from_k8s(&s).map(|c| c.map(Object::from))
            },
        ),
        ("discovery.k8s.io/v1", "EndpointSlice") => decode_into(
            &document,
            Kind::EndpointSlice,
            parsed,
            |s: k8s_openapi::api::discovery::v1::EndpointSlice| {
                endpoint_slice_from_k8s(&s).map(|c| c.map(Object::from))
            },
        ),
        ("v1", "Node") => decode_into(
            &document,
            Kind::Node,
            parsed,
            |n: k8s_openapi::api::core::v1::Node| node_from_k8s(&n).map(|c| c.map(Object::from)),
        ),
        ("v1", "Pod") => decode_into(
            &document,
            Kind::Pod,
            parsed,
            |p: k8s_openapi::api::core::v1::Pod| pod_from_k8s(&p).map(|c| c.map(Object::from)),
        ),
        (_, list) if list.ends_with("List") && document.get("items").is_some() => {
            dispatch_list(document, parsed, depth)
        }
        ("", "") => parsed
            .ignored
            .push("<not a Kubernetes object: no apiVersion/kind>".to_string()),
        (api_version, kind) => parsed.ignored.push(format!("{api_version}/{kind}")),
    }
}

/// `kind: List` (items carry their own apiVersion/kind) and typed lists such as
/// `ServiceList`, whose items usually omit them (as the API server returns them).
fn dispatch_list(mut document: Value, parsed: &mut Parsed, depth: usize) {
    let api_version = str_field(&document, "apiVersion")
        .unwrap_or_default()
        .to_string();
    let kind = str_field(&document, "kind").unwrap_or_default().to_string();
    if depth >= MAX_LIST_DEPTH {
        parsed
            .ignored
            .push(format!("{api_version}/{kind} (lists nested too deep)"));
        return;
    }
    let item_kind = kind.strip_suffix("List").unwrap_or_default().to_string();
    let items = match document.get_mut("items").map(Value::take) {
        Some(Value::Array(items)) => items,
        Some(Value::Null) | None => Vec::new(),
        Some(other) => {
            parsed.ignored.push(format!(
                "{api_version}/{kind} (items is a {}, not a list)",
                value_kind(&other)
            ));
            return;
        }
    };
    for mut item in items {
        if !item_kind.is_empty()
            && let Some(map) = item.as_object_mut()
        {
            map.entry("apiVersion")
                .or_insert_with(|| Value::String(api_version.clone()));
            map.entry("kind")
                .or_insert_with(|| Value::String(item_kind.clone()));
        }
        dispatch(item, parsed, depth + 1);
    }
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "mapping",
    }
}

fn decode_into<T, F>(document: &Value, kind: Kind, parsed: &mut Parsed, convert: F)
where
    T: DeserializeOwned,
    F: FnOnce(T) -> Result<Converted<Object>, InvalidObject>,
{
    match decode::<T>(document, kind).and_then(convert) {
        Ok(converted) => {
            parsed.objects.push(converted.object);
            parsed.warnings.extend(converted.warnings);
        }
        Err(invalid) => parsed.invalid.push(invalid),
    }
}

/// Deserialize a k8s-openapi object from its document; a failure becomes an
/// `InvalidObject` naming the field that did not fit its type.
fn decode<T: DeserializeOwned>(document: &Value, kind: Kind) -> Result<T, InvalidObject> {
    if let Ok(object) = T::deserialize(document) {
        return Ok(object);
    }
    // Slow path, failures only: repeat with path tracking to name the field.
    let error = match serde_path_to_error::deserialize::<_, T>(document) {
        Ok(object) => return Ok(object),
        Err(error) => error,
    };
    let path = error.path();
    let field = if path.iter().next().is_none() {
        String::new()
    } else {
        path.to_string()
    };
    let value = lookup(document, path).map(render_value).unwrap_or_default();
    Err(InvalidObject {
        kind,
        object: document_ref(document, kind),
        field,
        value,
        reason: error.inner().to_string(),
    })
}

/// `namespace/name` as far as the raw document tells it.
fn document_ref(document: &Value, kind: Kind) -> String {
    let metadata = document.get("metadata");
    let name = metadata
        .and_then(|m| str_field(m, "name"))
        .unwrap_or_default();
    let namespace = match kind {
        Kind::Node => "",
        _ => metadata
            .and_then(|m| str_field(m, "namespace"))
            .filter(|ns| !ns.is_empty())
            .unwrap_or("default"),
    };
    object_ref(namespace, name)
}

fn lookup<'a>(document: &'a Value, path: &serde_path_to_error::Path) -> Option<&'a Value> {
    use serde_path_to_error::Segment;
    let mut current = document;
    for segment in path.iter() {
        current = match segment {
            Segment::Seq { index } => current.get(*index)?,
            Segment::Map { key } => current.get(key.as_str())?,
            Segment::Enum { .. } | Segment::Unknown => return Some(current),
        };
    }
    Some(current)
}

fn render_value(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{IpFamily, Protocol, ServiceType, TargetPort};

    fn yaml(text: &str) -> Parsed {
        match parse_manifest(text, Format::Yaml) {
            Ok(parsed) => parsed,
            Err(e) => panic!("unexpected parse error: {e}"),
        }
    }

    fn only_service(parsed: &Parsed) -> &crate::Service {
        assert_eq!(parsed.objects.len(), 1, "{parsed:?}");
        match &parsed.objects[0] {
            Object::Service(s) => s,
            other => panic!("not a Service: {other:?}"),
        }
    }

    const WEB: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.96.0.10
  ports:
  - port: 80
    targetPort: 8080
";

    #[test]
    fn single_service() {
        let parsed = yaml(WEB);
        let svc = only_service(&parsed);
        assert_eq!(svc.name.to_string(), "default/web");
        assert_eq!(svc.service_type, ServiceType::ClusterIp);
        assert_eq!(
            svc.cluster_ips,
            vec!["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(svc.ip_families, vec![IpFamily::V4]);
        assert_eq!(svc.ports[0].port, 80);
        assert_eq!(svc.ports[0].protocol, Protocol::Tcp);
        assert_eq!(svc.ports[0].target_port, TargetPort::Number(8080));
        assert!(parsed.invalid.is_empty() && parsed.ignored.is_empty());
    }

    /// A value kube-proxy would ignore costs that value only: the object is in
    /// `objects` and the value in `warnings`, named by object and field.
    #[test]
    fn ignored_values_are_warnings_not_invalid_objects() {
        let parsed = yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 010.096.000.010\n  externalIPs: [192.0.2.1, nope]\n  ports: [{port: 80}]\n",
        );
        let svc = only_service(&parsed);
        assert_eq!(
            svc.cluster_ips,
            vec!["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(svc.rare.external_ips.len(), 1);
        assert!(parsed.invalid.is_empty());
        let warnings: Vec<String> = parsed.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            [
                "Service default/web: spec.externalIPs[1]: invalid value \"nope\": must be a valid IP address"
            ]
        );
    }

    #[test]
    fn multi_document_valid_and_invalid() {
        let text = format!(
            "{WEB}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: bad\n  namespace: prod\nspec:\n  clusterIP: 10.96.0.11\n  ports:\n  - port: 80\n  - name: b\n    port: 70000\n"
        );
        let parsed = yaml(&text);
        assert_eq!(&*only_service(&parsed).name.name, "web");
        assert_eq!(parsed.invalid.len(), 1);
        let bad = &parsed.invalid[0];
        assert_eq!(bad.kind, Kind::Service);
        assert_eq!(bad.object, "prod/bad");
        // The first port has no name although there are two: that is reported first.
        assert_eq!(bad.field, "spec.ports[0].name");
    }

    #[test]
    fn invalid_port_message() {
        let text = WEB.replace("port: 80", "port: 70000");
        let parsed = yaml(&text);
        assert!(parsed.objects.is_empty());
        assert_eq!(
            parsed.invalid[0].to_string(),
            "Service default/web: spec.ports[0].port: invalid value \"70000\": must be between 1 and 65535"
        );
    }

    #[test]
    fn type_mismatch_names_field() {
        let text = format!("{}---\n{}", WEB.replace("port: 80", "port: \"abc\""), WEB);
        let parsed = yaml(&text);
        assert_eq!(parsed.objects.len(), 1, "the other document still loads");
        let bad = &parsed.invalid[0];
        assert_eq!(bad.object, "default/web");
        assert_eq!(bad.field, "spec.ports[0].port");
        assert_eq!(bad.value, "abc");
        assert!(bad.reason.contains("invalid type"), "{}", bad.reason);
    }

    #[test]
    fn json_input() {
        let text = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"ns"},
            "spec":{"clusterIP":"10.0.0.1","ports":[{"port":53,"protocol":"UDP"}]}}"#;
        let parsed = parse_manifest(text, Format::Json).unwrap();
        let svc = only_service(&parsed);
        assert_eq!(svc.name.to_string(), "ns/web");
        assert_eq!(svc.ports[0].protocol, Protocol::Udp);
        assert_eq!(svc.ports[0].target_port, TargetPort::Number(53));
    }

    #[test]
    fn json_syntax_error_line() {
        let text = "{\n  \"apiVersion\": \"v1\",\n  \"kind\": \"Service\"\n  \"metadata\": {}\n}";
        let err = parse_manifest(text, Format::Json).unwrap_err();
        assert_eq!(err.line, 4, "{err}");
    }

    #[test]
    fn empty_inputs() {
        for text in [
            "",
            "\n",
            "# just a comment\n",
            "---\n---\n",
            "---\n# c\n---\n",
        ] {
            let parsed = yaml(text);
            assert_eq!(parsed, Parsed::default(), "{text:?}");
        }
        assert_eq!(
            parse_manifest("  \n", Format::Json).unwrap(),
            Parsed::default()
        );
    }

    #[test]
    fn yaml_syntax_error_line() {
        let text =
            format!("{WEB}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: [unclosed\n");
        let err = parse_manifest(&text, Format::Yaml).unwrap_err();
        // WEB is 9 lines, `---` is line 10, so the bracket is on line 14 of the file.
        assert_eq!(WEB.lines().count(), 9);
        assert_eq!(err.line, 14, "{err}");
        assert!(err.reason.contains("unclosed"), "{err}");
        let err = parse_manifest("a: b\n c: d: e\n", Format::Yaml).unwrap_err();
        assert_eq!(err.line, 2, "{err}");
    }

    /// Documents are cut at `---` lines only: not at an indented `---` inside a block
    /// scalar, not at `---x`; each piece knows its first line, for error lines.
    #[test]
    fn yaml_is_cut_at_document_markers() {
        let text = "a: 1\n---\nb: |\n  ---\n  x\n---x: 2\n--- # c\nc: 3\n---\n";
        let chunks: Vec<(usize, &str)> = yaml_chunks(text).collect();
        assert_eq!(
            chunks,
            [
                (0, "a: 1\n"),
                (1, "---\nb: |\n  ---\n  x\n---x: 2\n"),
                (6, "--- # c\nc: 3\n"),
                (8, "---\n"),
            ]
        );
        let parsed = yaml(&format!("{WEB}---\n{WEB}"));
        assert_eq!(parsed.objects.len(), 2);
        // Directives belong to the next document: such text is not cut.
        assert_eq!(yaml_chunks("%YAML 1.2\n---\na: 1\n").count(), 1);
    }

    /// A JSON value is converted while it is read (a list's items one at a time), with the
    /// result of converting the whole `Value`: kind before or after the items, items with
    /// and without their own kind, lists that are none, items that are no list.
    #[test]
    fn json_streamed_as_the_whole_value() {
        let svc = |name: &str, own: bool| {
            let kind = if own {
                r#""apiVersion":"v1","kind":"Service","#
            } else {
                ""
            };
            format!(
                r#"{{{kind}"metadata":{{"name":"{name}"}},"spec":{{"clusterIP":"10.0.0.1","ports":[{{"port":80}}]}}}}"#
            )
        };
        let texts = [
            format!(
                r#"{{"apiVersion":"v1","kind":"ServiceList","items":[{},{}]}}"#,
                svc("a", false),
                svc("b", true)
            ),
            format!(
                r#"{{"apiVersion":"v1","items":[{},{},{}],"kind":"ServiceList","metadata":{{}}}}"#,
                svc("a", true),
                svc("b", false),
                svc("a", true)
            ),
            format!(
                r#"{{"apiVersion":"v1","items":[{},{}],"kind":"List"}}"#,
                svc("a", true),
                svc("b", false)
            ),
            format!(
                r#"{{"apiVersion":"v1","items":[{}],"kind":"Service","metadata":{{"name":"x"}},"spec":{{"clusterIP":"10.0.0.2","ports":[{{"port":81}}]}}}}"#,
                svc("a", true)
            ),
            format!(
                r#"{{"apiVersion":"v1","kind":"ServiceList","items":[{}],"items":[{}]}}"#,
                svc("a", false),
                svc("b", false)
            ),
            r#"{"apiVersion":"v1","kind":"ServiceList","items":{"a":1}}"#.to_string(),
            r#"{"apiVersion":"v1","kind":"ServiceList","items":null} [1, "x"] 7 null"#.to_string(),
            format!(
                r#"{{"kind":"List","items":[{{"kind":"List","apiVersion":"v1","items":[{}]}}]}}"#,
                svc("n", true)
            ),
        ];
        for text in &texts {
            let mut whole = Parsed::default();
            for value in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
                dispatch(value.unwrap(), &mut whole, 0);
            }
            let streamed = parse_manifest(text, Format::Json).unwrap();
            assert_eq!(streamed, whole, "{text}");
        }
        let parsed = parse_manifest(&texts[1], Format::Json).unwrap();
        let names: Vec<String> = parsed
            .objects
            .iter()
            .map(|o| o.key().name.name.to_string())
            .collect();
        assert_eq!(
            names,
            ["a", "b", "a"],
            "document order, kind after the items"
        );
    }

    #[test]
    fn kind_list_recursive() {
        let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a}
  spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
- apiVersion: v1
  kind: List
  items:
  - apiVersion: v1
    kind: Node
    metadata: {name: n1}
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {name: d}
";
        let parsed = yaml(text);
        assert_eq!(parsed.objects.len(), 2, "{parsed:?}");
        assert!(matches!(parsed.objects[1], Object::Node(_)));
        assert_eq!(parsed.ignored, vec!["apps/v1/Deployment".to_string()]);
    }

    #[test]
    fn typed_list_items_inherit_kind() {
        let text = r#"{"apiVersion":"v1","kind":"ServiceList","items":[
            {"metadata":{"name":"a"},"spec":{"clusterIP":"10.0.0.1","ports":[{"port":80}]}}]}"#;
        let parsed = parse_manifest(text, Format::Json).unwrap();
        assert_eq!(&*only_service(&parsed).name.name, "a");
    }

    #[test]
    fn other_kinds_and_non_objects_are_ignored() {
        let parsed = yaml(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n- a\n- b\n---\nfoo: bar\n",
        );
        assert!(parsed.objects.is_empty() && parsed.invalid.is_empty());
        assert_eq!(parsed.ignored.len(), 3, "{:?}", parsed.ignored);
        assert_eq!(parsed.ignored[0], "v1/ConfigMap");
        // EndpointSlice of an older API version is not what kube-proxy reads.
        let parsed = yaml("apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\n");
        assert_eq!(
            parsed.ignored,
            vec!["discovery.k8s.io/v1beta1/EndpointSlice".to_string()]
        );
    }

    #[test]
    fn all_kinds_from_one_file() {
        let text = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.1.0.5]
ports:
- port: 8080
---
apiVersion: v1
kind: Pod
metadata: {name: p, labels: {app: web}}
spec:
  containers:
  - name: c
    image: nginx
    ports: [{containerPort: 8080, name: http}]
status:
  podIP: 10.1.0.5
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
status:
  addresses: [{type: InternalIP, address: 192.168.1.10}]
";
        let parsed = yaml(text);
        assert!(parsed.invalid.is_empty(), "{:?}", parsed.invalid);
        let kinds: Vec<Kind> = parsed.objects.iter().map(|o| o.key().kind).collect();
        assert_eq!(kinds, vec![Kind::EndpointSlice, Kind::Pod, Kind::Node]);
    }

    #[test]
    fn many_documents_beyond_default_budget() {
        // serde-saphyr's default budget stops at 1024 documents.
        let mut text = String::new();
        for i in 0..1500 {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: 10.0.{}.{}, ports: [{{port: 80}}]}}\n",
                i / 256,
                i % 256
            ));
        }
        let parsed = yaml(&text);
        assert_eq!(parsed.objects.len(), 1500);
        assert!(parsed.invalid.is_empty());
    }

    #[test]
    fn invalid_object_without_name() {
        let parsed = yaml(
            "apiVersion: v1\nkind: Service\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n",
        );
        let bad = &parsed.invalid[0];
        assert_eq!(bad.field, "metadata.name");
        assert!(bad.reason.contains("required"), "{}", bad.reason);
    }
}
