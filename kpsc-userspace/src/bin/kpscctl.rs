//! kpscctl: operator's view of a running kpscd.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser as _;
use kpsc::{
    admin::{MAPS_PATH, MapRow},
    config::ctl::{Command, CtlCli as Cli},
    portmap::datapath::{FlowState, PinnedMaps, monotonic_ns, pin_dir},
};
use kpsc_common::{FlowKey, IP_ANY, Ip, ip_addr};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Maps {
            admin,
            instance,
            pin_root,
            json,
            watch,
        } => {
            let pins = pin_dir(&pin_root, &instance);
            let show = || match &admin {
                Some(admin) => admin_maps(admin, json),
                None if pins.exists() => portmap_maps(&pins, json),
                None => admin_maps(DEFAULT_ADMIN, json),
            };
            match watch {
                None => show().map(|text| emit(&text)),
                Some(secs) => loop {
                    let text = show();
                    // Clear the screen and home the cursor, like watch(1).
                    let screen = match text {
                        Ok(t) => t,
                        Err(e) => format!("kpscctl: {e:#}\n"),
                    };
                    emit(&format!("\x1b[2J\x1b[H{screen}"));
                    std::thread::sleep(Duration::from_secs_f64(secs.max(0.1)));
                },
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kpscctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const DEFAULT_ADMIN: &str = "127.0.0.1:9080";

/// Writes to stdout; a closed pipe (`kpscctl maps | head`) ends the program quietly.
fn emit(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("kpscctl: writing to stdout: {e}");
        std::process::exit(1);
    }
}

fn admin_maps(admin: &str, json: bool) -> anyhow::Result<String> {
    let url = format!("http://{admin}{MAPS_PATH}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut response = match agent.get(&url).call() {
        Err(ureq::Error::StatusCode(404)) => anyhow::bail!(
            "kpscd at {admin} does not serve {MAPS_PATH}: it was started with \
             --http-maps-listen-address (pass that address with --admin) or --http-maps-disable"
        ),
        other => other.with_context(|| {
            format!("cannot reach kpscd at {url} (is it running? --admin sets the address)")
        })?,
    };
    let body = response
        .body_mut()
        .read_to_string()
        .context("reading the port map")?;
    let rows: Vec<MapRow> = serde_json::from_str(&body).context("decoding the port map")?;
    if json {
        Ok(format!("{}\n", serde_json::to_string_pretty(&rows)?))
    } else {
        Ok(render_table(&rows))
    }
}

fn ip(bits: Ip) -> IpAddr {
    ip_addr(&bits)
}

/// `a.b.c.d:port` or `[v6]:port`.
fn endpoint(ip_bits: Ip, port_be: u16) -> String {
    SocketAddr::new(ip(ip_bits), u16::from_be(port_be)).to_string()
}

fn human_age(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Port map, counters and flows from an instance's pinned kernel maps.
fn portmap_maps(pins: &Path, json: bool) -> anyhow::Result<String> {
    let maps = PinnedMaps::open(pins)?;
    let now = monotonic_ns();
    let ports: Vec<serde_json::Value> = maps
        .targets()
        .iter()
        .map(|(port, t)| {
            let s = maps.stats(*port);
            serde_json::json!({
                "listen_port": port,
                "listen_ip": if t.listen_ip == IP_ANY { "*".to_owned() } else { ip(t.listen_ip).to_string() },
                "broker": endpoint(t.broker_ip, t.broker_port),
                "snat_ip": ip(t.snat_ip).to_string(),
                "snat_ips": maps.snat_addresses(t).iter().map(ToString::to_string).collect::<Vec<_>>(),
                "packets_in": s.packets_in, "bytes_in": s.bytes_in,
                "packets_out": s.packets_out, "bytes_out": s.bytes_out,
                "flows_opened": s.new_flows,
                "half_open_opened": s.embryos,
                "unknown_flow_packets": s.unknown_flow,
                "drops": s.drops().iter().map(|(r, n)| ((*r).to_owned(), serde_json::json!(n)))
                    .collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    let icmp = maps.icmp();
    let mut flows: Vec<(FlowKey, kpsc_common::FlowNat)> = maps.flows();
    flows.sort_by_key(|(_, f)| f.created_ns);
    let flow_rows: Vec<serde_json::Value> = flows
        .iter()
        .map(|(k, f)| {
            serde_json::json!({
                "client": endpoint(k.src_ip, k.src_port),
                "listen": endpoint(k.dst_ip, k.dst_port),
                "translated_src": endpoint(f.translated.src_ip, f.translated.src_port),
                "broker": endpoint(f.translated.dst_ip, f.translated.dst_port),
                "age_seconds": now.saturating_sub(f.created_ns) / 1_000_000_000,
                "state": maps.flow_state(f).as_str(),
            })
        })
        .collect();
    if json {
        return Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&serde_json::json!({
                "pins": pins.display().to_string(),
                "half_open_flows": maps.embryos().len(),
                "icmp_errors": {
                    "to_client": icmp.to_client,
                    "to_broker": icmp.to_broker,
                    "dropped": icmp.dropped,
                },
                "ports": ports,
                "flows": flow_rows,
            }))?
        ));
    }
    let mut out = format!("portmap pins: {}\n\n", pins.display());
    let port_rows: Vec<Vec<String>> = maps
        .targets()
        .iter()
        .map(|(port, t)| {
            let s = maps.stats(*port);
            let drops = s.dropped();
            vec![
                port.to_string(),
                endpoint(t.broker_ip, t.broker_port),
                match t.snat_extra {
                    0 => ip(t.snat_ip).to_string(),
                    n => format!("{}(+{n})", ip(t.snat_ip)),
                },
                flows
                    .iter()
                    .filter(|(k, f)| {
                        u16::from_be(k.dst_port) == *port && maps.flow_state(f) != FlowState::Closed
                    })
                    .count()
                    .to_string(),
                s.new_flows.to_string(),
                format!("{} / {}", s.packets_in, human_bytes(s.bytes_in)),
                format!("{} / {}", s.packets_out, human_bytes(s.bytes_out)),
                if drops == 0 {
                    "0".into()
                } else {
                    let reasons: Vec<String> = s
                        .drops()
                        .iter()
                        .filter(|(_, n)| *n > 0)
                        .map(|(r, n)| format!("{r} {n}"))
                        .collect();
                    format!("{drops} ({})", reasons.join(", "))
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "PORT",
            "BROKER",
            "SNAT IP",
            "LIVE",
            "OPENED",
            "IN (pkts / bytes)",
            "OUT (pkts / bytes)",
            "DROPS",
        ],
        &port_rows,
    ));
    let live = flows
        .iter()
        .filter(|(_, f)| maps.flow_state(f) != FlowState::Closed)
        .count();
    out.push_str(&format!(
        "\n{live} live flow(s); {} closed, kept a minute after closing (see --json); \
         {} half-open (handshake in progress)\n",
        flows.len() - live,
        maps.embryos().len()
    ));
    out.push_str(&format!(
        "ICMP errors about flows translated: {} to clients, {} to brokers ({} dropped)\n",
        icmp.to_client, icmp.to_broker, icmp.dropped
    ));
    // The table lists live flows; closed ones are counted above and listed by --json.
    let flow_cells: Vec<Vec<String>> = flows
        .iter()
        .filter(|(_, f)| maps.flow_state(f) != FlowState::Closed)
        .map(|(k, f)| {
            vec![
                endpoint(k.src_ip, k.src_port),
                endpoint(k.dst_ip, k.dst_port),
                format!(
                    "{} -> {}",
                    endpoint(f.translated.src_ip, f.translated.src_port),
                    endpoint(f.translated.dst_ip, f.translated.dst_port)
                ),
                human_age(now.saturating_sub(f.created_ns)),
                maps.flow_state(f).as_str().to_owned(),
            ]
        })
        .collect();
    if !flow_cells.is_empty() {
        out.push_str(&table(
            &["CLIENT", "LISTEN", "TRANSLATED", "AGE", "STATE"],
            &flow_cells,
        ));
    }
    Ok(out)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn render_table(rows: &[MapRow]) -> String {
    // Only a proxy with --bulk-transfer sockmap reports the kernel's share.
    let kernel = rows.iter().any(|r| r.kernel_from_client.is_some());
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![
                match (&r.listen, r.bound) {
                    (Some(l), true) => l.clone(),
                    (Some(l), false) => format!("{l} (NOT BOUND)"),
                    (None, _) => "-".into(),
                },
                r.node_id.map_or("?".into(), |id| id.to_string()),
                r.broker.clone(),
                r.advertised.clone(),
                format!("{:?}", r.origin).to_lowercase(),
                r.connections_open.to_string(),
                human_bytes(r.bytes_from_client),
                human_bytes(r.bytes_to_client),
            ];
            if kernel {
                for k in [&r.kernel_from_client, &r.kernel_to_client] {
                    let k = k.clone().unwrap_or_default();
                    cells.push(format!(
                        "{} ({} of {} frames)",
                        human_bytes(k.redirected_bytes),
                        k.redirected_frames,
                        k.redirected_frames + k.passed_frames
                    ));
                }
            }
            cells
        })
        .collect();
    let mut header = vec![
        "LISTEN",
        "BROKER ID",
        "BROKER",
        "ADVERTISED",
        "ORIGIN",
        "CONNS",
        "BYTES IN",
        "BYTES OUT",
    ];
    if kernel {
        header.push("IN BY KERNEL");
        header.push("OUT BY KERNEL");
    }
    table(&header, &cells)
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cols: Vec<&str>| {
        let text: Vec<String> = cols
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}
