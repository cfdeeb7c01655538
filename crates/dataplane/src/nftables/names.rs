//! Chain and set names, spelled as kube-proxy's nftables mode spells them:
//! `<prefix>-<HASH>-<ns>/<name>/<proto>/<port>[__<ip>/<port>]`, where HASH is the
//! first 8 characters of base32(sha256(the rest)). The hash keeps names unique even if
//! truncated, and tells apart names that differ only in one digit.

use std::fmt::Write as _;
use std::net::IpAddr;

use svcplane_model::ServicePortName;
use svcplane_proxy::DataplaneError;

/// nftables accepts names up to 255 bytes (256 with the kernel's terminating NUL).
pub const NAME_LENGTH_MAX: usize = 255;

/// Longest prefix we use (`extpolicy-`) is 10 bytes; kube-proxy reserves 16.
const PREFIX_LENGTH_MAX: usize = 16;

/// Longest `HASH-rest` part, so that any prefix still fits in [`NAME_LENGTH_MAX`].
const BASE_LENGTH_MAX: usize = NAME_LENGTH_MAX - PREFIX_LENGTH_MAX;

pub const SERVICE_PREFIX: &str = "service-";
pub const CLUSTER_PREFIX: &str = "cluster-";
pub const EXTERNAL_POLICY_PREFIX: &str = "extpolicy-";
pub const EXTERNAL_PREFIX: &str = "external-";
pub const NODEPORT_PREFIX: &str = "nodeport-";
pub const FIREWALL_PREFIX: &str = "firewall-";
pub const ENDPOINT_PREFIX: &str = "endpoint-";
pub const AFFINITY_PREFIX: &str = "affinity-";

/// True when `name` can be written bare into an nft script as a chain/set name:
/// it starts with a letter, `_` or `.`, contains only `[A-Za-z0-9_./-]` and fits in
/// [`NAME_LENGTH_MAX`]. Nothing else (quotes, `;`, whitespace, braces, `#`, `$`, `@`)
/// can then change the meaning of the script around it.
pub fn nft_identifier_safe(name: &str) -> bool {
    let bytes = name.as_bytes();
    match bytes.first() {
        Some(b) if b.is_ascii_alphabetic() || *b == b'_' || *b == b'.' => {}
        _ => return false,
    }
    bytes.len() <= NAME_LENGTH_MAX && bytes.iter().all(|&b| name_byte_ok(b))
}

fn name_byte_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-')
}

/// Component of a name: validated model data is a DNS label / IANA name, so this
/// only fails on data that bypassed validation. Empty is fine (unnamed port).
fn component_safe(s: &str) -> bool {
    s.bytes().all(name_byte_ok)
}

fn unsafe_name(spn: &ServicePortName, what: &str) -> DataplaneError {
    DataplaneError::Other(format!(
        "service port {spn:?}: {what} cannot be used in an nftables name; refusing to render"
    ))
}

/// `HASH-name`, truncated (kube-proxy's `hashAndTruncate`). `name` is ASCII here.
fn hash_and_truncate(name: &str) -> String {
    let mut out = String::with_capacity(9 + name.len());
    out.push_str(&crate::hash::base32_sha256(name.as_bytes(), 8));
    out.push('-');
    out.push_str(name);
    if out.len() > BASE_LENGTH_MAX {
        out.truncate(BASE_LENGTH_MAX - 3);
        out.push_str("...");
    }
    out
}

/// The per-service-port base name, `HASH-ns/name/proto/port`.
pub fn service_base(spn: &ServicePortName) -> Result<String, DataplaneError> {
    let ns = &spn.service.namespace;
    let name = &spn.service.name;
    if !component_safe(ns) {
        return Err(unsafe_name(spn, "namespace"));
    }
    if !component_safe(name) {
        return Err(unsafe_name(spn, "name"));
    }
    if !component_safe(&spn.port) {
        return Err(unsafe_name(spn, "port name"));
    }
    let raw = format!("{ns}/{name}/{}/{}", spn.protocol.as_lower(), spn.port);
    Ok(hash_and_truncate(&raw))
}

