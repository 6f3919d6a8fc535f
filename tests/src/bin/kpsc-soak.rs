//! The changefeed soak as a benchmark (`cargo xtask soak`): minutes of keyed,
//! sequence-numbered records through kpscd under a fault schedule; prints the table and
//! writes it as markdown and JSON. Fails when a record was lost or reordered.
use std::path::PathBuf;

use anyhow::ensure;
use clap::Parser;
use kpsc_tests::soak::{SoakConfig, run};

#[derive(Parser)]
struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 5.0)]
    minutes: f64,
    /// Records per second.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Seconds between two faults.
    #[arg(long, default_value_t = 20)]
    fault_gap: u64,
    /// Extra librdkafka producer setting, `key=value` (repeatable), e.g.
    /// `metadata.recovery.strategy=none`.
    #[arg(long = "producer-config", value_name = "KEY=VALUE", value_parser = key_value)]
    producer_config: Vec<(String, String)>,
    /// Results folder.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
}

/// `key=value` (clap reports anything else as a usage error, exit 2).
fn key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))?;
    Ok((key.to_owned(), value.to_owned()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.rate > 0, "--rate must be at least 1");
    ensure!(args.minutes > 0.0, "--minutes must be positive");
    let mut config = SoakConfig::minutes(args.minutes);
    config.rate = args.rate;
    config.fault_gap = std::time::Duration::from_secs(args.fault_gap.max(5));
    config.producer_config = args.producer_config;
    let report = run(&config)?;
    print!("{}", report.markdown());
    let path = report.write(&args.out)?;
    eprintln!("written to {} (and .json)", path.display());
    ensure!(
        report.verdict.lost == 0 && report.verdict.reordered == 0,
        "{} records lost, {} reordered",
        report.verdict.lost,
        report.verdict.reordered
    );
    Ok(())
}
