//! `kpscd proxy`: kafka-proxy's job. Data flow: `listeners` accept client connections on
//! one port per broker -> `connection` forwards each to its broker, requests up and
//! responses down in order -> frames that pass through unchanged go through a `bulk` mover
//! (copy or splice), address-bearing responses through `rewrite`. `state` is what they
//! share, `refresh` keeps the port map current from cluster metadata.
//!
//! This file runs the mode start to finish: admin endpoint, static listeners, first
//! metadata, periodic refresh, and a graceful stop on SIGTERM/SIGINT.
pub mod budget;
pub mod bulk;
pub mod connection;
pub mod listeners;
pub mod refresh;
pub mod rewrite;
pub mod state;

use std::{process::ExitCode, sync::Arc};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    admin,
    config::{error::EXIT_CONFIG, proxy::ProxyConfig},
    proxy::{listeners::Accepted, state::ProxyState},
};

/// Runs proxy mode until SIGTERM/SIGINT. Errors are reported (and turned into an exit
/// code) by kpscd's `main`.
pub async fn run(config: ProxyConfig) -> anyhow::Result<ExitCode> {
    info!(
        bulk_policy = %config.bulk_policy,
        max_frame_size = config.max_frame_size,
        bulk_transfer = %config.bulk_transfer,
        max_in_flight = config.max_in_flight,
        "kpscd proxy starting"
    );
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // Installed so SIGHUP (sent by service managers and `kill -HUP` habits) does not
    // terminate the proxy, whose default action it would be.
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let (state, incoming) = ProxyState::start(config)?;
    let admin = admin::serve(
        &state.config.common.http,
        Arc::clone(&state) as Arc<dyn admin::AdminView>,
        state.shutdown.clone(),
    )
    .await?;
    state.tasks.spawn(dispatch(incoming, Arc::clone(&state)));

    // First metadata: port-map conflicts found here are configuration errors.
    match refresh::refresh_metadata(&state).await {
        Ok(problems) if !problems.is_empty() => {
            for p in &problems {
                error!(error = %format!("{p:#}"), "broker cannot be mapped");
                eprintln!("kpscd: invalid port map: {p:#}");
            }
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        Ok(_) => {
            let brokers = state.listeners.snapshot().map.entries().len();
            info!(brokers, "port map ready");
        }
        Err(e) => warn!(
            error = %format!("{e:#}"),
            "no broker answered yet; serving the static listeners and retrying every refresh interval"
        ),
    }
    let refresher = tokio::spawn(refresh::refresh_loop(Arc::clone(&state)));

    let signal_name = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sighup.recv() => info!(
                "SIGHUP: proxy mode reloads nothing (flags and file are read at start); \
                 restart kpscd to apply a new configuration"
            ),
        }
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
    tokio::select! {
        _ = state.tasks.wait() => {}
        _ = tokio::time::sleep(timeout) => warn!(
            remaining = state.tasks.len(),
            "shutdown timeout reached; closing the remaining connections"
        ),
        // An operator who signals again does not want to wait.
        _ = sigterm.recv() => warn!(remaining = state.tasks.len(), "second SIGTERM: stopping now"),
        _ = sigint.recv() => warn!(remaining = state.tasks.len(), "second SIGINT: stopping now"),
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    info!("kpscd stopped");
    Ok(ExitCode::SUCCESS)
}

/// Starts a connection task for every accepted client, until shutdown.
async fn dispatch(mut incoming: mpsc::Receiver<Accepted>, state: Arc<ProxyState>) {
    loop {
        let accepted = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            accepted = incoming.recv() => match accepted {
                Some(a) => a,
                None => return,
            },
        };
        state.tasks.spawn(connection::serve::serve(
            accepted.stream,
            accepted.peer,
            accepted.route,
            Arc::clone(&state),
        ));
    }
}
