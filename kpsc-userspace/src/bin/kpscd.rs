//! kpscd: the kpsc daemon.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kpsc::{
    config::{ProxyArgs, ProxyConfig, reject_unsupported_flags},
    logging,
    proxy::{self, EXIT_CONFIG},
};

/// kpsc: one private endpoint for a self-hosted Kafka cluster, one port per broker.
#[derive(Parser, Debug)]
#[command(name = "kpscd", version, about)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Userspace proxy that rewrites broker addresses in responses (kafka-proxy's flags).
    #[command(visible_alias = "server")]
    Proxy(Box<ProxyArgs>),
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if let Err(e) = reject_unsupported_flags(&argv[1..]) {
        eprintln!("kpscd: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let cli = Cli::parse();
    match cli.mode {
        Mode::Proxy(args) => {
            let config = match ProxyConfig::resolve(*args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("kpscd: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            logging::init(&config.map.log);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("kpscd: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(proxy::run(config))
        }
    }
}