/// The per-endpoint base name, `HASH-ns/name/proto/port__ip/port` (IPv6 colons become
/// dots, which a name may contain). Call only after [`service_base`] accepted `spn`.
pub fn endpoint_base(spn: &ServicePortName, ip: IpAddr, port: u16) -> String {
    let mut raw = String::with_capacity(96);
    // Writing to a String cannot fail.
    let _ = write!(
        raw,
        "{}/{}/{}/{}__",
        spn.service.namespace,
        spn.service.name,
        spn.protocol.as_lower(),
        spn.port
    );
    match ip {
        IpAddr::V4(v4) => {
            let _ = write!(raw, "{v4}");
        }
        IpAddr::V6(v6) => {
            let start = raw.len();
            let _ = write!(raw, "{v6}");
            // Only ASCII was written, so replacing bytes keeps the String valid UTF-8.
            let tail: String = raw[start..].replace(':', ".");
            raw.truncate(start);
            raw.push_str(&tail);
        }
    }
    let _ = write!(raw, "/{port}");
    hash_and_truncate(&raw)
}

/// `prefix` + `base`, checked: every name that reaches a script passes through here.
pub fn join(prefix: &str, base: &str) -> Result<String, DataplaneError> {
    let mut name = String::with_capacity(prefix.len() + base.len());
    name.push_str(prefix);
    name.push_str(base);
    if nft_identifier_safe(&name) {
        Ok(name)
    } else {
        Err(DataplaneError::Other(format!(
            "{name:?} is not a safe nftables identifier; refusing to render"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use data_encoding::BASE32;
    use sha2::{Digest, Sha256};
    use svcplane_model::{NamespacedName, Protocol};

    fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            service: NamespacedName::new(ns, name),
            port: port.into(),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn hash_is_first_8_chars_of_base32_sha256() {
        // sha256("ns1/svc1/tcp/p80"), base32 (RFC 4648, upper case), computed independently.
        let base = service_base(&spn("ns1", "svc1", "p80")).unwrap();
        let digest = Sha256::digest(b"ns1/svc1/tcp/p80");
        let expected = &BASE32.encode(&digest)[..8];
        assert_eq!(base, format!("{expected}-ns1/svc1/tcp/p80"));
        // kube-proxy's own test expectation for this service port.
        assert_eq!(base, "ULMVA6XW-ns1/svc1/tcp/p80");
    }

    #[test]
    fn endpoint_names_replace_ipv6_colons() {
        let s = spn("ns1", "svc1", "p80");
        let v4 = endpoint_base(&s, "10.180.0.1".parse().unwrap(), 80);
        assert!(v4.ends_with("-ns1/svc1/tcp/p80__10.180.0.1/80"), "{v4}");
        let v6 = endpoint_base(&s, "fd00::1".parse().unwrap(), 80);
        assert!(v6.ends_with("-ns1/svc1/tcp/p80__fd00..1/80"), "{v6}");
        assert!(nft_identifier_safe(&join(ENDPOINT_PREFIX, &v6).unwrap()));
    }

    #[test]
    fn identifier_check_rejects_hostile_text() {
        assert!(nft_identifier_safe("service-ABCDEFGH-ns/a/tcp/http"));
        assert!(nft_identifier_safe("_x.y"));
        for bad in [
            "", "1abc", "-abc", "a\"b", "a;b", "a\nb", "a{b", "a}b", "a b", "a#b", "a@b", "a$b",
            "ä",
        ] {
            assert!(!nft_identifier_safe(bad), "{bad:?} must be rejected");
        }
        assert!(!nft_identifier_safe(&"a".repeat(NAME_LENGTH_MAX + 1)));
        assert!(nft_identifier_safe(&"a".repeat(NAME_LENGTH_MAX)));
    }

    #[test]
    fn hostile_service_names_are_errors() {
        for (ns, name, port) in [
            ("ns\"; flush ruleset; #", "svc", "p"),
            ("ns", "svc\n}", "p"),
            ("ns", "svc", "p{ x }"),
            ("ns", "sv c", "p"),
        ] {
            assert!(
                service_base(&spn(ns, name, port)).is_err(),
                "{ns:?}/{name:?}/{port:?}"
            );
        }
    }

    #[test]
    fn long_names_are_truncated_but_stay_unique() {
        let long = "a".repeat(63);
        let s1 = spn(&long, &long, &long);
        let mut s2 = s1.clone();
        s2.service.name = format!("{}b", &long[..62]).into();
        let e1 = endpoint_base(
            &s1,
            "fd00:1234:5678:9abc:def0:1234:5678:9abc".parse().unwrap(),
            65535,
        );
        let e2 = endpoint_base(
            &s2,
            "fd00:1234:5678:9abc:def0:1234:5678:9abc".parse().unwrap(),
            65535,
        );
        assert!(e1.len() <= BASE_LENGTH_MAX);
        assert!(e1.ends_with("..."));
        assert_ne!(e1, e2);
        let full = join(EXTERNAL_POLICY_PREFIX, &e1).unwrap();
        assert!(full.len() <= NAME_LENGTH_MAX);
    }
}
