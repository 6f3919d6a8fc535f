//! kpscctl: operator's view of a running kpscd.
use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kpsc::admin::{MAPS_PATH, MapRow};

#[derive(Parser, Debug)]
#[command(name = "kpscctl", version, about = "Inspect a running kpscd")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the live port map: listen address, broker, advertised address, connections, bytes.
    Maps {
        /// kpscd's admin address (--http-listen-address).
        #[arg(long, default_value = "127.0.0.1:9080", env = "KPSC_ADMIN")]
        admin: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Maps { admin, json } => maps(&admin, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kpscctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn maps(admin: &str, json: bool) -> anyhow::Result<()> {
    let url = format!("http://{admin}{MAPS_PATH}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let body = agent
        .get(&url)
        .call()
        .with_context(|| {
            format!("cannot reach kpscd at {url} (is it running? --admin sets the address)")
        })?
        .body_mut()
        .read_to_string()
        .context("reading the port map")?;
    let rows: Vec<MapRow> = serde_json::from_str(&body).context("decoding the port map")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", render_table(&rows));
    }
    Ok(())
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
    let header = [
        "LISTEN",
        "BROKER ID",
        "BROKER",
        "ADVERTISED",
        "ORIGIN",
        "CONNS",
        "BYTES IN",
        "BYTES OUT",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
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
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cols: &[String]| {
        let text: Vec<String> = cols
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    for row in &cells {
        line(row);
    }
    out
}
