//! Name and value checks as the Kubernetes API server applies them
//! (k8s.io/apimachinery/pkg/util/validation). Pure `bool` functions so every
//! crate (the manifest source, the EndpointSlice controller, backends) can reuse them.

/// Maximum length of a DNS-1123 / DNS-1035 label.
pub const DNS1123_LABEL_MAX_LEN: usize = 63;
/// Maximum length of a DNS-1123 subdomain.
pub const DNS1123_SUBDOMAIN_MAX_LEN: usize = 253;
/// Maximum length of an IANA service name (a named port).
pub const IANA_SVC_NAME_MAX_LEN: usize = 15;

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?` without the length check.
fn is_label_body(s: &[u8]) -> bool {
    match (s.first(), s.last()) {
        (Some(&first), Some(&last)) => {
            is_lower_alnum(first)
                && is_lower_alnum(last)
                && s.iter().all(|&b| is_lower_alnum(b) || b == b'-')
        }
        _ => false,
    }
}

/// RFC 1123 label: at most 63 characters, lower-case alphanumerics and `-`,
/// starting and ending with an alphanumeric (namespaces, port names, hostnames).
pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= DNS1123_LABEL_MAX_LEN && is_label_body(s.as_bytes())
}

/// RFC 1123 subdomain: at most 253 characters, dot-separated RFC 1123 labels
/// (most object names, node names).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    // Each part is bounded only by the total length, as in the API server's regex.
    s.len() <= DNS1123_SUBDOMAIN_MAX_LEN && s.split('.').all(|part| is_label_body(part.as_bytes()))
}

/// RFC 1035 label: like an RFC 1123 label but starting with a letter (Service names).
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
}

/// IANA service name (a named port, `IANA_SVC_NAME`): at most 15 characters,
/// lower-case alphanumerics and `-`, at least one letter, no leading, trailing
/// or doubled `-`.
pub fn is_iana_svc_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= IANA_SVC_NAME_MAX_LEN
        && b.iter().all(|&c| is_lower_alnum(c) || c == b'-')
        && b.iter().any(u8::is_ascii_lowercase)
        && b.first() != Some(&b'-')
        && b.last() != Some(&b'-')
        && !s.contains("--")
}

/// A TCP/UDP/SCTP port number as the API accepts it: 1..=65535.
pub fn is_valid_port_num(n: i32) -> bool {
    (1..=65535).contains(&n)
}

fn is_qualified_name_part(s: &[u8]) -> bool {
    let alnum = |b: &u8| b.is_ascii_alphanumeric();
    match (s.first(), s.last()) {
        (Some(first), Some(last)) => {
            s.len() <= DNS1123_LABEL_MAX_LEN
                && alnum(first)
                && alnum(last)
                && s.iter()
                    .all(|b| alnum(b) || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// A label key: `[prefix/]name`, prefix a DNS-1123 subdomain, name at most 63
/// characters of alphanumerics, `-`, `_`, `.`, starting and ending with an alphanumeric.
pub fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => {
            !prefix.is_empty()
                && is_dns1123_subdomain(prefix)
                && is_qualified_name_part(name.as_bytes())
        }
        None => is_qualified_name_part(s.as_bytes()),
    }
}

/// A label value: empty, or like the name part of a label key.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_qualified_name_part(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns1123_label() {
        for ok in ["a", "web", "a-b", "0abc", "abc9", &"a".repeat(63)] {
            assert!(is_dns1123_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns1123_label(bad), "{bad}");
        }
    }

    #[test]
    fn dns1123_subdomain() {
        for ok in ["a", "a.b", "my-svc.example.com", "0.1"] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        let too_long = format!("{}.{}", "a".repeat(200), "b".repeat(60));
        for bad in ["", ".a", "a.", "a..b", "A.b", "a_b.c", too_long.as_str()] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
    }

    #[test]
    fn dns1035_label() {
        for ok in ["a", "web", "a-1"] {
            assert!(is_dns1035_label(ok), "{ok}");
        }
        for bad in ["", "1a", "-a", "a-", "a.b", "Web"] {
            assert!(!is_dns1035_label(bad), "{bad}");
        }
    }

    #[test]
    fn iana_svc_name() {
        for ok in ["http", "h2c", "a-b", "metrics9"] {
            assert!(is_iana_svc_name(ok), "{ok}");
        }
        for bad in [
            "",
            "8080",
            "-http",
            "http-",
            "a--b",
            "HTTP",
            "abcdefghijklmnop",
        ] {
            assert!(!is_iana_svc_name(bad), "{bad}");
        }
    }

    #[test]
    fn port_num() {
        assert!(is_valid_port_num(1));
        assert!(is_valid_port_num(65535));
        assert!(!is_valid_port_num(0));
        assert!(!is_valid_port_num(65536));
        assert!(!is_valid_port_num(-1));
    }

    #[test]
    fn labels() {
        for ok in [
            "app",
            "app.kubernetes.io/name",
            "A_b.c",
            "kubernetes.io/service-name",
        ] {
            assert!(is_qualified_name(ok), "{ok}");
        }
        for bad in ["", "/a", "a/", "-a", "Example.COM/a", "a/b/c", "a b"] {
            assert!(!is_qualified_name(bad), "{bad}");
        }
        for ok in ["", "v1", "my_app.x-y"] {
            assert!(is_label_value(ok), "{ok}");
        }
        for bad in ["-a", "a-", "a/b", "a b", &"a".repeat(64)] {
            assert!(!is_label_value(bad), "{bad}");
        }
    }
}
