//! How many users each address has, for set elements keyed by an address that must stay
//! while any user does (the hairpin set: one element per endpoint address, however many
//! service ports have that endpoint). Kept by a backend between syncs so a partial sync
//! learns that an address lost its last user without walking every service.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Reference counts of addresses. Compact keys per family (4 or 16 bytes): at 10k
/// services × 10 endpoints this holds 100k addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrRefs {
    v4: HashMap<Ipv4Addr, u32>,
    v6: HashMap<Ipv6Addr, u32>,
}

impl AddrRefs {
    /// Room for this many IPv4 and IPv6 addresses (one allocation each instead of a
    /// table growing through every size, whose old tables a thread's allocator keeps).
    pub fn with_capacity(v4: usize, v6: usize) -> AddrRefs {
        AddrRefs {
            v4: HashMap::with_capacity(v4),
            v6: HashMap::with_capacity(v6),
        }
    }

    /// Users of `ip`.
    pub fn count(&self, ip: &IpAddr) -> u32 {
        match ip {
            IpAddr::V4(a) => self.v4.get(a),
            IpAddr::V6(a) => self.v6.get(a),
        }
        .copied()
        .unwrap_or(0)
    }

    /// One more user of `ip`; whether it is the first.
    pub fn add(&mut self, ip: IpAddr) -> bool {
        let n = match ip {
            IpAddr::V4(a) => self.v4.entry(a).or_insert(0),
            IpAddr::V6(a) => self.v6.entry(a).or_insert(0),
        };
        *n += 1;
        *n == 1
    }

    /// One user of `ip` fewer; whether that was the last (an address without users stays
    /// without: `false`).
    pub fn remove(&mut self, ip: IpAddr) -> bool {
        fn dec<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, k: K) -> bool {
            let Some(n) = map.get_mut(&k) else {
                return false;
            };
            *n -= 1;
            if *n == 0 {
                map.remove(&k);
                return true;
            }
            false
        }
        match ip {
            IpAddr::V4(a) => dec(&mut self.v4, a),
            IpAddr::V6(a) => dec(&mut self.v6, a),
        }
    }
}

impl Extend<IpAddr> for AddrRefs {
    fn extend<I: IntoIterator<Item = IpAddr>>(&mut self, iter: I) {
        for ip in iter {
            self.add(ip);
        }
    }
}

impl FromIterator<IpAddr> for AddrRefs {
    fn from_iter<I: IntoIterator<Item = IpAddr>>(iter: I) -> Self {
        let mut refs = AddrRefs::default();
        refs.extend(iter);
        refs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_counted_until_its_last_user_goes() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "fd00::1".parse().unwrap();
        let mut refs: AddrRefs = [a, a, b].into_iter().collect();
        assert_eq!((refs.count(&a), refs.count(&b)), (2, 1));
        assert!(!refs.remove(a));
        assert!(refs.remove(a));
        assert_eq!(refs.count(&a), 0);
        assert!(!refs.remove(a), "no user left to remove");
        assert!(refs.add(a));
        assert!(!refs.add(b));
        assert!(!refs.remove(b));
        assert!(refs.remove(b));
        assert_eq!(refs, [a].into_iter().collect());
    }
}
