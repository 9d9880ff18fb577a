//! Loopback addresses of a test's own, so ports picked by a test cannot be taken by another process
//! between picking and binding.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// UDP port bound on each handed-out address to claim it for this process: a second process
/// (another test binary) finds the claim taken and moves on to the next address.
const ADDRESS_CLAIM_PORT: u16 = 64999;

/// A loopback address (127.1xx.y.z) no other user of this function, in this or another process, holds.
///
/// Sim agents bind their sandboxes' host ports on their own IP, so agents sharing an IP would clash.
pub fn unique_loopback_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static CLAIMS: Mutex<Vec<UdpSocket>> = Mutex::new(Vec::new());
    let second = 100 + (std::process::id() % 100) as u8;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % (250 * 250);
        let ip = Ipv4Addr::new(127, second, (n / 250) as u8, (n % 250 + 1) as u8);
        if let Ok(claim) = UdpSocket::bind((ip, ADDRESS_CLAIM_PORT)) {
            CLAIMS.lock().unwrap_or_else(|e| e.into_inner()).push(claim);
            return ip;
        }
    }
}

/// `port` on an address of this process's own: free to bind now and later (a restarted server
/// binds it again), and refused when nothing listens there.
pub fn exclusive_addr(port: u16) -> SocketAddr {
    SocketAddr::from((unique_loopback_ip(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_address_is_handed_out_once_and_is_bindable() {
        let (a, b) = (exclusive_addr(8080), exclusive_addr(8080));
        assert_ne!(a.ip(), b.ip());
        let _listener = std::net::TcpListener::bind(a).expect("the port on our own address is free");
    }
}
