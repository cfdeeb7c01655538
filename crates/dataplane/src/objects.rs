//! What implements one service port in a mode, as that mode renders it: `svcplane
//! trace` shows these lines. Derived from the backend's own `render`, so no mode's
//! naming is copied here and a new mode is covered as soon as it renders.

use std::collections::HashMap;
use std::sync::Arc;

use svcplane_model::{IpFamily, ServicePortName};
use svcplane_proxy::{DataplaneError, DesiredState};

use crate::{BackendOptions, ProxyMode, backend_with};

/// One line of a mode's rendering that exists only because of the service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectLine {
    /// The closest shared line above it that names where it goes (an nft `map … {` or
    /// `chain … {`, an iptables `*table`, a `#` section header), if any.
    pub context: Option<String>,
    pub line: String,
}

/// The lines `mode` renders for service port `name` of `family` in `desired`: the
/// rendering of the node-wide settings plus that one port, minus the rendering of the
/// settings alone. An unknown port yields no lines.
pub fn service_objects(
    mode: ProxyMode,
    options: &BackendOptions,
    desired: &DesiredState,
    family: IpFamily,
    name: &ServicePortName,
) -> Result<Vec<ObjectLine>, DataplaneError> {
    let Some(port) = desired.family(family).services.get(name) else {
        return Ok(Vec::new());
    };
    let mut base = desired.clone();
    base.v4.services.clear();
    base.v6.services.clear();
    base.health_checks.clear();
    let mut with = base.clone();
    let fam = match family {
        IpFamily::V4 => &mut with.v4,
        IpFamily::V6 => &mut with.v6,
    };
    fam.services.insert(Arc::clone(port));
    let backend = backend_with(mode, options.clone());
    let base_text = backend.render(&base)?;
    let with_text = backend.render(&with)?;
    Ok(added_lines(&base_text, &with_text))
}

/// The lines of `with` that `base` lacks (as a multiset), each with its context: the
/// innermost enclosing `… {` block when that block is shared (an added block shows its
/// own opening line), else the last `*table` or `#` section header.
fn added_lines(base: &str, with: &str) -> Vec<ObjectLine> {
    let mut shared: HashMap<&str, usize> = HashMap::new();
    for line in base.lines() {
        *shared.entry(line).or_default() += 1;
    }
    // Open blocks: (opening line, shared with base).
    let mut blocks: Vec<(&str, bool)> = Vec::new();
    // The last section header, and whether it is shared (an added one is shown itself).
    let mut section: Option<(&str, bool)> = None;
    let mut out = Vec::new();
    for line in with.lines() {
        let l = line.trim();
        let is_shared = match shared.get_mut(line) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        // A lone brace says nothing, and the multiset cannot tell which block's it is.
        let only_braces = l.chars().all(|c| matches!(c, '{' | '}' | ';'));
        if !is_shared && !only_braces {
            let context = match blocks.last() {
                Some((open, true)) => Some(*open),
                Some((_, false)) => None,
                None => section.and_then(|(h, shared)| shared.then_some(h)),
            };
            out.push(ObjectLine {
                context: context.map(str::to_owned),
                line: line.trim_end().to_owned(),
            });
        }
        if l.starts_with('}') {
            blocks.pop();
        }
        if l.ends_with('{') {
            blocks.push((l, is_shared));
        } else if blocks.is_empty() && (l.starts_with('*') || l.starts_with('#')) {
            section = Some((l, is_shared));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_lines_keep_their_context_and_count_duplicates() {
        let base = "table ip t {\n\tmap m {\n\t\telements = {\n\t\t}\n\t}\n\tchain c {\n\t}\n}\n";
        let with = "table ip t {\n\tmap m {\n\t\telements = {\n\t\t1 : goto s,\n\t\t}\n\t}\n\tchain c {\n\t}\n\tchain s {\n\t\tdnat\n\t}\n}\n";
        let got = added_lines(base, with);
        let lines: Vec<(&str, Option<&str>)> = got
            .iter()
            .map(|o| (o.line.trim(), o.context.as_deref()))
            .collect();
        assert_eq!(
            lines,
            [
                ("1 : goto s,", Some("elements = {")),
                // An added block shows its own first line, so its lines need no context.
                ("chain s {", Some("table ip t {")),
                ("dnat", None),
            ]
        );
        let got = added_lines("*nat\n:A\nCOMMIT\n", "*nat\n:A\n-A A -j B\nCOMMIT\n");
        assert_eq!(got[0].context.as_deref(), Some("*nat"));
    }
}
