//! Which addresses the orchestrator may call as node agents: a fixed refused list, narrowed by `agent_allowed_networks`.
//!
//! Unspecified, broadcast, multicast, link-local and known cloud metadata addresses are always refused,
//! also when an IPv6 address embeds them (`::ffff:169.254.169.254`). Literal addresses are checked
//! as URL parsers read them (`http://0xa9fea9fe/` is 169.254.169.254); host names are checked each
//! time they are resolved, so a name cannot be registered harmless and re-pointed later.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Why an address or a network was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("{input:?} is not a network like 10.0.0.0/8 or fd00::/8: {why}")]
    BadNetwork { input: String, why: String },
    #[error("{ip} {}; agent addresses must not be", describe_refused(.kind, .embedded))]
    AlwaysRefused { ip: IpAddr, kind: Refused, embedded: Option<Ipv4Addr> },
    #[error("{ip} is outside agent_allowed_networks ({})", list(.allowed))]
    OutsideAllowed { ip: IpAddr, allowed: Vec<Cidr> },
    #[error("{url:?} is not a URL: {why}")]
    BadUrl { url: String, why: String },
    /// A name URL parsers refuse, such as `a.1` (a last label of digits makes it an IPv4 address).
    #[error("{host:?} cannot be an agent host: {why}")]
    BadHost { host: String, why: String },
    #[error("resolving {host}: {why}")]
    Lookup { host: String, why: String },
    #[error(
        "{host} was not looked up: agent_allowed_networks ({}) allow loopback only, and localhost is the one loopback name",
        list(.allowed)
    )]
    NotLookedUp { host: String, allowed: Vec<Cidr> },
    #[error("{host} resolves to no allowed address: {}", list(.refusals))]
    NoAllowedAddress { host: String, refusals: Vec<AddressError> },
}

pub type Result<T, E = AddressError> = std::result::Result<T, E>;

/// The kinds of address no agent may have, whatever `agent_allowed_networks` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// 0.0.0.0 and `::`: connecting there reaches the caller's own host.
    Unspecified,
    /// 0.0.0.0/8 beyond 0.0.0.0: "this network", no host of its own.
    ThisNetwork,
    Broadcast,
    Multicast,
    /// 169.254.0.0/16 and fe80::/10: never routed, and where cloud metadata services answer.
    LinkLocal,
    /// Metadata services outside link-local: 100.100.100.200 (Alibaba Cloud) and fd00:ec2::254 (AWS, IPv6).
    CloudMetadata,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refused::Unspecified => "unspecified",
            Refused::ThisNetwork => "in 0.0.0.0/8, which names no host",
            Refused::Broadcast => "the broadcast address",
            Refused::Multicast => "multicast",
            Refused::LinkLocal => "link-local (cloud metadata lives there)",
            Refused::CloudMetadata => "a cloud metadata address",
        })
    }
}

fn describe_refused(kind: &Refused, embedded: &Option<Ipv4Addr>) -> String {
    match embedded {
        Some(v4) => format!("embeds {v4}, which is {kind}"),
        None => format!("is {kind}"),
    }
}

fn list<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items.into_iter().map(|item| item.to_string()).collect::<Vec<_>>().join(", ")
}

// === impl Cidr ===

/// An IPv4 or IPv6 network: `10.20.0.0/16`, `::1/128`; a bare address is a network of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the network (an IPv4 network holds no IPv6 address, and the reverse).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => u32::from(ip) & v4_mask(self.prefix) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => u128::from(ip) & v6_mask(self.prefix) == u128::from(net),
            _ => false,
        }
    }
}

