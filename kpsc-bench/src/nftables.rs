//! The `nftables` target: what an operator writes instead of portmap, DNAT of the node's
//! port to the broker plus masquerade (so replies come back through the node), in the
//! node's namespace, with conntrack doing the flow tracking. The bench loads the rules
//! itself and deletes them when the target is dropped (the namespace goes afterwards too).
//!
//! Loading NAT rules turns connection tracking on for the whole namespace, which would
//! also track the routed and proxy targets' traffic sharing the node. A raw-priority chain
//! marks everything but this target's own flows untracked, so they are measured as without
//! nftables (a few rule evaluations per packet remain). Portmap's translated packets never
//! reach netfilter (TC redirects them past it).

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The table the bench owns in the node namespace.
const TABLE: &str = "kpsc_bench";

/// DNAT + masquerade rules loaded in a namespace; deleted on drop.
pub struct NatRules {
    ns: String,
}

fn nft(ns: &str, script: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (Debian package nftables; `cargo xtask setup` installs it)")?;
    if let Some(script) = script {
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft {} in {ns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The ruleset: `listen` DNAT to `broker`, masquerade towards it (or SNAT to the node
/// addresses `snat`, first to last, the nftables form of portmap's `--snat-address`);
/// everything else untracked.
fn ruleset(listen: SocketAddr, broker: SocketAddr, snat: &[IpAddr]) -> String {
    let (lip, lport, bip, bport) = (listen.ip(), listen.port(), broker.ip(), broker.port());
    let source_nat = match (snat.first(), snat.last()) {
        (Some(first), Some(last)) => format!("snat to {first}-{last}"),
        _ => "masquerade".to_owned(),
    };
    format!(
        "table ip {TABLE} {{
  chain raw_in {{
    type filter hook prerouting priority raw; policy accept;
    ip daddr {lip} tcp dport {lport} accept
    ip saddr {bip} tcp sport {bport} accept
    notrack
  }}
  chain raw_out {{
    type filter hook output priority raw; policy accept;
    notrack
  }}
  chain to_broker {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {lip} tcp dport {lport} dnat to {bip}:{bport}
  }}
  chain via_node {{
    type nat hook postrouting priority srcnat; policy accept;
    ip daddr {bip} tcp dport {bport} {source_nat}
  }}
}}
"
    )
}

impl NatRules {
    /// Loads the rules into namespace `ns`: clients of `listen` reach `broker`, from the
    /// node's address towards it or from the contiguous range `snat`.
    pub fn load(
        ns: &str,
        listen: SocketAddr,
        broker: SocketAddr,
        snat: &[IpAddr],
    ) -> anyhow::Result<Self> {
        nft(ns, Some(&ruleset(listen, broker, snat)), &["-f", "-"])
            .context("loading the nftables DNAT + masquerade rules")?;
        Ok(Self { ns: ns.to_owned() })
    }
}

impl NatRules {
    /// Connections conntrack holds in the namespace now (flooded SYNs stay 120 s).
    pub fn conntrack_count(&self) -> anyhow::Result<u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "cat"])
            .arg("/proc/sys/net/netfilter/nf_conntrack_count")
            .output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("nf_conntrack_count")
    }
}

impl Drop for NatRules {
    fn drop(&mut self) {
        if let Err(e) = nft(&self.ns, None, &["delete", "table", "ip", TABLE]) {
            eprintln!("kpsc-bench: removing the nftables rules: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_targets_flows_are_tracked_and_translated() {
        let rules = ruleset(
            "198.18.1.1:19096".parse().unwrap(),
            "198.18.2.2:39094".parse().unwrap(),
            &[],
        );
        assert!(rules.contains("ip daddr 198.18.1.1 tcp dport 19096 dnat to 198.18.2.2:39094"));
        assert!(rules.contains("ip daddr 198.18.2.2 tcp dport 39094 masquerade"));
        assert!(rules.contains("ip saddr 198.18.2.2 tcp sport 39094 accept"));
        assert_eq!(rules.matches("notrack").count(), 2);
        let pool: Vec<IpAddr> = ["198.18.2.200", "198.18.2.203"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let rules = ruleset(
            "198.18.1.1:19096".parse().unwrap(),
            "198.18.2.2:39094".parse().unwrap(),
            &pool,
        );
        assert!(rules.contains("tcp dport 39094 snat to 198.18.2.200-198.18.2.203"));
    }
}
