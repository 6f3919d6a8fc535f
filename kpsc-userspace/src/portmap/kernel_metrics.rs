//! Portmap's per-port counters, read from the kernel's per-CPU map, in Prometheus text.

use kpsc_common::PortmapStats;

/// Appends the kernel counters of every (listen port, broker) to `out`.
pub fn render(out: &mut String, rows: &[(u16, String, PortmapStats)]) {
    let family = |out: &mut String,
                  name: &str,
                  help: &str,
                  pick: &dyn Fn(&PortmapStats) -> Vec<(&'static str, u64)>| {
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
    family(
        out,
        "packets",
        "Packets translated by the TC program, per port and direction",
        &|s| {
            vec![
                (",direction=\"from_client\"", s.packets_in),
                (",direction=\"to_client\"", s.packets_out),
            ]
        },
    );
    family(
        out,
        "bytes",
        "IP bytes translated by the TC program, per port and direction",
        &|s| {
            vec![
                (",direction=\"from_client\"", s.bytes_in),
                (",direction=\"to_client\"", s.bytes_out),
            ]
        },
    );
    family(
        out,
        "flows",
        "Flows opened by the TC program, per port",
        &|s| vec![("", s.new_flows)],
    );
    family(
        out,
        "drops",
        "Packets dropped by the TC program, per port and reason",
        &|s| {
            vec![
                (",reason=\"no_flow\"", s.drop_no_flow),
                (",reason=\"no_port\"", s.drop_no_port),
                (",reason=\"no_route\"", s.drop_no_route),
                (",reason=\"rewrite\"", s.drop_rewrite),
            ]
        },
    );
}