fn v4_mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn v6_mask(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Cidr> {
        let bad = |why: String| AddressError::BadNetwork { input: input.to_string(), why };
        let (address, prefix) = match input.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (input, None),
        };
        let network: IpAddr = address.parse().map_err(|_| bad(format!("{address:?} is not an IP address")))?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            // Digits only: `u8::from_str` would also take "+8".
            Some(p) => Some(p)
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u8>().ok())
                .filter(|p| *p <= bits)
                .ok_or_else(|| bad(format!("prefix {p:?} is not an integer in 0-{bits}")))?,
        };
        let cidr = Cidr { network, prefix };
        let masked = match network {
            IpAddr::V4(ip) => IpAddr::V4(Ipv4Addr::from(u32::from(ip) & v4_mask(prefix))),
            IpAddr::V6(ip) => IpAddr::V6(Ipv6Addr::from(u128::from(ip) & v6_mask(prefix))),
        };
        if masked != network {
            // 10.20.0.1/16 is most likely a typo; saying so beats silently widening or narrowing it.
            return Err(bad(format!("host bits are set; the network is {masked}/{prefix}")));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

// === impl AddressPolicy ===

/// The agent address policy: the always-refused kinds, then `allowed` when it is not empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Empty: every address that is not always refused.
    allowed: Vec<Cidr>,
}

impl AddressPolicy {
    /// Only addresses inside one of `allowed` (every address, when it is empty), never the always-refused ones.
    pub fn allowing(allowed: Vec<Cidr>) -> AddressPolicy {
        AddressPolicy { allowed }
    }

    /// 127.0.0.0/8 and ::1 only: what `SANDBOXD_LOOPBACK_ONLY=1` asks for (tests and demos on a closed network).
    pub fn loopback_only() -> AddressPolicy {
        let loopback = ["127.0.0.0/8", "::1/128"].map(|n| n.parse().expect("static loopback networks"));
        AddressPolicy { allowed: loopback.to_vec() }
    }

    /// Parses `agent_allowed_networks`: comma-separated (`10.0.0.0/8, ::1/128`) or a JSON list of strings.
    pub fn parse_networks(raw: &str) -> Result<Vec<Cidr>> {
        let raw = raw.trim();
        let items: Vec<String> = if raw.starts_with('[') {
            serde_json::from_str(raw).map_err(|e| AddressError::BadNetwork {
                input: raw.to_string(),
                why: format!("not a list of networks: {e}"),
            })?
        } else {
            raw.split(',').map(str::to_string).collect()
        };
        items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).map(str::parse).collect()
    }

    /// The allowed networks; empty means every address that is not always refused.
    pub fn allowed_networks(&self) -> &[Cidr] {
        &self.allowed
    }

    /// Whether every allowed network lies inside 127.0.0.0/8 or is ::1.
    fn loopback_only_networks(&self) -> bool {
        !self.allowed.is_empty()
            && self.allowed.iter().all(|n| match n.network {
                IpAddr::V4(ip) => ip.is_loopback() && n.prefix >= 8,
                IpAddr::V6(ip) => ip.is_loopback() && n.prefix == 128,
            })
    }

    /// Whether an agent may be called at `ip`, with the reason when not.
    pub fn check(&self, ip: IpAddr) -> Result<()> {
        if let Some((kind, embedded)) = always_refused(ip) {
            return Err(AddressError::AlwaysRefused { ip, kind, embedded });
        }
        // The kernel connects to ::ffff:10.0.0.1 as 10.0.0.1, so an IPv4 network allows it.
        let canonical = ip.to_canonical();
        if self.allowed.is_empty() || self.allowed.iter().any(|n| n.contains(ip) || n.contains(canonical)) {
            Ok(())
        } else {
            Err(AddressError::OutsideAllowed { ip, allowed: self.allowed.clone() })
        }
    }

    /// Checks the host of `url` when it is an IP address, read as reqwest reads it; host names
    /// pass here and are checked when they are resolved.
    pub fn check_url(&self, url: &str) -> Result<()> {
        self.check_parsed(&parse_url(url)?)
    }

    /// `url` parsed as reqwest reads it, checked, for the caller to send as it is.
    pub fn parse_and_check_url(&self, url: &str) -> Result<reqwest::Url> {
        let parsed = parse_url(url)?;
        self.check_parsed(&parsed)?;
        Ok(parsed)
    }

    /// `check_url` for a URL the caller has already parsed (and will send as it is).
    fn check_parsed(&self, url: &reqwest::Url) -> Result<()> {
        let host =
            url.host_str().ok_or_else(|| AddressError::BadUrl { url: url.to_string(), why: "no host".into() })?;
        // The URL parser already turned every IPv4 spelling into a dotted quad and bracketed IPv6.
        match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Ok(ip) => self.check(ip),
            Err(_) => Ok(()),
        }
    }

    /// Checks a node's `ip` field (an address or a host name) as its agent URL will read it.
    pub fn check_host(&self, host: &str) -> Result<()> {
        let url = if host.contains(':') { format!("http://[{host}]/") } else { format!("http://{host}/") };
        self.check_url(&url).map_err(|e| match e {
            AddressError::BadUrl { why, .. } => AddressError::BadHost { host: host.to_string(), why },
            other => other,
        })
    }

    /// Resolves `host` and keeps the addresses the policy allows; none left is an error naming each refusal.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>> {
        // Loopback only is the closed-network test and demo setting: no DNS query leaves the host.
        if self.loopback_only_networks() && !host.eq_ignore_ascii_case("localhost") && host.parse::<IpAddr>().is_err() {
            return Err(AddressError::NotLookedUp { host: host.to_string(), allowed: self.allowed.clone() });
        }
        let lookup_error = |why: String| AddressError::Lookup { host: host.to_string(), why };
        let found: Vec<SocketAddr> =
            tokio::net::lookup_host((host, port)).await.map_err(|e| lookup_error(e.to_string()))?.collect();
        if found.is_empty() {
            return Err(lookup_error("no addresses".into()));
        }
        let (mut allowed, mut refusals) = (Vec::new(), Vec::new());
        for addr in found {
            match self.check(addr.ip()) {
                Ok(()) => allowed.push(addr),
                Err(refusal) => refusals.push(refusal),
            }
        }
        if allowed.is_empty() {
            return Err(AddressError::NoAllowedAddress { host: host.to_string(), refusals });
        }
        Ok(allowed)
    }
}

