//! kpscd: the kpsc daemon.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kpsc::{
    config::{ProxyArgs, ProxyConfig, reject_unsupported_flags},
    logging,
    portmap_mode::{self, PortmapArgs, PortmapConfig},
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
    /// eBPF TC data plane: each listen port DNAT/SNATed to its broker in the kernel.
    Portmap(Box<PortmapArgs>),
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if let Err(e) = reject_unsupported_flags(&argv[1..]) {
        eprintln!("kpscd: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let cli = Cli::parse();
    let runtime = || {
        tokio::runtime::Runtime::new().map_err(|e| {
            eprintln!("kpscd: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
    };
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
            match runtime() {
                Ok(r) => r.block_on(proxy::run(config)),
                Err(code) => code,
            }
        }
        Mode::Portmap(args) => {
            let config = match PortmapConfig::resolve(*args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("kpscd: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            logging::init(&config.map.log);
            match runtime() {
                Ok(r) => r.block_on(portmap_mode::run(config)),
                Err(code) => code,
            }
        }
    }
}
