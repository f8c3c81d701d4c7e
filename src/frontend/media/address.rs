//! Which addresses an image URL may reach: public ones only (unless allowed), checked for IP-literal
//! hosts and, through a resolver wrapper, for every address a name resolves to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::MediaPolicy;

/// Whether `ip` is anything but a public unicast address: loopback, private, CGNAT, link-local,
/// multicast, unspecified, broadcast, documentation, benchmarking, reserved, IPv6 unique-local and
/// site-local; IPv4-mapped, NAT64 (64:ff9b::/96) and 6to4 addresses are judged by the IPv4 inside.
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_non_public_v4(v4),
        IpAddr::V6(v6) => is_non_public_v6(v6),
    }
}

fn is_non_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0                                       // "this network", unspecified
        || a == 10                               // private
        || a == 127                              // loopback
        || (a == 100 && (64..128).contains(&b))  // CGNAT 100.64/10
        || (a == 169 && b == 254)                // link-local (cloud metadata lives here)
        || (a == 172 && (16..32).contains(&b))   // private 172.16/12
        || (a == 192 && b == 168)                // private
        || (a == 192 && b == 0 && c == 0)        // IETF protocol assignments 192.0.0/24
        || (a == 192 && b == 0 && c == 2)        // TEST-NET-1
        || (a == 192 && b == 88 && c == 99)      // 6to4 relay anycast
        || (a == 198 && (b == 18 || b == 19))    // benchmarking 198.18/15
        || (a == 198 && b == 51 && c == 100)     // TEST-NET-2
        || (a == 203 && b == 0 && c == 113)      // TEST-NET-3
        || a >= 224 // multicast 224/4, reserved 240/4, broadcast
}

fn is_non_public_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if seg[..5] == [0; 5] && seg[5] == 0xffff {
        return is_non_public_v4(embedded_v4(seg[6], seg[7])); // IPv4-mapped
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_non_public_v4(embedded_v4(seg[6], seg[7])); // NAT64 well-known prefix
    }
    if seg[0] == 0x2002 {
        return is_non_public_v4(embedded_v4(seg[1], seg[2])); // 6to4
    }
    seg[..6] == [0; 6]                               // ::, ::1 and deprecated IPv4-compatible ::a.b.c.d
        || (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1) // local-use NAT64 64:ff9b:1::/48
        || (seg[0] == 0x100 && seg[1..4] == [0; 3])  // discard-only 100::/64
        || (seg[0] == 0x2001 && seg[1] < 0x200)      // IETF assignments 2001::/23 (Teredo, benchmarking)
        || (seg[0] == 0x2001 && seg[1] == 0xdb8)     // documentation 2001:db8::/32
        || (seg[0] & 0xfff0) == 0x3ff0               // documentation 3fff::/20
        || (seg[0] & 0xfe00) == 0xfc00               // unique-local fc00::/7
        || (seg[0] & 0xffc0) == 0xfe80               // link-local fe80::/10
        || (seg[0] & 0xffc0) == 0xfec0               // site-local fec0::/10 (deprecated)
        || (seg[0] & 0xff00) == 0xff00 // multicast
}

/// The address rule of a policy, shared by the literal-host check and the resolver.
#[derive(Debug, Clone)]
pub(super) struct AddressGuard {
    pub(super) allow_private_hosts: bool,
    pub(super) private_allowlist: Vec<IpAddr>,
}

impl AddressGuard {
    pub(super) fn from_policy(policy: &MediaPolicy) -> Self {
        Self {
            allow_private_hosts: policy.allow_private_hosts,
            private_allowlist: policy.private_allowlist.clone(),
        }
    }

    pub(super) fn allows(&self, ip: IpAddr) -> bool {
        self.allow_private_hosts
            || !is_non_public(ip)
            || self.private_allowlist.contains(&ip)
            || self.private_allowlist.contains(&ip.to_canonical())
    }
}

/// Resolves names for reqwest and refuses a name if ANY of its addresses is disallowed, so a
/// DNS answer cannot steer the connection to an internal address.
pub(super) struct GuardedResolver {
    pub(super) guard: AddressGuard,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| LookupFailed(e.to_string()))?
                .collect();
            if addrs.is_empty() {
                return Err(LookupFailed("no addresses".into()).into());
            }
            if let Some(bad) = addrs.iter().find(|a| !guard.allows(a.ip())) {
                return Err(BlockedAddress(bad.ip()).into());
            }
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// Resolver errors, carried through reqwest's error chain and recovered by `request_error`.
#[derive(Debug, thiserror::Error)]
#[error("address {0} is not allowed")]
pub(super) struct BlockedAddress(pub(super) IpAddr);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct LookupFailed(pub(super) String);