/// The always-refused kind of `ip`, and the IPv4 address it embeds when that is what is refused.
fn always_refused(ip: IpAddr) -> Option<(Refused, Option<Ipv4Addr>)> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4).map(|kind| (kind, None)),
        IpAddr::V6(v6) => {
            if let Some(kind) = refused_v6(v6) {
                return Some((kind, None));
            }
            let v4 = embedded_v4(v6)?;
            refused_v4(v4).map(|kind| (kind, Some(v4)))
        }
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<Refused> {
    if ip.is_unspecified() {
        Some(Refused::Unspecified)
    } else if ip.octets()[0] == 0 {
        Some(Refused::ThisNetwork)
    } else if ip.is_broadcast() {
        Some(Refused::Broadcast)
    } else if ip.is_multicast() {
        Some(Refused::Multicast)
    } else if ip.is_link_local() {
        Some(Refused::LinkLocal)
    } else if ip == Ipv4Addr::new(100, 100, 100, 200) {
        Some(Refused::CloudMetadata)
    } else {
        None
    }
}

fn refused_v6(ip: Ipv6Addr) -> Option<Refused> {
    if ip.is_unspecified() {
        Some(Refused::Unspecified)
    } else if ip.is_multicast() {
        Some(Refused::Multicast)
    } else if ip.is_unicast_link_local() {
        Some(Refused::LinkLocal)
    } else if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        Some(Refused::CloudMetadata)
    } else {
        None
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`) or
/// NAT64 (`64:ff9b::a.b.c.d`, which a NAT64 gateway forwards to a.b.c.d) address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let [a, b, c, d, e, f, _, _] = ip.segments();
    let tail = Ipv4Addr::from(u128::from(ip) as u32);
    match (a, b, c, d, e, f) {
        (0, 0, 0, 0, 0, 0xffff) => Some(tail),
        // `::` and `::1` are themselves, not IPv4-compatible forms of 0.0.0.0 and 0.0.0.1.
        (0, 0, 0, 0, 0, 0) if !ip.is_unspecified() && !ip.is_loopback() => Some(tail),
        (0x64, 0xff9b, 0, 0, 0, 0) => Some(tail),
        _ => None,
    }
}

fn parse_url(url: &str) -> Result<reqwest::Url> {
    reqwest::Url::parse(url).map_err(|e| AddressError::BadUrl { url: url.to_string(), why: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn allowing(networks: &str) -> AddressPolicy {
        AddressPolicy::allowing(AddressPolicy::parse_networks(networks).unwrap())
    }

    #[test]
    fn the_ssrf_cases_of_issue_15_are_refused_with_their_reason() {
        let cases: &[(&str, &str)] = &[
            (
                "169.254.169.254",
                "169.254.169.254 is link-local (cloud metadata lives there); agent addresses must not be",
            ),
            (
                "::ffff:169.254.169.254",
                "::ffff:169.254.169.254 embeds 169.254.169.254, which is link-local (cloud metadata lives there)",
            ),
            ("::169.254.169.254", "embeds 169.254.169.254, which is link-local"),
            ("64:ff9b::169.254.169.254", "embeds 169.254.169.254, which is link-local"),
            ("169.254.170.2", "is link-local"),
            ("0.0.0.0", "0.0.0.0 is unspecified; agent addresses must not be"),
            ("0.1.2.3", "0.1.2.3 is in 0.0.0.0/8, which names no host"),
            ("::", ":: is unspecified"),
            ("::ffff:0.0.0.0", "embeds 0.0.0.0, which is unspecified"),
            ("255.255.255.255", "255.255.255.255 is the broadcast address"),
            ("::ffff:255.255.255.255", "embeds 255.255.255.255, which is the broadcast address"),
            ("224.0.0.1", "224.0.0.1 is multicast"),
            ("239.255.255.250", "is multicast"),
            ("ff02::1", "ff02::1 is multicast"),
            ("::ffff:224.0.0.251", "embeds 224.0.0.251, which is multicast"),
            ("fe80::1", "fe80::1 is link-local"),
            ("febf::1", "is link-local"),
            ("100.100.100.200", "100.100.100.200 is a cloud metadata address"),
            ("fd00:ec2::254", "fd00:ec2::254 is a cloud metadata address"),
        ];
        let policies = [AddressPolicy::default(), AddressPolicy::loopback_only(), allowing("0.0.0.0/0,::/0")];
        for policy in &policies {
            for (address, reason) in cases {
                let err = policy.check(ip(address)).expect_err(address);
                assert!(matches!(err, AddressError::AlwaysRefused { .. }), "{address}: {err}");
                assert!(err.to_string().contains(reason), "{address}: {err:?} should say {reason:?}");
            }
        }
    }

    #[test]
    fn loopback_private_and_public_addresses_are_allowed_by_default() {
        let policy = AddressPolicy::default();
        for address in [
            "127.0.0.1",
            "127.0.2.3",
            "::1",
            "::ffff:127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.0.3",
            "100.64.0.1",
            "203.0.113.10",
            "8.8.8.8",
            "fd00::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
            "64:ff9b::808:808",
            "169.253.255.255",
            "169.255.0.1",
            "fec0::1",
        ] {
            assert_eq!(policy.check(ip(address)), Ok(()), "{address}");
        }
    }

    #[test]
    fn allowed_networks_narrow_the_policy_and_say_so() {
        let policy = allowing("127.0.0.0/8");
        let err = policy.check(ip("10.0.0.1")).unwrap_err();
        assert_eq!(err.to_string(), "10.0.0.1 is outside agent_allowed_networks (127.0.0.0/8)");

        let policy = allowing("127.0.0.0/8,::1/128,10.20.0.0/16");
        for allowed in ["127.0.0.1", "127.255.0.9", "::1", "10.20.0.1", "10.20.255.255", "::ffff:10.20.3.4"] {
            assert_eq!(policy.check(ip(allowed)), Ok(()), "{allowed}");
        }
        for outside in ["10.21.0.1", "10.0.0.1", "192.168.0.3", "2001:db8::1", "fd00::1", "::a14:1"] {
            let err = policy.check(ip(outside)).unwrap_err();
            assert!(
                err.to_string().ends_with("is outside agent_allowed_networks (127.0.0.0/8, ::1/128, 10.20.0.0/16)"),
                "{outside}: {err}"
            );
        }
        // The always-refused kinds stay refused inside an allowed network.
        let wide = allowing("169.254.0.0/16,0.0.0.0/0");
        assert!(matches!(wide.check(ip("169.254.169.254")), Err(AddressError::AlwaysRefused { .. })));
    }

    #[test]
    fn loopback_only_allows_exactly_loopback() {
        let policy = AddressPolicy::loopback_only();
        assert_eq!(policy.check(ip("127.0.2.1")), Ok(()));
        assert_eq!(policy.check(ip("::1")), Ok(()));
        let err = policy.check(ip("192.168.0.3")).unwrap_err();
        assert_eq!(err.to_string(), "192.168.0.3 is outside agent_allowed_networks (127.0.0.0/8, ::1/128)");
    }

    #[test]
    fn cidrs_parse_display_and_contain() {
        let cases = [
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.0", false),
            ("0.0.0.0/0", "203.0.113.1", true),
            ("0.0.0.0/0", "::1", false),
            ("192.168.1.7", "192.168.1.7", true),
            ("192.168.1.7", "192.168.1.8", false),
            ("fd00::/8", "fdff::1", true),
            ("fd00::/8", "fe00::1", false),
            ("::/0", "2001:db8::1", true),
            ("::1/128", "::1", true),
            ("::1/128", "127.0.0.1", false),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
        ];
        for (network, address, inside) in cases {
            let cidr: Cidr = network.parse().unwrap();
            assert_eq!(cidr.contains(ip(address)), inside, "{network} contains {address}");
        }
        assert_eq!("192.168.1.7".parse::<Cidr>().unwrap().to_string(), "192.168.1.7/32");
        assert_eq!("FD00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
    }

    #[test]
    fn bad_networks_say_what_is_wrong() {
        let cases = [
            ("10.0.0.0/33", "prefix \"33\" is not an integer in 0-32"),
            ("::/129", "prefix \"129\" is not an integer in 0-128"),
            ("10.0.0.0/+8", "is not an integer"),
            ("10.0.0.0/", "is not an integer"),
            ("10.0.0/8", "\"10.0.0\" is not an IP address"),
            ("example.com/8", "is not an IP address"),
            ("10.20.0.1/16", "host bits are set; the network is 10.20.0.0/16"),
            ("fd00::1/8", "host bits are set; the network is fd00::/8"),
        ];
        for (input, why) in cases {
            let err = input.parse::<Cidr>().unwrap_err().to_string();
            assert!(err.starts_with(&format!("{input:?} is not a network like")), "{input}: {err}");
            assert!(err.contains(why), "{input}: {err} should say {why:?}");
        }
    }

    #[test]
    fn network_lists_are_comma_separated_or_json() {
        let want: Vec<Cidr> = ["127.0.0.0/8", "::1/128"].map(|n| n.parse().unwrap()).to_vec();
        assert_eq!(AddressPolicy::parse_networks("127.0.0.0/8, ::1/128").unwrap(), want);
        assert_eq!(AddressPolicy::parse_networks("[\"127.0.0.0/8\", \"::1/128\"]").unwrap(), want);
        assert_eq!(AddressPolicy::parse_networks("").unwrap(), vec![]);
        assert_eq!(AddressPolicy::parse_networks("[]").unwrap(), vec![]);
        assert!(AddressPolicy::parse_networks("10.0.0.0/8,nope").is_err());
        assert!(AddressPolicy::parse_networks("[1, 2]").is_err());
    }

    #[test]
    fn urls_are_checked_as_reqwest_reads_their_host() {
        let policy = AddressPolicy::default();
        for refused in [
            "http://169.254.169.254:8080",
            "http://[::ffff:169.254.169.254]:8080",
            "http://[::ffff:a9fe:a9fe]:8080",
            "http://[fe80::1]:80",
            // WHATWG hosts: hex, octal and short forms are IPv4 addresses, not names.
            "http://0xa9fea9fe:8080",
            "http://0xa9.0xfe.0xa9.0xfe:8080",
            "http://2852039166:8080",
            "http://0251.0376.0251.0376:8080",
            "http://169.254.43518:8080",
            "http://0:8080",
        ] {
            let err = policy.check_url(refused).expect_err(refused);
            assert!(matches!(err, AddressError::AlwaysRefused { .. }), "{refused}: {err}");
        }
        for allowed in
            ["http://127.0.0.1:8080", "http://[::1]:8080", "http://worker-1.example:8080", "http://localhost:1"]
        {
            assert_eq!(policy.check_url(allowed), Ok(()), "{allowed}");
        }
        assert!(matches!(policy.check_url("not a url"), Err(AddressError::BadUrl { .. })));
    }

    #[test]
    fn node_ips_are_checked_as_their_agent_url_reads_them() {
        let policy = AddressPolicy::default();
        for refused in ["169.254.169.254", "::ffff:169.254.169.254", "0xa9fea9fe", "0xa9.0xfe.0xa9.0xfe", "ff02::1"] {
            assert!(policy.check_host(refused).is_err(), "{refused}");
        }
        for allowed in ["127.0.2.1", "::1", "metadata.google.internal", "worker-1.example", "10.0.0.1"] {
            assert_eq!(policy.check_host(allowed), Ok(()), "{allowed}");
        }
        let err = policy.check_host("worker.1").unwrap_err().to_string();
        assert_eq!(err, "\"worker.1\" cannot be an agent host: invalid IPv4 address");
    }

    #[tokio::test]
    async fn localhost_resolves_to_loopback_only_where_loopback_is_allowed() {
        let found = AddressPolicy::loopback_only().resolve("localhost", 80).await.unwrap();
        assert!(!found.is_empty());
        assert!(found.iter().all(|a| a.ip().is_loopback() && a.port() == 80), "{found:?}");

        let err = allowing("10.0.0.0/8").resolve("localhost", 80).await.unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with("localhost resolves to no allowed address: "), "{message}");
        assert!(message.contains("is outside agent_allowed_networks (10.0.0.0/8)"), "{message}");
    }

    #[tokio::test]
    async fn loopback_only_looks_up_no_name_but_localhost() {
        for policy in [AddressPolicy::loopback_only(), allowing("127.0.2.0/24")] {
            let err = policy.resolve("worker-1.example", 80).await.unwrap_err();
            assert!(matches!(err, AddressError::NotLookedUp { .. }), "{err}");
            assert!(
                err.to_string().starts_with("worker-1.example was not looked up: agent_allowed_networks ("),
                "{err}"
            );
        }
        assert!(!allowing("127.0.0.0/8,10.0.0.0/8").loopback_only_networks());
        assert!(!allowing("0.0.0.0/1").loopback_only_networks());
        assert!(!AddressPolicy::default().loopback_only_networks());
        assert!(AddressPolicy::loopback_only().resolve("LOCALHOST", 80).await.is_ok());
    }

    #[tokio::test]
    async fn literal_hosts_resolve_to_themselves_and_are_checked() {
        let policy = AddressPolicy::default();
        let err = policy.resolve("169.254.169.254", 80).await.unwrap_err();
        assert!(err.to_string().contains("169.254.169.254 is link-local"), "{err}");
        assert_eq!(policy.resolve("127.0.0.1", 80).await.unwrap(), vec!["127.0.0.1:80".parse().unwrap()]);
    }
}
