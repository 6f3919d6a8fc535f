//! Portmap's kernel counters, read from its per-CPU maps, in Prometheus text.

use kpsc_common::{IcmpStats, PortmapStats};

/// Appends the counters of ICMP errors about tracked flows (all ports together).
pub fn render_icmp(out: &mut String, s: &IcmpStats) {
    out.push_str(
        "# HELP kpsc_portmap_icmp_errors ICMP errors about translated flows (e.g. \
         fragmentation needed) translated by the kernel program, per direction\n\
         # TYPE kpsc_portmap_icmp_errors counter\n",
    );
    for (direction, n) in [("to_client", s.to_client), ("to_broker", s.to_broker)] {
        out.push_str(&format!(
            "kpsc_portmap_icmp_errors_total{{direction=\"{direction}\"}} {n}\n"
        ));
    }
    out.push_str(&format!(
        "# HELP kpsc_portmap_icmp_errors_dropped ICMP errors about translated flows the kernel \
         program could not send on (no route, rewrite failed)\n\
         # TYPE kpsc_portmap_icmp_errors_dropped counter\n\
         kpsc_portmap_icmp_errors_dropped_total {}\n",
        s.dropped
    ));
}

/// Appends the kernel counters of every (listen port, broker) to `out`.
pub fn render(out: &mut String, rows: &[(u16, String, PortmapStats)]) {
    let family = |out: &mut String,
                  name: &str,
                  help: &str,
                  pick: &dyn Fn(&PortmapStats) -> Vec<(String, u64)>| {
        out.push_str(&format!(
            "# HELP kpsc_portmap_{name} {help}\n# TYPE kpsc_portmap_{name} counter\n"
        ));
        for (port, broker, s) in rows {
            for (extra, v) in pick(s) {
                out.push_str(&format!(
                    "kpsc_portmap_{name}_total{{listen_port=\"{port}\",broker=\"{broker}\"{extra}}} {v}\n"
                ));
            }
        }
    };
    let direction = |from_client: u64, to_client: u64| {
        vec![
            (",direction=\"from_client\"".to_owned(), from_client),
            (",direction=\"to_client\"".to_owned(), to_client),
        ]
    };
    family(
        out,
        "packets",
        "Packets translated by the kernel program, per port and direction",
        &|s| direction(s.packets_in, s.packets_out),
    );
    family(
        out,
        "bytes",
        "IP bytes translated by the kernel program, per port and direction",
        &|s| direction(s.bytes_in, s.bytes_out),
    );
    family(
        out,
        "flows",
        "Flows established through the kernel program (handshake completed), per port",
        &|s| vec![(String::new(), s.new_flows)],
    );
    family(
        out,
        "half_open_flows",
        "Half-open flows opened by the kernel program (SYNs given a translated tuple), per port",
        &|s| vec![(String::new(), s.embryos)],
    );
    family(
        out,
        "unknown_flow_packets",
        "Non-SYN packets to a mapped port of no flow the kernel program knows, passed on to \
         the node's stack (which resets a forgotten connection) or another program, per port",
        &|s| vec![(String::new(), s.unknown_flow)],
    );
    family(
        out,
        "drops",
        "Packets dropped by the kernel program (TC or XDP), per port and reason",
        &|s| {
            s.drops()
                .iter()
                .map(|(reason, n)| (format!(",reason=\"{reason}\""), *n))
                .collect()
        },
    );
}
