//! A one-armed portmap node, as a cloud VM with one NIC: client and broker hosts share
//! one layer-2 segment with the node (a bridge in a switch namespace), on two subnets the
//! node's single interface holds addresses in. A translated packet then leaves through
//! the interface it came in on: XDP sends it with XDP_TX instead of a DEVMAP redirect.
//!
//! ```text
//!  client ns 198.18.1.2 c0 ---- n0 ┐
//!                                  ├ br0 (switch ns) ---- s0 ---- n0 node ns 198.18.1.1
//!  broker ns 198.18.2.2 b0 ---- n1 ┘                                         198.18.2.1
//! ```
//!
//! Built from a [`Topology`] (its client, node and broker namespaces, addresses and
//! settings stay), so the topology's helpers keep working; the node's interface is `n0`.

use std::sync::atomic::{AtomicU32, Ordering};

use kpsc_testkit::netns::{self, NODE_BROKER_IP, NODE_CLIENT_IP, Topology, ip};

use crate::xdp_pass::{XdpPass, attach_xdp_pass};

/// The switch namespace; removed on drop (the veths in it with it).
pub struct Switch {
    pub ns: String,
    /// On `s0`; detached before the namespace goes.
    pass: Option<XdpPass>,
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.pass.take();
        netns::remove_namespace(&self.ns);
    }
}

/// Rewires `topo` into the picture above: the node's two veths move into a new switch
/// namespace as bridge ports, and the node gets one veth to that bridge, `n0`, holding
/// both of the node's IPv4 addresses. `s0`, the bridge's end of it, runs an XDP program
/// that passes everything: a veth delivers the frames its peer's XDP program sends back
/// (XDP_TX) only then (see `xdp_pass`).
pub fn make_one_armed(topo: &Topology) -> anyhow::Result<Switch> {
    static N: AtomicU32 = AtomicU32::new(0);
    let mut switch = Switch {
        ns: format!(
            "{}s{}",
            topo.node.trim_end_matches('n'),
            N.fetch_add(1, Ordering::SeqCst)
        ),
        pass: None,
    };
    let s = switch.ns.as_str();
    ip(&["netns", "add", s])?;
    kpsc_testkit::cleanup::resource_created(s, netns::remove_namespace);
    ip(&["-n", s, "link", "add", "br0", "type", "bridge"])?;
    for dev in ["n0", "n1"] {
        ip(&["-n", &topo.node, "link", "set", dev, "netns", s])?;
        ip(&["-n", s, "link", "set", dev, "master", "br0"])?;
    }
    ip(&[
        "link", "add", "s0", "netns", s, "type", "veth", "peer", "name", "n0", "netns", &topo.node,
    ])?;
    ip(&["-n", s, "link", "set", "s0", "master", "br0"])?;
    for dev in ["br0", "n0", "n1", "s0"] {
        ip(&["-n", s, "link", "set", dev, "up"])?;
    }
    switch.pass = Some(netns::in_netns(s, || attach_xdp_pass("s0"))??);
    for addr in [NODE_CLIENT_IP, NODE_BROKER_IP] {
        netns::add_address(&topo.node, &format!("{addr}/24"), "n0")?;
    }
    ip(&["-n", &topo.node, "link", "set", "n0", "up"])?;
    Ok(switch)
}
