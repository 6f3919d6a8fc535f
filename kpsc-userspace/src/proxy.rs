//! Proxy mode, start to finish: admin endpoint, static listeners, first metadata, the
//! listeners it implies, periodic refresh, and a graceful stop on SIGTERM/SIGINT.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{admin, config::ProxyConfig, listener::ProxyState};

/// Exit code for configuration errors (clap uses the same).
pub const EXIT_CONFIG: u8 = 2;

/// Runs proxy mode until SIGTERM/SIGINT. Errors are reported (and turned into an exit
/// code) by kpscd's `main`.
pub async fn run(config: ProxyConfig) -> anyhow::Result<ExitCode> {
    info!(
        bulk_policy = config.bulk_policy.as_str(),
        max_frame_size = config.max_frame_size,
        bulk_transfer = config.bulk_transfer.as_str(),
        max_in_flight = config.max_in_flight,
        "kpscd proxy starting"
    );
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let state = ProxyState::new(config)?;
    let admin = admin::serve(
        &state.config.map.http,
        Arc::clone(&state) as Arc<dyn admin::AdminView>,
        state.shutdown.clone(),
    )
    .await?;

    let initial: Vec<_> = state.map.read().expect("map lock").entries().to_vec();
    for entry in &initial {
        state.bind(entry)?;
    }

    // First metadata: port-map conflicts found here are configuration errors.
    match state.refresh_metadata().await {
        Ok(problems) if !problems.is_empty() => {
            for p in &problems {
                error!(error = %format!("{p:#}"), "broker cannot be mapped");
                eprintln!("kpscd: invalid port map: {p:#}");
            }
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        Ok(_) => {
            let map = state.map.read().expect("map lock");
            info!(brokers = map.entries().len(), "port map ready");
        }
        Err(e) => warn!(
            error = %format!("{e:#}"),
            "no broker answered yet; serving the static listeners and retrying every refresh interval"
        ),
    }
    let refresher = tokio::spawn(Arc::clone(&state).refresh_loop());

    let signal_name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    let timeout = state.config.shutdown_timeout;
    info!(
        signal = signal_name,
        ?timeout,
        "stopping: no new connections, finishing in-flight requests"
    );
    state.shutdown.cancel();
    state.tasks.close();
    refresher.abort();
    if tokio::time::timeout(timeout, state.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = state.tasks.len(),
            "shutdown timeout reached; closing the remaining connections"
        );
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    info!("kpscd stopped");
    Ok(ExitCode::SUCCESS)
}
