//! The one hash behind every generated name (nftables and iptables), as kube-proxy's:
//! base32 (RFC 4648, upper case) of sha256. Stable across versions and processes, so
//! a restarted proxy finds its own objects under the same names.

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

/// The first `len` characters of base32(sha256(`input`)) (at most 56).
pub(crate) fn base32_sha256(input: &[u8], len: usize) -> String {
    let mut encoded = BASE32.encode(&Sha256::digest(input));
    encoded.truncate(len);
    encoded
}
