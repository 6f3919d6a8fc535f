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
    // args() would panic on an argument that is not UTF-8: name the flag it belongs to.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(i) = raw.iter().position(|a| a.to_str().is_none()) {
        let lossy = raw[i].to_string_lossy();
        let flag = if lossy.starts_with("--") {
            lossy.split('=').next().unwrap_or_default().to_owned()
        } else {
            raw.get(i.wrapping_sub(1))
                .map(|f| f.to_string_lossy().into_owned())
                .filter(|f| f.starts_with('-'))
                .unwrap_or_else(|| format!("argument {i}"))
        };
        eprintln!("kpscd: {}", ConfigError::new(&flag, "not valid UTF-8"));
        return ExitCode::from(EXIT_CONFIG);
    }
    let argv: Vec<String> = raw
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if let Err(e) = reject_unsupported_flags(&argv[1..]) {
        eprintln!("kpscd: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let cli = Cli::parse();
    match cli.mode {
        Mode::Proxy(args) => launch(
            ProxyConfig::resolve(*args),
            |c| &c.common.log,
            |c| Ok(Ok(c)),
            proxy::run,
        ),
        Mode::Portmap(args) => launch(
            PortmapConfig::resolve(*args),
            |c| &c.common.log,
            portmap::prepare,
            portmap::run,
        ),
    }
}

/// Exits 2 on a configuration error; otherwise sets up logging, runs the mode's
/// `prepare` on this single thread (what must happen before other threads exist, e.g.
/// dropping capabilities) and then the mode itself on the async runtime. `prepare` may
/// end the process early with its own exit code.
fn launch<C, P, F: Future<Output = anyhow::Result<ExitCode>>>(
    config: Result<C, ConfigError>,
    log: impl Fn(&C) -> &LogConfig,
    prepare: impl FnOnce(C) -> anyhow::Result<Result<P, ExitCode>>,
    run: impl FnOnce(P) -> F,
) -> ExitCode {
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kpscd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logging::init(log(&config));
    let result = prepare(config).and_then(|prepared| {
        let prepared = match prepared {
            Ok(p) => p,
            Err(code) => return Ok(code),
        };
        let runtime = tokio::runtime::Runtime::new()
            .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
        let result = runtime.block_on(run(prepared));
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
