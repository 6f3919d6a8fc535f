//! kpscd: the kpsc daemon.
use std::process::ExitCode;

use clap::Parser as _;
use kpsc::{
    config::{
        cli::{Cli, Mode},
        common::LogConfig,
        error::{ConfigError, EXIT_CONFIG},
        kafka_proxy::reject_unsupported_flags,
        portmap::PortmapConfig,
        proxy::ProxyConfig,
    },
    logging, portmap, proxy,
};

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
