//! kpscd: the kpsc daemon.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kpsc::{
    config::{
        common::LogConfig,
        error::{ConfigError, EXIT_CONFIG},
        kafka_proxy::reject_unsupported_flags,
        portmap::{PortmapArgs, PortmapConfig},
        proxy::{ProxyArgs, ProxyConfig},
    },
    logging, portmap, proxy,
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
    match cli.mode {
        Mode::Proxy(args) => launch(ProxyConfig::resolve(*args), |c| &c.common.log, proxy::run),
        Mode::Portmap(args) => launch(
            PortmapConfig::resolve(*args),
            |c| &c.common.log,
            portmap::run,
        ),
    }
}

/// Exits 2 on a configuration error; otherwise sets up logging and runs the mode.
fn launch<C, F: Future<Output = anyhow::Result<ExitCode>>>(
    config: Result<C, ConfigError>,
    log: impl Fn(&C) -> &LogConfig,
    run: impl FnOnce(C) -> F,
) -> ExitCode {
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kpscd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logging::init(log(&config));
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
        .and_then(|runtime| {
            let result = runtime.block_on(run(config));
            // A blocking task still running (a DNS lookup, an admin view walking kernel
            // maps) must not hold the exit the operator asked for.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        });
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "kpscd failed");
            eprintln!("kpscd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
