//! The address family of the flow tests that craft their own segments, as a type: the raw
//! sender (`RawSender<A>`) is generic over its address, so one test body, generic over
//! [`FlowIp`], runs over IPv4 and IPv6. Spoofed sources lie outside the client's and the
//! broker's subnets (the node has no route back to them, so the broker's answers die on
//! the node) and each one has a SYN budget of its own: one address each over IPv4, one /64
//! each over IPv6 (the program budgets an IPv6 source's whole /64).

use std::{
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use kpsc_testkit::syn_flood::Spoofed;

use crate::portmap::Family;

/// An address type of one family, with that family's places in the test topology.
pub trait FlowIp: Spoofed + Eq + Hash + std::fmt::Debug + Send + Sync + Into<IpAddr> {
    const FAMILY: Family;

    /// Spoofed source `i` (0 <= i < 0xe000).
    fn spoofed(i: u32) -> Self;

    /// Which spoofed source this is, if it is one.
    fn spoofed_index(self) -> Option<u32>;

    /// The address of this family `ip` is, if it is of this family.
    fn from_addr(ip: IpAddr) -> Option<Self>;

    /// The node's address on the client side.
    fn node() -> Self {
        Self::parse(Self::FAMILY.node())
    }

    /// Client `i`'s address.
    fn client(i: usize) -> Self {
        Self::parse(&Self::FAMILY.client(i))
    }

    /// The address a key or tuple from the kernel maps holds, if it is of this family.
    fn of(ip: &kpsc_common::Ip) -> Option<Self> {
        Self::from_addr(kpsc_common::ip_addr(ip))
    }

    /// The address as the program keys it.
    fn bits(self) -> kpsc_common::Ip {
        kpsc_common::ip_bits(self.into())
    }

    /// Whether `ip` (from the kernel maps) is one of the spoofed sources below `count`.
    fn is_spoofed_below(ip: &kpsc_common::Ip, count: u32) -> bool {
        Self::of(ip)
            .and_then(Self::spoofed_index)
            .is_some_and(|i| i < count)
    }

    /// The topology's own addresses: a test bug if one does not parse.
    fn parse(text: &str) -> Self {
        let ip: IpAddr = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        Self::from_addr(ip).unwrap_or_else(|| panic!("{text} is not {:?}", Self::FAMILY))
    }
}

/// Spoofed IPv4 sources: 198.19.0.0/16, one address each.
const V4_SPOOFED: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);

impl FlowIp for Ipv4Addr {
    const FAMILY: Family = Family::V4;

    fn spoofed(i: u32) -> Self {
        assert!(i < 0xe000, "spoofed source {i}");
        Ipv4Addr::from(u32::from(V4_SPOOFED) + i)
    }

    fn spoofed_index(self) -> Option<u32> {
        let i = u32::from(self).wrapping_sub(u32::from(V4_SPOOFED));
        (i < 0x1_0000).then_some(i)
    }

    fn from_addr(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }
    }
}

/// Spoofed IPv6 sources: host ::1 of the /64s 2001:2:0:1000::/64 on, one /64 each (the
/// client's and broker's are 2001:2:0:1::/64 and 2001:2:0:2::/64).
const V6_FIRST_SPOOFED_64: u16 = 0x1000;

impl FlowIp for Ipv6Addr {
    const FAMILY: Family = Family::V6;

    fn spoofed(i: u32) -> Self {
        assert!(i < 0xe000, "spoofed source {i}");
        Ipv6Addr::new(0x2001, 2, 0, V6_FIRST_SPOOFED_64 + i as u16, 0, 0, 0, 1)
    }

    fn spoofed_index(self) -> Option<u32> {
        match self.segments() {
            [0x2001, 2, 0, net, 0, 0, 0, 1] if net >= V6_FIRST_SPOOFED_64 => {
                Some(u32::from(net - V6_FIRST_SPOOFED_64))
            }
            _ => None,
        }
    }

    fn from_addr(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sources round-trip through the kernel's key form, stay in the sender's test range
    /// and are not the topology's own addresses.
    fn spoofed_sources_round_trip<A: FlowIp>() {
        for i in [0, 1, 199, 1_999, 0xdfff] {
            let ip = A::spoofed(i);
            assert!(ip.in_test_range(), "{ip}");
            assert_eq!(A::of(&ip.bits()), Some(ip));
            assert_eq!(ip.spoofed_index(), Some(i));
            assert!(A::is_spoofed_below(&ip.bits(), i + 1));
            assert!(!A::is_spoofed_below(&ip.bits(), i));
        }
        assert_eq!(A::client(0).spoofed_index(), None);
        assert_eq!(A::node().spoofed_index(), None);
    }

    #[test]
    fn v4_spoofed_sources_round_trip() {
        spoofed_sources_round_trip::<Ipv4Addr>();
    }

    #[test]
    fn v6_spoofed_sources_round_trip() {
        spoofed_sources_round_trip::<Ipv6Addr>();
        // The other family's address is not one of ours.
        assert!(!Ipv6Addr::is_spoofed_below(
            &Ipv4Addr::spoofed(0).bits(),
            10
        ));
    }
}
