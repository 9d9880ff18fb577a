//! The IPv4 pool private sandbox addresses are handed out from.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// Why a pool CIDR was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("ip pool {0:?} is not an IPv4 CIDR like 10.88.0.0/16")]
    Malformed(String),
    #[error("ip pool {0:?} must have a prefix length of 8-30")]
    Prefix(String),
}

/// A CIDR block with the addresses currently handed out.
///
/// The network address, the broadcast address and every address ending in `.0` or `.1` are
/// never handed out (`.1` is where a bridge gateway conventionally sits).
#[derive(Debug, Clone)]
pub struct IpPool {
    network: u32,
    size: u32,
    taken: BTreeSet<u32>,
}

impl IpPool {
    /// Parses `a.b.c.d/len`; host bits in the address are ignored.
    pub fn parse(cidr: &str) -> Result<IpPool, PoolError> {
        let malformed = || PoolError::Malformed(cidr.to_string());
        let (addr, len) = cidr.split_once('/').ok_or_else(malformed)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| malformed())?;
        let len: u32 = len.parse().map_err(|_| malformed())?;
        if !(8..=30).contains(&len) {
            return Err(PoolError::Prefix(cidr.to_string()));
        }
        let mask = u32::MAX << (32 - len);
        Ok(IpPool { network: u32::from(addr) & mask, size: 1 << (32 - len), taken: BTreeSet::new() })
    }

    /// Hands out the lowest free assignable address, or `None` when the pool is exhausted.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let offset = (0..self.size).find(|&o| self.is_assignable(o) && !self.taken.contains(&o))?;
        self.taken.insert(offset);
        Some(Ipv4Addr::from(self.network + offset))
    }

    /// Returns an address to the pool; addresses outside it are ignored.
    pub fn release(&mut self, ip: Ipv4Addr) {
        if let Some(offset) = u32::from(ip).checked_sub(self.network) {
            self.taken.remove(&offset);
        }
    }

    /// Forgets every handed-out address.
    pub fn clear(&mut self) {
        self.taken.clear();
    }

    /// Takes `ip` for a sandbox found again after a restart; false when it is outside the pool or taken.
    pub fn claim(&mut self, ip: Ipv4Addr) -> bool {
        match u32::from(ip).checked_sub(self.network) {
            Some(offset) if offset < self.size && self.is_assignable(offset) => self.taken.insert(offset),
            _ => false,
        }
    }

    /// The pool's first host address, which sandboxes route through (never handed out).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    /// The prefix length of the pool's network.
    pub fn prefix_len(&self) -> u32 {
        32 - self.size.trailing_zeros()
    }

    /// The pool's network as `a.b.c.d/len`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.network), self.prefix_len())
    }

    fn is_assignable(&self, offset: u32) -> bool {
        let last_octet = (self.network + offset) & 0xff;
        offset != self.size - 1 && last_octet > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_skips_network_and_gateway_addresses() {
        let mut pool = IpPool::parse("10.88.0.0/16").unwrap();
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(10, 88, 0, 2)));
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(10, 88, 0, 3)));
    }

    #[test]
    fn released_addresses_are_handed_out_again() {
        let mut pool = IpPool::parse("10.88.0.0/16").unwrap();
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        pool.release(a);
        assert_eq!(pool.allocate(), Some(a));
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(10, 88, 0, 4)));
        assert_ne!(a, b);
    }

    #[test]
    fn small_pool_runs_out() {
        // 192.168.5.0/29: .0 network, .1 gateway, .7 broadcast leave .2-.6.
        let mut pool = IpPool::parse("192.168.5.3/29").unwrap();
        let got: Vec<_> = std::iter::from_fn(|| pool.allocate()).collect();
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], Ipv4Addr::new(192, 168, 5, 2));
        assert_eq!(got[4], Ipv4Addr::new(192, 168, 5, 6));
    }

    #[test]
    fn addresses_ending_in_zero_or_one_inside_the_pool_are_skipped() {
        let mut pool = IpPool::parse("10.0.0.0/23").unwrap();
        let got: Vec<_> = std::iter::from_fn(|| pool.allocate()).collect();
        assert!(!got.contains(&Ipv4Addr::new(10, 0, 1, 0)));
        assert!(!got.contains(&Ipv4Addr::new(10, 0, 1, 1)));
        assert!(got.contains(&Ipv4Addr::new(10, 0, 0, 255)));
        assert!(!got.contains(&Ipv4Addr::new(10, 0, 1, 255)));
    }

    #[test]
    fn gateway_prefix_and_claims() {
        let mut pool = IpPool::parse("10.88.0.0/16").unwrap();
        assert_eq!(
            (pool.gateway(), pool.prefix_len(), pool.cidr()),
            (Ipv4Addr::new(10, 88, 0, 1), 16, "10.88.0.0/16".into())
        );
        assert!(pool.claim(Ipv4Addr::new(10, 88, 0, 2)));
        assert!(!pool.claim(Ipv4Addr::new(10, 88, 0, 2)), "taken already");
        assert!(!pool.claim(Ipv4Addr::new(10, 89, 0, 2)), "outside the pool");
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(10, 88, 0, 3)));
    }

    #[test]
    fn bad_cidrs_are_rejected() {
        for bad in ["10.88.0.0", "10.88.0/16", "10.88.0.0/x", "::1/64"] {
            assert!(matches!(IpPool::parse(bad), Err(PoolError::Malformed(_))), "{bad}");
        }
        assert!(matches!(IpPool::parse("10.0.0.0/31"), Err(PoolError::Prefix(_))));
        assert!(matches!(IpPool::parse("10.0.0.0/4"), Err(PoolError::Prefix(_))));
    }
}
